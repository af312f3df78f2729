"""`python -m phi_jax.cli ...` is `phi-jax ...`."""

import sys

from phi_jax.cli import main

sys.exit(main())
