"""Train an SAE: ``python train.py [--config configs/X.yaml] [--model.sae.k 64] [--ckpt_path last]``."""

import sys

try:
    from gsae.cli import main
except KeyboardInterrupt:  # Ctrl+C while torch and lightning import (seconds): one line, not their traceback
    print("stopped (Ctrl+C)", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
