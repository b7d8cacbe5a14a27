"""`import mor_dist.hf` registers mor-dist's recursive and MoR models with transformers' Auto classes, so an
exported folder loads with `AutoModelForCausalLM.from_pretrained(folder)` (no trust_remote_code)."""

from transformers import AutoConfig, AutoModelForCausalLM

from mor_dist.hf.modeling import MoRConfig, MoRForCausalLM, mor_weights

AutoConfig.register(MoRConfig.model_type, MoRConfig, exist_ok=True)
AutoModelForCausalLM.register(MoRConfig, MoRForCausalLM, exist_ok=True)

__all__ = ["MoRConfig", "MoRForCausalLM", "mor_weights"]
