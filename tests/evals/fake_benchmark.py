"""A tiny benchmark with artifacts and texts, registered by tests to check the generic support."""

from __future__ import annotations


def run(sae, lm, hook, tokens, *, seed=0, **options) -> dict:
    return {"n_tokens": int(tokens.numel()), "seed": seed, "hook": hook}


def figures(result: dict) -> dict:
    return {}


def artifacts(result: dict, about: str = "") -> dict[str, str]:
    return {".fake.html": f"<p>{result['n_tokens']} tokens at {result['hook']} ({about})</p>"}


def texts(result: dict) -> dict[str, str]:
    return {"summary": f"**{result['n_tokens']}** tokens"}
