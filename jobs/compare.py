"""`python jobs/compare.py --help`: runs `mor_dist.cli.compare` from a checkout (installed: `mor-compare`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.compare import main

raise SystemExit(main())
