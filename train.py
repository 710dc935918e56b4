"""Train an SAE: ``python train.py [--config configs/X.yaml] [--model.sae.k 64] [--ckpt_path last]``."""

import sys

from gsae.cli import main

if __name__ == "__main__":
    sys.exit(main())
