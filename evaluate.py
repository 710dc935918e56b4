"""Evaluate SAEs: ``python evaluate.py PATH [PATH ...] [--benchmarks loss_added,dead_latents] [--output FILE.json]``.

See ``gsae/evaluate.py`` (or ``python evaluate.py --help``) for the options.
"""

import os
import signal
import sys


def _stopped(*_) -> None:
    sys.stderr.write("stopped (Ctrl+C)\n")
    sys.stderr.flush()
    os._exit(130)


# Ctrl+C while torch and lightning import (seconds; nothing to save yet): one line and exit code 130. A
# KeyboardInterrupt raised inside an import printed its traceback, or left a module half-imported to fail on later.
signal.signal(signal.SIGINT, _stopped)
from gsae.evaluate import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    sys.exit(main())
