"""What ``train.py`` and ``evaluate.py`` do before they import torch and lightning (seconds, with nothing to save yet).

Ctrl+C there used to raise a ``KeyboardInterrupt`` inside an import: its traceback, or a module left half-imported
that failed later (a ``RecursionError`` in numpy's). Until :func:`ctrl_c_raises`, Ctrl+C ends the process at once with
one line and the shell's exit code for it, 130. This module imports nothing heavy (``gsae/__init__.py`` neither).
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def _stopped(*_) -> None:
    sys.stderr.write("stopped (Ctrl+C)\n")
    sys.stderr.flush()
    os._exit(130)


def stop_on_ctrl_c() -> None:
    """Ctrl+C ends the process now, with one line (until :func:`ctrl_c_raises`)."""
    signal.signal(signal.SIGINT, _stopped)


def one_line_warnings() -> None:
    """Print each Python warning as one ``warning: <message>`` line: the default format adds the source file and line
    and the line of code (``  rank_zero_warn(``), three lines around a one-line error."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' signature
        print(f"warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


class _LevelPrefix(logging.Formatter):
    """``warning: <message>`` for a logged warning, as :func:`one_line_warnings` prints a Python warning (a run's
    notices came in two styles); other levels as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING and not text.startswith("warning:") else text


def log_to_terminal() -> None:
    """The commands' logging: messages alone at INFO and above, a warning marked as :func:`one_line_warnings` marks
    Python's."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and type(handler.formatter) is logging.Formatter:
            handler.setFormatter(_LevelPrefix("%(message)s"))


def ctrl_c_raises() -> None:
    """Ctrl+C raises ``KeyboardInterrupt`` again (Python's default): the commands stop cleanly from here."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
