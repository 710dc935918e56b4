"""Start an SAE's training from another SAE's weights (``--model.init_from``; a sweep member's ``init_from``).

Fine-tuning recipes start from a trained SAE instead of a random one: a local TopK SAE trained on end to end (Braun et
al.'s e2e objective as a fine-tune), a TopK SAE turned into a g-SAE, an SAE trained on more tokens or at a lower
learning rate. The source is

- a gsae checkpoint (``run/checkpoints/last.ckpt``; one member of a sweep checkpoint as ``CKPT:MEMBER``),
- a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``: gsae's ``*.saelens`` exports, SAELens'
  ``save_model`` output), architectures ``standard`` (ReLU) and ``topk`` with ``normalize_activations: none``,
- ``sae_lens:RELEASE/SAE_ID``, a pretrained SAELens SAE (from the local Hugging Face cache when offline).

Only the four tensors are taken (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``); the optimizer, LR schedule, dead-latent
counters and step count start fresh, and the system's ``b_dec_init`` is skipped (the loss scale is still measured on
the first batch). The SAE configured for the run (its class, ``k``, β, ...) is kept: the source must have its
``d_in`` and ``d_sae``. Two conversions keep the source's reconstruction where the two SAEs' forms differ:

- **b_dec before the encoder.** TopK SAEs encode ``(x − b_dec) W_enc + b_enc``, ReLU SAEs (Braun et al.'s, SAELens'
  with ``apply_b_dec_to_input: false``) ``x W_enc + b_enc``: ``b_enc`` absorbs ``b_dec W_enc`` when only one does.
- **Unit-norm decoder rows.** A run that keeps the rows at unit norm (TopK's ``unit_norm_decoder``, the ReLU SAE's
  normalised forward) gets the source's rows normalised and each row's norm folded into its encoder column and
  ``b_enc`` entry. That is exact for ReLU SAEs (``relu(n·z) = n·relu(z)``); for a TopK SAE whose source rows are not
  unit norm it changes which latents rank top (a warning gives the norms' range); gsae's SAEs have unit rows already.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gsae.sae.base import SparseAutoencoder
from gsae.saelens_adapter import PRETRAINED, is_saelens_folder, load_saelens_folder, load_saelens_pretrained

#: SAELens architectures whose encoder and decoder are the four tensors (JumpReLU's thresholds, gated SAEs' gate
#: weights and transcoders would be lost or mean something else)
SAELENS_ARCHITECTURES = ("standard", "topk")


@dataclass
class SourceWeights:
    """What an SAE was: its tensors (float32, CPU), the dictionary its forward decodes with, its hook and form."""

    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor  # (d_sae,)
    W_dec: Tensor  # (d_sae, d_in): the dictionary the forward uses (a ReLU SAE's normalised rows)
    b_dec: Tensor  # (d_in,)
    subtracts_b_dec: bool  # whether its encoder reads x − b_dec
    hook: str | None
    about: str  # for messages: "checkpoint 'x.ckpt' (TopKSAE, d_sae 1024)"

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]


def _f32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def _split_member(spec: str) -> tuple[str, str | None]:
    """``("x.ckpt", "member")`` for ``x.ckpt:member``; ``(spec, None)`` otherwise (a path that exists as given wins)."""
    if Path(spec).exists() or ".ckpt:" not in spec:
        return spec, None
    path, _, member = spec.rpartition(":")
    return path, member


def read_source(spec: str, option: str) -> SourceWeights:
    """The weights ``spec`` names (see the module docstring); a one-line ``ValueError`` naming ``option`` otherwise."""
    spec = str(spec)
    try:
        if spec.startswith(PRETRAINED):
            adapter, meta = load_saelens_pretrained(spec)
            return _from_saelens(adapter.sl, meta["hook"], repr(spec))
        path, member = _split_member(spec)
        p = Path(path)
        if p.is_dir():
            if not is_saelens_folder(p):
                raise ValueError(f"{path!r} is a folder without cfg.json and sae_weights.safetensors (not a SAELens "
                                 "SAE); give a checkpoint (.ckpt), a .saelens folder or sae_lens:RELEASE/SAE_ID")
            adapter, meta = load_saelens_folder(p)
            return _from_saelens(adapter.sl, meta["hook"], f"SAELens folder {path!r}")
        if not p.exists():
            raise ValueError(f"no file or folder {path!r}")
        from gsae.export import checkpoint_members, load_checkpoint, read_checkpoint

        ckpt = read_checkpoint(p, mmap=True)
        members = checkpoint_members(ckpt)
        if members is not None and member is None:
            raise ValueError(f"{path!r} is a sweep of {len(members)} SAEs: name one as {path}:MEMBER "
                             f"({', '.join(members)})")
        sae, meta = load_checkpoint(p, member=member, ckpt=ckpt)
        what = f"{path}:{member}" if member else path
        return SourceWeights(
            _f32(sae.W_enc), _f32(sae.b_enc), _f32(sae.decoder_weight()), _f32(sae.b_dec), sae.subtracts_b_dec,
            meta.get("hook"), f"checkpoint {what!r} ({type(sae).__name__}, d_sae {sae.d_sae})",
        )
    except ValueError as e:
        text = str(e)
        raise ValueError(text if text.startswith(option) else f"{option}: {text}") from None


def _from_saelens(sl, hook: str | None, about: str) -> SourceWeights:
    cfg = sl.cfg
    arch = cfg.architecture()
    if arch not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{about} is a {arch!r} SAE: only {' and '.join(SAELENS_ARCHITECTURES)} SAEs start a gsae "
                         "SAE (their encoder and decoder are W_enc, b_enc, W_dec, b_dec)")
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{about} has normalize_activations={norm!r}: its weights read rescaled activations, which a "
                         "gsae SAE does not rescale")
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        raise ValueError(f"{about} has rescale_acts_by_decoder_norm: its latents are scaled by decoder norms, which a "
                         "gsae SAE does not do")
    return SourceWeights(
        _f32(sl.W_enc), _f32(sl.b_enc), _f32(sl.W_dec), _f32(sl.b_dec), bool(cfg.apply_b_dec_to_input), hook,
        f"{about} ({arch}, d_sae {int(cfg.d_sae)})",
    )


def converted(src: SourceWeights, sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The source's tensors in ``sae``'s form (module docstring): ``{W_enc, b_enc, W_dec, b_dec}``, float32."""
    W_enc, b_enc, W_dec, b_dec = src.W_enc.clone(), src.b_enc.clone(), src.W_dec.clone(), src.b_dec.clone()
    if src.subtracts_b_dec != sae.subtracts_b_dec:  # pre = x W + (b_enc − [source] b_dec W + [target] b_dec W)
        shift = b_dec @ W_enc
        b_enc += shift if sae.subtracts_b_dec else -shift
    norms = W_dec.norm(dim=1).clamp_min(1e-12)
    unit = sae.unit_norm_decoder or sae.decoder_weight() is not sae.W_dec  # rows kept unit, or normalised in forward
    if unit and (norms - 1).abs().max() > 1e-5:  # unit rows already (a gsae source): copied exactly
        W_dec /= norms[:, None]
        W_enc *= norms
        b_enc *= norms
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def warm_start(sae: SparseAutoencoder, spec: str, hook: str, option: str) -> str:
    """Copy ``spec``'s weights into ``sae`` (converted to its form); returns a one-line account for the log.
    One-line ``ValueError``\\ s name ``option`` for an unreadable source or other sizes; a source read at another
    hook, or whose decoder norms a TopK SAE changes, gives a warning."""
    src = read_source(spec, option)
    if (src.d_in, src.d_sae) != (sae.d_in, sae.d_sae):
        raise ValueError(f"{option}: {src.about} has d_in {src.d_in} and d_sae {src.d_sae}; this run's SAE has d_in "
                         f"{sae.d_in} and d_sae {sae.d_sae}")
    if src.hook and src.hook != hook:
        warnings.warn(f"{option}: {src.about} was trained at {src.hook}; this run reads {hook}", stacklevel=2)
    norms = src.W_dec.norm(dim=1)
    if sae.unit_norm_decoder and not torch.allclose(norms, torch.ones_like(norms), atol=1e-3) and hasattr(sae, "k"):
        warnings.warn(f"{option}: {src.about}: its decoder rows have norms {float(norms.min()):.3g}–{float(norms.max()):.3g}"
                      "; this run keeps them at 1, so each norm moves into its encoder column and TopK ranks the latents "
                      "by those products", stacklevel=2)
    weights = converted(src, sae)
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    return f"{option}: started from {src.about}"
