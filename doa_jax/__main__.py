"""`python -m doa_jax` runs the `doa` command."""
import sys

from doa_jax.cli import main

sys.exit(main())
