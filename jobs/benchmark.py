"""`python jobs/benchmark.py --help`: runs `mor_dist.cli.benchmark` from a checkout (installed: `mor-benchmark`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.benchmark import main

raise SystemExit(main())
