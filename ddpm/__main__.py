"""`python -m ddpm ...` (see ddpm/cli.py)."""

from ddpm.cli import exit_process, main

exit_process(main())
