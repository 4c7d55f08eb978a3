"""`python -m ddpm ...` (see ddpm/cli.py)."""

import sys

from ddpm.cli import main

sys.exit(main())
