"""`python -m mlx_gemma4`: the command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
