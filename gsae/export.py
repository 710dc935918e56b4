"""SAELens-format export and import: ``sae_weights.safetensors`` + ``cfg.json`` that
``sae_lens.SAE.load_from_disk`` loads, and the reverse (load our checkpoints without Lightning).

Exact correspondence: our TopK SAE and SAELens' ``topk`` architecture compute the same
``(x − b_dec) @ W_enc + b_enc`` and keep the same k latents. SAELens applies ReLU to the kept values;
with ``relu_after_topk=False`` (our default, SPEC §1.1) a kept *negative* pre-activation differs, so
``cfg.json``'s metadata records ``relu_after_topk`` and exports are exact for tokens whose k-th
largest pre-activation is positive (the usual case after training). g-SAEs export as plain TopK:
SAELens has no gradient-aware selection, so a SAELens-loaded g-SAE encodes like its ``β = 0`` TopK.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from gsae.files import partial_path, replace_dir, umask_mode
from gsae.sae.base import SparseAutoencoder


def export_saelens(sae: SparseAutoencoder, path: str | Path, meta: dict) -> Path:
    """Write ``sae`` to the folder ``path`` in SAELens format; ``meta`` is the checkpoint's ``describe()``."""
    final = Path(path)
    path = partial_path(final)  # written whole, then renamed over the old export (gsae.files)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cfg = sae.config()
    arch = "topk" if "k" in cfg else "standard"
    state = {name: p.detach().float().cpu().contiguous() for name, p in sae.named_parameters()}
    state["W_dec"] = sae.decoder_weight().detach().float().cpu().contiguous()
    save_file(state, str(path / "sae_weights.safetensors"))
    os.chmod(path / "sae_weights.safetensors", umask_mode())  # safetensors writes 0600 whatever the umask
    lm = meta.get("lm", {})
    data = meta.get("data") or {}
    cfg_json = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": arch == "topk",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            # without a >= 6 version SAELens treats the file as pre-6.0 and drops this whole metadata block
            "sae_lens_version": _saelens_version(),
            "model_name": lm.get("name"),
            "hook_name": meta.get("hook"),
            "hook_head_index": None,
            # what the run's contexts looked like (SAELens evaluates with these); True if the run did not say
            "prepend_bos": bool(data.get("prepend_bos", meta.get("prepend_bos", True))),
            "context_size": data.get("context_size", meta.get("context_size")),
            "model_from_pretrained_kwargs": {
                k: lm[k] for k in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases") if k in lm
            },
            "gsae": {
                "sae_class": meta.get("sae_class"),
                "sae_config": cfg,
                "objective": meta.get("objective"),
                "lm": lm,
                "data": meta.get("data"),
                # the run's evaluation settings (gsae.callbacks.EvaluationCallback.settings): evaluate.py uses them
                **({"evaluation": meta["evaluation"]} if meta.get("evaluation") else {}),
            },
        },
    }
    if arch == "topk":
        cfg_json["k"] = cfg["k"]
        cfg_json["rescale_acts_by_decoder_norm"] = False
    (path / "cfg.json").write_text(json.dumps(cfg_json, indent=2))
    replace_dir(path, final)
    return final


def _saelens_version() -> str:
    """SAELens reads exports without this key as pre-6.0 configs and drops their metadata."""
    try:
        return importlib.metadata.version("sae_lens")
    except importlib.metadata.PackageNotFoundError:  # any 6.x marker works
        return "6.0.0"


def build_sae(meta: dict) -> SparseAutoencoder:
    """Instantiate the SAE a checkpoint describes (``meta`` = its ``gsae`` section)."""
    module, _, name = meta["sae_class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**meta["sae_config"])


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict of a gsae Lightning checkpoint (one line of error for anything else). ``mmap``: tensors
    are mapped, not read (a check or an SAE-only load of a sweep does not read its optimizer state)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        if Path(path).suffix != ".ckpt":  # a config.yaml, an events file: not a checkpoint, rather than a corrupt one
            raise ValueError(f"{str(path)!r} is not a checkpoint (a gsae .ckpt file): torch.load cannot read it") from None
        if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.load's own words are about mmap or pickles
            size = Path(path).stat().st_size
            why = "it is empty (0 bytes)" if size == 0 else f"not a torch zip archive ({size} bytes; a copy cut short?)"
            raise ValueError(f"checkpoint {str(path)!r} is corrupt or unreadable: {why}") from None
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "gsae" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} is not a gsae checkpoint (no 'gsae' section)")
    return ckpt


def saved_step(path: str | Path) -> int:
    """The global step a gsae checkpoint holds (its tensors mapped, not read); one-line ``ValueError`` if unreadable."""
    return int(read_checkpoint(path, mmap=True).get("global_step", 0))


def checkpoint_members(ckpt: dict) -> list[str] | None:
    """The member names of a sweep checkpoint (``gsae.systems.SweepSAESystem``); ``None`` for a one-SAE checkpoint."""
    members = ckpt["gsae"].get("members")
    return list(members) if members is not None else None


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    member: str | None = None,
    ckpt: dict | None = None,
    mmap: bool = False,
) -> tuple[SparseAutoencoder, dict]:
    """``(sae, meta)`` from a gsae Lightning checkpoint, without Lightning or the LM.

    A sweep checkpoint holds several SAEs: ``member`` names the one to load (its ``meta`` is shaped like a
    one-SAE checkpoint's, plus ``member``); :func:`load_members` loads them all. ``mmap``: only this SAE's
    tensors are read from disk (not the other members' or the optimizer state, ~3x the weights with Adam)."""
    ckpt = read_checkpoint(path, map_location, mmap=mmap) if ckpt is None else ckpt
    members = checkpoint_members(ckpt)
    if members is None:
        if member is not None:
            raise ValueError(f"checkpoint {str(path)!r} holds one SAE, not a sweep: no member {member!r}")
        meta, prefix = ckpt["gsae"], "sae."
    else:
        if member not in members:
            raise ValueError(f"checkpoint {str(path)!r} is a sweep of {len(members)} SAEs ({', '.join(members)}); "
                             f"name one of them (got {member!r})")
        meta, prefix = ckpt["gsae"]["members"][member], f"members.{member}.sae."
    sae = build_sae(meta)
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match its SAE config: {str(e).splitlines()[0]}") from None
    return sae, meta


def load_members(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, tuple[SparseAutoencoder, dict]]:
    """``{member: (sae, meta)}`` of a checkpoint: every member of a sweep, or ``{"": (sae, meta)}`` for one SAE."""
    ckpt = read_checkpoint(path, map_location, mmap=mmap)
    members = checkpoint_members(ckpt)
    if members is None:
        return {"": load_checkpoint(path, ckpt=ckpt)}
    return {m: load_checkpoint(path, member=m, ckpt=ckpt) for m in members}
