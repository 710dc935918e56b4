"""A step-based progress bar: ``step 120/200`` with tokens/s, loss, nmse, L0 and dead fraction.

An SAE trains on an endless token stream, so Lightning's epoch bar (``Epoch 0/-2 … v_num``) says nothing.
This bar counts optimizer steps up to ``--trainer.max_steps`` and shows the training numbers of
:meth:`gsae.systems.SAESystem._log_train` (``train/loss``, ``train/nmse``, ``train/l0``,
``train/dead_fraction``; ``train/kl`` for e2e, ``train/beta_attribution_median`` for g-SAEs), refreshed
every ``--trainer.log_every_n_steps``, so the console and TensorBoard show the same steps. When stdout is
not a terminal (CI, SLURM, ``> train.log``) it writes the same numbers as one plain line per refresh
instead of redrawing a bar, and a line after each validation.

The bar writes to stdout itself (as tqdm and Lightning's bars do): it is the console, not a log record.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override

#: ``(metric key, label, format)`` shown on the bar, in this order; missing keys are skipped. A key ending in ``/``
#: shows the sum of the metrics under it (e2e's downstream MSE, one per hook: most of an e2e+ds loss).
TRAIN_FIELDS = (
    ("train/loss", "loss", "{:.4g}"),
    ("train/nmse", "nmse", "{:.4f}"),
    ("train/l0", "L0", "{:.1f}"),
    ("train/dead_fraction", "dead", "{:.1%}"),
    ("train/kl", "kl", "{:.4g}"),
    ("train/ds_mse/", "ds_mse", "{:.4g}"),
    ("train/beta_attribution_median", "β·attr", "{:.3g}"),
)
VAL_FIELDS = (
    ("val/loss", "loss", "{:.4g}"),
    ("val/nmse", "nmse", "{:.4f}"),
    ("val/explained_variance", "expl.var", "{:.4f}"),
    ("val/l0", "L0", "{:.1f}"),
    ("val/kl", "kl", "{:.4g}"),
    ("val/ds_mse/", "ds_mse", "{:.4g}"),
)


def format_count(x: float) -> str:
    """``12345 -> '12.3k'``, ``4.2e6 -> '4.20M'`` (3 significant digits)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def metric_fields(metrics: dict[str, Any], fields=TRAIN_FIELDS) -> list[tuple[str, str]]:
    """``[(label, formatted value)]`` of the ``fields`` present and finite in ``metrics``."""
    out = []
    for key, label, fmt in fields:
        under = [float(v) for k, v in metrics.items() if k.startswith(key)] if key.endswith("/") else []
        if key in metrics or under:
            v = sum(under) if under else float(metrics[key])
            out.append((label, fmt.format(v) if math.isfinite(v) else str(v)))
    return out


class StepProgressBar(ProgressBar):
    """Optimizer steps out of ``max_steps`` with the training metrics; plain lines when stdout is not a terminal."""

    def __init__(self, plain: bool | None = None, bar_width: int = 20) -> None:
        """The default progress display of ``train.py``.

        Args:
            plain: write one line of metrics per ``log_every_n_steps`` instead of a redrawn bar; None: plain
                exactly when stdout is not a terminal.
            bar_width: width of the bar in characters (terminal mode).
        """
        super().__init__()
        if bar_width < 0:
            raise ValueError(f"StepProgressBar.bar_width must be >= 0 (got {bar_width})")
        self.plain = plain
        self.bar_width = bar_width
        self.stream: IO[str] = sys.stdout
        self._enabled = True
        self._bar: str | None = None  # the bar line last drawn (terminal mode), None in plain mode
        self._postfix = ""
        self._t0 = self._t_last = 0.0
        self._pace0: float | None = None
        self._t_end: float | None = None  # end of this bar's last on_train_batch_end
        self._validated = False
        self._step0 = 0
        self._step_shown = 0  # the optimizer step of the last batch shown: one line or redraw per step
        self._tokens_last: float | None = None
        self._rate: float | None = None

    # ------------------------------------------------------------------ ProgressBar API
    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        self._write(sep.join(map(str, args)))

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stream = sys.stdout  # read here, not at import: tests and redirections replace it
        self._t0 = self._t_last = time.perf_counter()
        self._pace0 = None  # the first step's start: what ran before it (a resume's redone evaluation) is
        # no step's time, so the eta's pace leaves it out
        self._step0 = self._step_shown = trainer.global_step
        self._tokens_last, self._rate, self._t_end = None, None, None
        self._bar = None if not self._enabled or self._plain() else ""
        if self._bar is not None:
            for handler in console_log_handlers():  # a log record clears the bar first (it is redrawn at the next step)
                handler.addFilter(self._clear_for_log)
            self._redraw(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        step, total = trainer.global_step, self._total(trainer)
        if step == self._step_shown:  # a batch accumulated for the next optimizer step (accumulate_grad_batches)
            return
        self._step_shown = step
        every = max(int(trainer.log_every_n_steps or 1), 1)
        refresh = step % every == 0 or step == total or step == self._step0 + 1
        if refresh:
            self._measure_rate(trainer)
        if self._bar is not None:
            if refresh:
                self._postfix = self.describe(trainer, with_step=False)
            self._redraw(trainer)
        elif refresh:
            self._write(self.describe(trainer))
        self._t_end = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """tokens/s counts training only: drop the time since the last step if it validated or checkpointed (and
        evaluated) in between, all of which run after this bar's ``on_train_batch_end``."""
        if self._pace0 is None:
            self._pace0 = time.perf_counter()
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None) == trainer.global_step
        if self._t_end is not None and (saved or self._validated):
            self._t_last += time.perf_counter() - self._t_end
        self._validated = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = True
        if not self._enabled or trainer.sanity_checking:
            return
        fields = metric_fields(trainer.callback_metrics, VAL_FIELDS)
        if fields:
            self._write(f"val    step {trainer.global_step}  " + "  ".join(f"{k} {v}" for k, v in fields))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    # ------------------------------------------------------------------ text
    def describe(self, trainer: pl.Trainer, with_step: bool = True) -> str:
        """``step 120/200  tokens/s 12.3k  loss 0.0123  nmse 0.1234  L0 16.0  dead 0.0%  elapsed 0:00:12  eta 0:00:08``
        (the time left at this run's pace so far; a redirected log's lines, as the bar shows it)."""
        parts = []
        if with_step:
            total = self._total(trainer)
            parts.append(f"step {trainer.global_step}/{total if total else '?'}")
        if self._rate is not None:
            parts.append(f"tokens/s {format_count(self._rate)}")
        parts += [f"{k} {v}" for k, v in metric_fields(trainer.callback_metrics)]
        if with_step:
            elapsed = time.perf_counter() - self._t0
            parts.append(f"elapsed {format_duration(elapsed)}")
            eta = self._eta(trainer, elapsed)
            if eta is not None:
                parts.append(f"eta {format_duration(eta)}")
        return "  ".join(parts)

    def _eta(self, trainer: pl.Trainer, elapsed: float) -> float | None:
        """Seconds left to ``max_steps`` at the pace of this process's steps so far, from its first step's start
        (``None``: no end, or no step)."""
        total, step = self._total(trainer), trainer.global_step
        done = step - self._step0
        if self._pace0 is not None:
            elapsed = time.perf_counter() - self._pace0
        return elapsed / done * (total - step) if total and done > 0 else None

    def _measure_rate(self, trainer: pl.Trainer) -> None:
        """Tokens per second since the previous refresh (from ``train/tokens_seen``; else ``train/tokens_per_s``)."""
        metrics, now = trainer.callback_metrics, time.perf_counter()
        if "train/tokens_seen" in metrics:
            seen = float(metrics["train/tokens_seen"])
            if self._tokens_last is not None and now > self._t_last and seen > self._tokens_last:
                self._rate = (seen - self._tokens_last) / (now - self._t_last)
            elif "train/tokens_per_s" in metrics:
                self._rate = float(metrics["train/tokens_per_s"])
            self._tokens_last, self._t_last = seen, now
        elif "train/tokens_per_s" in metrics:
            self._rate = float(metrics["train/tokens_per_s"])

    def _plain(self) -> bool:
        if self.plain is not None:
            return self.plain
        isatty = getattr(self.stream, "isatty", None)
        return not (isatty is not None and isatty())

    @staticmethod
    def _total(trainer: pl.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def _redraw(self, trainer: pl.Trainer) -> None:
        """Rewrite the bar line in place: ``step 120/200 ━━━━━━──── 0:00:12<0:00:08  tokens/s … loss …``."""
        step, total = trainer.global_step, self._total(trainer)
        elapsed = time.perf_counter() - self._t0
        head = f"step {step}/{total if total else '?'}"
        if total:
            filled = round(self.bar_width * min(step / total, 1.0))
            eta = self._eta(trainer, elapsed)
            bar = "━" * filled + "─" * (self.bar_width - filled) if self.bar_width else ""
            head += f" {bar} {format_duration(elapsed)}<{format_duration(eta) if eta is not None else '?'}"
        else:
            head += f" {format_duration(elapsed)}"
        # cut to the terminal's width: a wrapped line is not redrawn by "\r" (each refresh left a stale row)
        line = f"{head}  {self._postfix}".rstrip()[: max(shutil.get_terminal_size((120, 24)).columns - 1, 20)]
        self.stream.write("\r" + line.ljust(len(self._bar)))
        self.stream.flush()
        self._bar = line

    def _write(self, line: str) -> None:
        if self._bar:  # clear the bar, write the line, redraw the bar below it
            self.stream.write("\r" + " " * len(self._bar) + "\r" + line + "\n" + self._bar)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _clear_for_log(self, record: logging.LogRecord) -> bool:
        """A filter on the console's log handlers: before a record is written (gsae's "evaluated …", Lightning's
        "`Trainer.fit` stopped …"), clear the bar's line, so the record starts a line of its own instead of being
        glued to the bar. Lets every record through."""
        if self._bar:
            self.stream.write("\r" + " " * len(self._bar) + "\r")
            self.stream.flush()
            self._bar = ""
        return True

    def _close(self) -> None:
        for handler in console_log_handlers():
            handler.removeFilter(self._clear_for_log)
        if self._bar is not None:
            if self._bar:
                self.stream.write("\n")
                self.stream.flush()
            self._bar = None


def console_log_handlers() -> list[logging.Handler]:
    """The log handlers that write to the terminal: the root logger's (``train.py``'s ``basicConfig``) and Lightning's
    own (its loggers do not propagate)."""
    names = ("", "lightning.pytorch", "lightning.fabric", "lightning")
    return [h for n in names for h in logging.getLogger(n).handlers if isinstance(h, logging.StreamHandler)]
