"""`python jobs/generate.py --help`: runs `mor_dist.cli.generate` from a checkout (installed: `mor-generate`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.generate import main

raise SystemExit(main())
