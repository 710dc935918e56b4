"""SAELens SAEs behind gsae's :class:`~gsae.sae.base.SparseAutoencoder` interface, so every benchmark and
``evaluate.py`` can measure them: a folder in SAELens format (``cfg.json`` + ``sae_weights.safetensors``,
e.g. our own ``<name>.saelens/`` exports) or a pretrained release (``sae_lens:RELEASE/SAE_ID``).

The adapter delegates ``encode``/``decode`` to SAELens, so any architecture SAELens implements (``standard``
ReLU, ``topk``, ``jumprelu``, ``gated``, ...) and its input normalisation (``normalize_activations``)
behave exactly as in SAELens. Latents are dense. SAELens has no gradient-aware selection: a g-SAE
exported to SAELens format encodes as its β = 0 TopK (see :mod:`gsae.export`).

Input normalisation: with ``normalize_activations`` ``layer_norm`` or ``constant_norm_rescale`` (the OpenAI v5
GPT-2 family) SAELens scales the input per token in ``encode`` and undoes it in ``decode`` with the statistics
of the last ``encode``. Decoding a code that did not come from an ``encode`` (``plateaus``' synthetic activations)
therefore needs the activation whose statistics to undo: ``decode(latents, like=x)`` /
``decode_sparse(acts, idx, like=x)``; without ``like`` such an SAE raises rather than decoding in the wrong scale.
The folder's ``prepend_bos`` (False for OpenAI v5) is in ``meta`` for the evaluation tokens.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from gsae.sae.base import SAEOutput, SparseAutoencoder

log = logging.getLogger(__name__)

#: the prefix of a pretrained SAELens SAE's name: ``sae_lens:RELEASE/SAE_ID``
PRETRAINED = "sae_lens:"
#: ``LanguageModel`` options that SAELens' ``model_from_pretrained_kwargs`` can set.
_LM_KEYS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
#: SAELens ``normalize_activations`` values whose decode depends on the input's own statistics.
PER_TOKEN_NORMS = ("layer_norm", "constant_norm_rescale")


class SAELensAdapter(SparseAutoencoder):
    """A ``sae_lens.SAE`` with gsae's SAE interface: ``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)``, ``b_enc``,
    ``b_dec``, ``encode``, ``decode`` and ``forward(x, grad=None) -> SAEOutput`` (dense ``latents``).

    SAELens decoder rows need not have unit norm; the benchmarks normalise them where they need directions.
    """

    unit_norm_decoder = False

    def __init__(self, sae) -> None:
        """Wrap a loaded SAELens SAE.

        Args:
            sae: a ``sae_lens.SAE`` instance (any architecture).
        """
        nn.Module.__init__(self)  # parameters live in the wrapped SAE, not in SparseAutoencoder's
        out_hook = getattr(sae.cfg.metadata, "hook_name_out", None)
        d_out = getattr(sae.cfg, "d_out", None)
        if "transcoder" in sae.cfg.architecture() or out_hook or (d_out is not None and d_out != sae.cfg.d_in):
            writes = f", writes {out_hook}" if out_hook else ""
            raise ValueError(
                f"a {sae.cfg.architecture()} (reads {sae.cfg.metadata.hook_name}{writes}) predicts another activation "
                "than it reads: the benchmarks splice an SAE's reconstruction of its own hook, so they do not apply")
        self.sl = sae
        self.d_in = int(sae.cfg.d_in)
        self.d_sae = int(sae.cfg.d_sae)
        hook = sae.cfg.metadata.hook_name or ""
        if hook.endswith("hook_z") and hasattr(sae, "turn_off_forward_pass_hook_z_reshaping"):
            sae.turn_off_forward_pass_hook_z_reshaping()  # our activations are already (B, T, n_heads·d_head)

    @property
    def W_enc(self) -> Tensor:  # noqa: N802 - the SAE vocabulary (STYLE §6)
        return self.sl.W_enc

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self.sl.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.sl.b_dec

    @property
    def b_enc(self) -> Tensor:
        """``b_enc``, or the gate bias of gated SAEs, or zeros for architectures without one."""
        for name in ("b_enc", "b_gate"):
            if isinstance(getattr(self.sl, name, None), Tensor):
                return getattr(self.sl, name)
        return torch.zeros(self.d_sae, dtype=self.sl.W_dec.dtype, device=self.sl.W_dec.device)

    @property
    def architecture(self) -> str:
        return f"saelens:{self.sl.cfg.architecture()}"

    def config(self) -> dict:
        return self.sl.cfg.to_dict()

    @property
    def normalizes_per_token(self) -> bool:
        """Whether SAELens rescales each input by its own statistics (decode then needs them)."""
        return getattr(self.sl.cfg, "normalize_activations", "none") in PER_TOKEN_NORMS

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """Dense latents ``(N, d_sae)`` from SAELens' ``encode`` (``grad`` is ignored)."""
        latents = self.sl.encode(x.to(self.sl.W_dec.dtype))
        return latents.to_dense() if latents.is_sparse else latents

    def decode(self, latents: Tensor, like: Tensor | None = None) -> Tensor:
        """SAELens' ``decode`` (output de-normalisation included); ``like (N, d_in)``: the activations whose
        normalisation statistics to undo (needed for ``layer_norm``/``constant_norm_rescale`` SAEs unless the
        latents come from the ``encode`` just before)."""
        if like is not None:
            self.sl.run_time_activation_norm_fn_in(like.to(self.sl.W_dec.dtype))  # sets the statistics decode undoes
        elif self.normalizes_per_token and not any(hasattr(self.sl, a) for a in ("ln_mu", "x_norm_coeff")):
            raise ValueError(
                f"SAELens SAE with normalize_activations={self.sl.cfg.normalize_activations!r}: decoding a code needs "
                "the activations it stands for (decode(latents, like=x))"
            )
        return self.sl.decode(latents.to(self.sl.W_dec.dtype))

    def decode_sparse(self, top_acts: Tensor, top_idx: Tensor, like: Tensor | None = None) -> Tensor:
        """``decode`` of the code ``(top_acts, top_idx)`` (scattered to dense: SAELens decodes dense latents)."""
        dense = top_acts.new_zeros(top_acts.shape[0], self.d_sae, dtype=self.sl.W_dec.dtype)
        dense.scatter_add_(-1, top_idx, top_acts.to(dense.dtype))
        return self.decode(dense, like=like)

    def forward(self, x: Tensor, grad: Tensor | None = None, dead_mask: Tensor | None = None) -> SAEOutput:
        """``SAEOutput`` with dense ``latents``; ``pre_acts`` holds the latents too (SAELens exposes no
        architecture-independent pre-activation); no auxiliary losses."""
        latents = self.encode(x)
        x_hat = self.decode(latents).to(x.dtype)
        zero = x_hat.new_zeros(())
        return SAEOutput(x_hat, None, None, latents, latents.detach(), zero, zero)


def is_saelens_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file()


def lm_kwargs(metadata: dict, model: str | None = None) -> dict:
    """``LanguageModel`` kwargs for an SAE's ``model_name`` and ``model_from_pretrained_kwargs``.

    Flags SAELens does not set default to False: SAELens evaluates with
    ``HookedTransformer.from_pretrained_no_processing(**model_from_pretrained_kwargs)`` (SPEC §0, §6).
    """
    name = model or metadata.get("model_name")
    if not name:
        raise ValueError("the SAE's cfg.json names no model (metadata.model_name); pass --model")
    mfpk = metadata.get("model_from_pretrained_kwargs") or {}
    return {"name": name, **{k: bool(mfpk.get(k, False)) for k in _LM_KEYS}}


def load_saelens_folder(path: str | Path, device: str = "cpu", model: str | None = None) -> tuple[SAELensAdapter, dict]:
    """``(adapter, meta)`` for a SAELens-format folder; ``meta`` has ``hook``, ``lm`` and ``context_size``."""
    from sae_lens import SAE

    try:
        cfg = json.loads((Path(path) / "cfg.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"SAELens folder {str(path)!r}: cfg.json does not read as JSON: {_first_line(e)}") from None
    where = f"SAELens folder {str(path)!r}"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: cfg.json holds a {type(cfg).__name__}, not a mapping of SAE options")
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg
    if not metadata.get("hook_name"):
        raise ValueError(f"{where}: cfg.json names no hook_name (the activation the SAE reads)")
    if metadata.get("hook_head_index") is not None:
        raise ValueError(f"{where}: a single-head SAE (hook_head_index {metadata['hook_head_index']}): the benchmarks "
                         "splice an SAE over its hook's whole activation, so they do not apply")
    k, d_sae = cfg.get("k"), cfg.get("d_sae")
    if isinstance(k, int) and isinstance(d_sae, int) and k > d_sae:
        raise ValueError(f"{where}: cfg.json has k {k} > d_sae {d_sae}")
    dropped = sorted(set(metadata.get("model_from_pretrained_kwargs") or {}) - set(_LM_KEYS))
    if dropped:
        log.warning("%s: model_from_pretrained_kwargs not applied: %s (of these, gsae's LanguageModel takes %s only)",
                    where, ", ".join(dropped), ", ".join(_LM_KEYS))
    try:
        with warnings.catch_warnings():  # "load the model with these model_from_pretrained_kwargs": lm_kwargs does
            warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
            sae = SAE.load_from_disk(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - any unreadable folder is reported the same way
        from sae_lens.registry import SAE_CLASS_REGISTRY

        arch = cfg.get("architecture")
        if isinstance(e, KeyError) and arch is not None and arch not in SAE_CLASS_REGISTRY:  # SAELens' bare KeyError
            raise ValueError(f"{where}: cfg.json architecture {arch!r} is not one SAELens {_saelens_version()} knows "
                             f"({', '.join(sorted(SAE_CLASS_REGISTRY))})") from None
        raise ValueError(
            f"SAELens folder {str(path)!r} could not be loaded: {type(e).__name__}: {_first_line(e)}"
        ) from None
    _fold_saved_scaler(sae, Path(path), where)
    try:
        meta = _meta(sae, metadata, model)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return _adapter(sae, where), meta


#: SAELens ``normalize_activations`` values whose scale a training checkpoint keeps beside its weights, unfolded
SAVED_SCALER_NORMS = ("expected_average_only_in", "covariance_whitening")


def _fold_saved_scaler(sae, folder: Path, where: str) -> None:
    """Fold the activation scaler of a SAELens training checkpoint into ``sae``'s weights, as SAELens' trainer does
    at the end of training (a scaling factor, then a whitening), so that it reads raw activations.

    With ``normalize_activations`` ``expected_average_only_in`` or ``covariance_whitening``, SAELens' SAE applies no
    normalisation of its own: its weights read activations that the trainer scaled, and the checkpoint keeps that
    scale in ``activation_scaler.json`` (the whitening in ``activation_whitening.safetensors``) until the final
    save folds it. Evaluated without it, the SAE would read activations in the wrong scale (kl_sae twice the true
    value at a scale of 0.25). A folder with neither is refused in one line."""
    from sae_lens.constants import ACTIVATION_SCALER_CFG_FILENAME
    from sae_lens.training.activation_scaler import ActivationScaler

    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in SAVED_SCALER_NORMS:
        return
    file = folder / ACTIVATION_SCALER_CFG_FILENAME
    if not file.is_file():
        raise ValueError(f"{where}: normalize_activations={norm!r}, and no {ACTIVATION_SCALER_CFG_FILENAME} beside its "
                         "weights: they read activations rescaled by a scale this folder does not hold (a SAELens "
                         "training checkpoint keeps it there; SAELens' final save folds it in)")
    scaler = ActivationScaler()
    try:
        scaler.load(file)
    except Exception as e:  # noqa: BLE001 - a bad scaler file is reported as one line
        raise ValueError(f"{where}: {ACTIVATION_SCALER_CFG_FILENAME} does not read: {type(e).__name__}: "
                         f"{_first_line(e)}") from None
    if norm == "covariance_whitening" and scaler.whitening is None:
        raise ValueError(f"{where}: normalize_activations='covariance_whitening', and no activation_whitening.safetensors "
                         f"beside {ACTIVATION_SCALER_CFG_FILENAME}: the whitening its weights read is not in the folder")
    if norm == "expected_average_only_in" and scaler.scaling_factor is None:
        raise ValueError(f"{where}: normalize_activations='expected_average_only_in', and "
                         f"{ACTIVATION_SCALER_CFG_FILENAME} holds no scaling_factor")
    if scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(float(scaler.scaling_factor))
    if scaler.whitening is not None:
        w = scaler.whitening
        sae.fold_activation_whitening(mean=w.mean, whitening_matrix=w.matrix, unwhitening_matrix=w.inverse_matrix)


def load_saelens_pretrained(spec: str, device: str = "cpu", model: str | None = None) -> tuple[SAELensAdapter, dict]:
    """``(adapter, meta)`` for ``sae_lens:RELEASE/SAE_ID`` (``SAE.from_pretrained``); fails fast offline."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from gsae.lm import _hub_reachable

    release, _, sae_id = spec.removeprefix(PRETRAINED).partition("/")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ValueError(f"{spec!r}: unknown SAELens release {release!r} (see sae_lens/pretrained_saes.yaml)")
    if sae_id not in directory[release].saes_map:
        some = ", ".join(list(directory[release].saes_map)[:4])
        raise ValueError(f"{spec!r}: release {release!r} has no SAE {sae_id!r} (e.g. {some}, ...)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True")
    if not offline and not _hub_reachable():
        raise ValueError(
            f"{spec!r}: the Hugging Face hub is unreachable (set HF_HUB_OFFLINE=1 to use a locally cached copy)"
        )
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:  # noqa: BLE001 - hub, cache and conversion errors are reported the same way
        if offline and type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):  # hub's 200-char text
            raise ValueError(f"{spec!r}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the hub from "
                             "being asked (run once with the network to cache it)") from None
        raise ValueError(f"{spec!r}: could not load: {type(e).__name__}: {_first_line(e)}") from None
    return _adapter(sae, repr(spec)), _meta(sae, sae.cfg.metadata, model)


def _saelens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


def _adapter(sae, where: str) -> SAELensAdapter:
    """:class:`SAELensAdapter` of ``sae``; one that does not apply is refused naming ``where`` it came from."""
    try:
        return SAELensAdapter(sae)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _meta(sae, metadata, model: str | None) -> dict:
    get = metadata.get
    hook = get("hook_name") or sae.cfg.metadata.hook_name
    prepend_bos = get("prepend_bos")
    gsae_data = (get("gsae") or {}).get("data") or {}
    return {
        # a string "false" (a hand-written cfg.json) is False, not bool("false")
        "prepend_bos": True if prepend_bos is None else (prepend_bos.strip().lower() not in ("false", "0", "no")
                                                         if isinstance(prepend_bos, str) else bool(prepend_bos)),
        # the training dataset a gsae export records (e.g. gsae-corpus); not SAELens' dataset_path, often a
        # pre-tokenized copy of OpenWebText under another name (evaluate.py's default for them is OpenWebText)
        "dataset": gsae_data.get("dataset"),
        "dataset_path": get("dataset_path"),  # SAELens' record, named in evaluate.py's error if the default fails
        "hook": hook,
        "lm": lm_kwargs(
            {"model_name": get("model_name"), "model_from_pretrained_kwargs": get("model_from_pretrained_kwargs")},
            model,
        ),
        "context_size": get("context_size"),
        "batch_size": gsae_data.get("batch_size"),  # a gsae export's training batch (contexts per device)
        "data_options": gsae_data,  # what else decides its run's held-out contexts (evaluate.recorded_token_options)
        "sae_class": (get("gsae") or {}).get("sae_class"),  # a gsae export's own class (a g-SAE's encodes as TopK here)
    }


def _first_line(e: BaseException) -> str:
    """The error's first line, with the next one where it only announces them (torch's ``Error(s) in loading
    state_dict for TopKSAE:`` says which keys or shapes on the lines after), at most 300 characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    out = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return out if len(out) <= 300 else out[:297] + "..."
