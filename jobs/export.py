"""`python jobs/export.py --help`: runs `mor_dist.cli.export` from a checkout (installed: `mor-export`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.export import main

raise SystemExit(main())
