"""`python jobs/submit_k8s.py --help`: runs `mor_dist.cli.submit_k8s` from a checkout (installed: `mor-submit-k8s`)."""

import _checkout  # noqa: F401  (the checkout on sys.path)

from mor_dist.cli.submit_k8s import main

raise SystemExit(main())
