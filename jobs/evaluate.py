"""`python jobs/evaluate.py --help`: runs `mor_dist.cli.evaluate` from a checkout (installed: `mor-evaluate`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.evaluate import main

raise SystemExit(main())
