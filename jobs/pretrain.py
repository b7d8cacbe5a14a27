"""`python jobs/pretrain.py --help`: runs `mor_dist.cli.pretrain` from a checkout (installed: `mor-pretrain`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.pretrain import main

raise SystemExit(main())
