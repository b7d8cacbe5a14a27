"""mor-dist's model as an lm-evaluation-harness model ("mor_dist"): lm-eval builds the requests, encodes the
context/continuation pairs (TemplateLM) and scores the results; this class only runs the model.

Routing: `causal` (default) scores with the rule generation uses, so a right-padded batch gives each
request what it would get alone; `topk` is the paper's training-time rule, which looks at the whole
sequence, so each request then runs alone at its own length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from mor_dist.data.tokenizer import Tokenizer


@register_model("mor_dist")
class MoRHarnessModel(TemplateLM):
    """Log-likelihoods, rolling log-likelihoods and greedy generation from a single-process MoRModel."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 8, routing: str = "causal",
                 max_length: int | None = None) -> None:
        super().__init__()
        if routing not in ("causal", "topk"):
            raise ValueError(f"routing={routing!r}: choose causal or topk")
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.causal = routing == "causal"
        self.max_length = max_length or model.cfg.model.seq_length
        self.device_ = next(model.parameters()).device
        self.depth_sum, self.depth_tokens = 0.0, 0  # recursions taken by the scored tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, **_: Any) -> list[int]:
        return self.tok.encode(string)

    @property
    def mean_depth(self) -> float:
        """Mean recursions per scored token so far (NaN before any)."""
        return self.depth_sum / self.depth_tokens if self.depth_tokens else float("nan")

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """[len, vocab] log-probabilities for each row (batched, right-padded, under the causal rule)."""
        if not self.causal and len(rows) > 1:
            return [out for row in rows for out in self._log_probs([row])]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.tok.eos_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        logits = self.model(ids.to(self.device_), causal_routing=self.causal)[..., :self.tok.vocab_size]
        depths = self.model.token_depths
        out = []
        for i, row in enumerate(rows):
            if depths is not None:
                self.depth_sum += float(depths[i, :len(row)].float().sum())
                self.depth_tokens += len(row)
            out.append(F.log_softmax(logits[i, :len(row)].float(), dim=-1).cpu())
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request, with
        the context cut from the left to max_length as lm-eval's hf model does."""
        order = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results = []
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            for (key, _, cont), row, log_probs in zip(chunk, rows, self._log_probs(rows)):
                scored = log_probs[len(row) - len(cont):]
                target = torch.tensor(cont)
                answer = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over disjoint windows of max_length (lm-eval's own windowing)."""
        totals = []
        for (string,) in [req.args for req in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            totals.append(sum(score for score, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), totals[-1])
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations from the project's engine (causal rule, paged KV cache), cut at `until`."""
        from mor_dist.inference.generation import generate
        from mor_dist.inference.sampling import Sampler

        outputs = []
        for context, kwargs in [req.args for req in requests]:
            until = kwargs.get("until") or [self.tok.decode([self.tok.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-(self.max_length - budget):] or [self.tok.eos_id]
            sampler = Sampler(0.0)
            sampler.vocab_limit = self.tok.vocab_size
            tokens, _, _ = generate(self.model, [prompt], budget, sampler, self.tok.eos_id)
            text = self.tok.decode(tokens[0])
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return outputs
