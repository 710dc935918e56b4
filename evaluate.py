"""Evaluate SAEs: ``python evaluate.py PATH [PATH ...] [--benchmarks loss_added,dead_latents] [--output FILE.json]``.

See ``gsae/evaluate.py`` (or ``python evaluate.py --help``) for the options.
"""

import sys

from gsae.startup import ctrl_c_raises, stop_on_ctrl_c

stop_on_ctrl_c()  # while torch and lightning import: one line on Ctrl+C, not a traceback
from gsae.evaluate import main  # noqa: E402

ctrl_c_raises()

if __name__ == "__main__":
    sys.exit(main())
