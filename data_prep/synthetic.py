"""``python -m data_prep.synthetic``: writes the synthetic branching corpus (the tool is
:mod:`lcm_jax.synthetic`, which the default training job also uses; ``--help`` for the flags)."""

import sys

from lcm_jax.synthetic import main

if __name__ == "__main__":
  sys.exit(main())
