"""Submit a pre-training run to Kubernetes as a KubeRay RayJob and follow it until it finishes.

    mor-submit-k8s --overlay single-node-8gpu --config configs/mor_360m_nr4.yaml \
        --name mor-360m-nr4 train.steps=2000
    mor-submit-k8s --overlay cpu-smoke --dry-run      # print the RayJob YAML, touch no cluster

(from a checkout: `python jobs/submit_k8s.py ...`)
"""

from __future__ import annotations

import argparse
import sys

from mor_dist import k8s
from mor_dist.cmdline import positive_float
from mor_dist.cmdline import command


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line: overlay, run config, dotted overrides, namespace, name, dry run."""
    parser = argparse.ArgumentParser(prog="jobs/submit_k8s.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", required=True,
                        help="overlay under k8s/overlays/ (single-node-8gpu, multi-node-4x8gpu, cpu-smoke) or a directory")
    parser.add_argument("--config", help="run config inside the repository (default: the overlay's own)")
    parser.add_argument("--namespace", help="namespace of the MLflow server and checkpoint volume (default: kubeconfig's)")
    parser.add_argument("--name", help="RayJob name (default: the overlay's, mor-pretrain)")
    parser.add_argument("--dry-run", action="store_true", help="print the RayJob YAML and exit")
    parser.add_argument("--poll-seconds", type=positive_float, default=10.0, help="status polling interval")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")
    return parser.parse_intermixed_args(argv)


@command
def main(argv: list[str]) -> int:
    """Render, then print (--dry-run) or create and follow the RayJob; exit 0 when the job succeeded."""
    args = parse_args(argv)
    try:
        job = k8s.rayjob_for_run(args.overlay, args.config, args.overrides, args.name)
    except k8s.KustomizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(k8s.dump_all([job]))
        return 0
    namespace = args.namespace or k8s.current_namespace()
    api = k8s.connect()
    try:
        k8s.submit(api, namespace, job)
    except k8s.SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = job["metadata"]["name"]
    print(f"created RayJob {namespace}/{name}: {job['spec']['entrypoint']}")
    for line in k8s.mlflow_lines(job, namespace):
        print(line)
    try:
        return 0 if k8s.follow(api, namespace, name, args.poll_seconds) else 1
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (kubectl -n {namespace} get rayjob {name})")
        return 130
