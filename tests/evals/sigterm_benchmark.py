"""A benchmark that sends this process SIGTERM while it runs (a scheduler's time limit during an evaluation), and
records its calls: registered by tests of the evaluation's stop."""

from __future__ import annotations

import os
import signal

CALLS: list[str] = []
ARMED = [True]  # signals while True


def run(sae, lm, hook, tokens, *, seed=0, **options) -> dict:
    CALLS.append(hook)
    if ARMED[0]:
        os.kill(os.getpid(), signal.SIGTERM)
    return {"n_tokens": int(tokens.numel())}
