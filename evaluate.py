"""Evaluate SAEs: ``python evaluate.py PATH [PATH ...] [--benchmarks loss_added,dead_latents] [--output FILE.json]``.

See ``gsae/evaluate.py`` (or ``python evaluate.py --help``) for the options.
"""

import sys

from gsae.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
