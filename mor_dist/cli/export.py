"""Export a training checkpoint: `mor-export RUN_OR_CHECKPOINT_DIR OUT` (or `python jobs/export.py`).

--format pt (default): one file for jobs/generate.py --checkpoint. --format hf: a Hugging Face folder;
vanilla models load in plain transformers as LlamaForCausalLM, recursive and MoR ones with
AutoModelForCausalLM.from_pretrained(OUT) after `import mor_dist.hf`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mor_dist.cmdline import checkpoint_path, command


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=checkpoint_path,
                        help="a run directory (runs/<name>: its newest whole checkpoint) or one of its checkpoint_* "
                             "directories, as a path or a URI (s3://...)")
    parser.add_argument("out", type=Path, help="the file (.pt) or, with --format hf, the new folder to write")
    parser.add_argument("--format", choices=("pt", "hf"), default="pt", help="pt: one file; hf: a Hugging Face folder")
    args = parser.parse_args(argv)
    from mor_dist.train.export import export, export_hf  # megatron and torch: after the arguments are known to be good

    if args.format == "hf":
        done = export_hf(args.checkpoint, args.out)
        print(f"wrote {args.out}: step {done['step']}, {done['params'] / 1e6:.2f}M parameters, {done['class']}")
        return 0
    payload = export(args.checkpoint, args.out)
    params = sum(t.numel() for t in payload["model"].values())
    print(f"wrote {args.out}: step {payload['step']}, {params / 1e6:.2f}M parameters, tp=pp=1")
    return 0
