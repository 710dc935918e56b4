"""Train an SAE: ``python train.py [--config configs/X.yaml] [--model.sae.k 64] [--ckpt_path last]``."""

import sys

from gsae.startup import ctrl_c_raises, stop_on_ctrl_c

stop_on_ctrl_c()  # while torch and lightning import: one line on Ctrl+C, not a traceback
from gsae.cli import main  # noqa: E402

ctrl_c_raises()

if __name__ == "__main__":
    sys.exit(main())
