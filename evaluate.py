"""Evaluate SAEs: ``python evaluate.py PATH [PATH ...] [--benchmarks loss_added,dead_latents] [--output FILE.json]``.

See ``gsae/evaluate.py`` (or ``python evaluate.py --help``) for the options.
"""

import sys

try:
    from gsae.evaluate import main
except KeyboardInterrupt:  # Ctrl+C while torch and lightning import (seconds): one line, not their traceback
    print("stopped (Ctrl+C)", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
