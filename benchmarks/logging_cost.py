"""What logging a training step's metrics costs: gsae's path against Lightning's ``self.log_dict``, side by side.

A logging step (1 in ``--trainer.log_every_n_steps``, 10 in the shipped configs) hands every metric to Lightning and
TensorBoard: a TopK run ~15 scalars, a 10-member sweep ~140. Through ``LightningModule.log_dict`` each key costs
~0.25 ms of Python (its ``_ResultMetric`` bookkeeping; on a GPU also one host-to-device copy per key and one
``.item()`` back) and Lightning's ``TensorBoardLogger`` writes one event per scalar (~0.06 ms each). gsae's path
(``SAESystem.log_step_metrics``, ``gsae.loggers.TensorBoardLogger``) fills ``trainer.callback_metrics`` and the
loggers directly and writes one event per call; ``tests/systems/test_logging_steps.py`` checks the loggers and
callbacks get the same keys, steps and values.

Two methods per objective, interleaved over ``--rounds`` rounds, each a real ``lightning.Trainer`` fit of ``--steps``
steps on the same tokens with a TensorBoard logger at ``--log-every``:

- ``lightning``: ``log_step_metrics`` replaced by ``self.log_dict(metrics, on_step=True, on_epoch=False,
  rank_zero_only=True)`` (what gsae did before) and Lightning's ``TensorBoardLogger``;
- ``gsae``: the shipped path.

A step is the interval between two ``on_train_batch_start`` callbacks, so a logging step includes Lightning's logger
connector at its end. Printed per objective and method: ``log_step_ms_<obj>_<method>=`` (median logging step minus
median other step: what logging adds to its step), ``mean_step_ms_<obj>_<method>=`` (mean over every step after the
first ``--warmup``: a run's real pace) and ``logging_share_<obj>_<method>=`` (the added time ÷ ``log_every`` ÷ that
mean: the part of a run spent logging), then ``log_step_speedup_<obj>=`` (lightning's added ms ÷ gsae's).
The shape is tiny (``random-tiny``, d_sae 256, 4 × 8 tokens) so that a step's compute does not hide the host cost a
GPU step pays at any size.

Usage::

    python benchmarks/logging_cost.py                  # ~15 s on 2 cores
    python benchmarks/logging_cost.py --device cuda    # on a GPU (benchmarks/gpu.sh)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput as tt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="steps per fit (default 60: 6 logging steps at --log-every 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (every method fits once per round)")
    p.add_argument("--log-every", type=int, default=10, help="--trainer.log_every_n_steps (shipped configs: 10)")
    p.add_argument("--warmup", type=int, default=5, help="steps of each fit not timed")
    p.add_argument("--objectives", nargs="+", default=["topk", "sweep"], choices=["topk", "gsae", "sweep"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (a GPU step at this size is all host time)")
    p.add_argument("--stack", default="auto", choices=["auto", "on", "off"],
                   help="the sweep's --model.stack_members (auto: stacked on a GPU, one by one on the CPU)")
    return p.parse_args(argv)


def fit(system, tokens, log_dir: str, every: int, lightning_path: bool, device: str = "cpu") -> list[float]:
    """Per-step seconds of a fit of ``system`` over ``tokens`` logging to TensorBoard in ``log_dir``."""
    import contextlib
    import io

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
    from torch.utils.data import DataLoader

    from gsae.data.batch import TokenBatch
    from gsae.loggers import TensorBoardLogger

    if lightning_path:
        def log_step_metrics(metrics: dict, console_only=()) -> None:  # gsae's signature, Lightning's bookkeeping
            for keys, to_logger in ((set(metrics) - set(console_only), True), (set(console_only) & set(metrics), False)):
                if keys:
                    system.log_dict({k: metrics[k] for k in keys}, on_step=True, on_epoch=False, rank_zero_only=True,
                                    logger=to_logger)

        system.log_step_metrics = log_step_metrics
        logger = LightningTensorBoardLogger(log_dir, name="run", default_hp_metric=False)
    else:
        logger = TensorBoardLogger(log_dir, name="run")
    timer = tt.StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=tokens.shape[0], logger=logger, log_every_n_steps=every,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[timer],
    )
    data = [TokenBatch(tokens[i], i) for i in range(tokens.shape[0])]
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(system, train_dataloaders=DataLoader(data, batch_size=None, pin_memory=device.startswith("cuda")))
    logger.finalize("success")
    return timer.step_times()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    args = parse_args(argv)
    tt.quiet()
    from gsae.lm import LanguageModel

    targs = tt.parse_args(["--model", "random-tiny", "--hook", "blocks.1.hook_resid_pre", "--d-sae", "256",
                           "--k", "8", "--batch-size", "4", "--context-size", "8", "--device", args.device])
    targs.sweep_ks = [3, 5, 10, 32, 64]
    targs.stack = args.stack
    tt.ARGS = targs
    torch.set_num_threads(targs.threads)
    lm = LanguageModel(targs.model, seed=0)
    lm.model  # noqa: B018 - load now
    lm.to(args.device)
    tokens = tt.make_tokens(args.steps, 4, 8, lm.d_vocab, lm.bos_token_id, 0)
    print(f"# logging cost: random-tiny, {args.steps} steps per fit, log_every_n_steps={args.log_every}, "
          f"{args.rounds} rounds, objectives {args.objectives}")
    methods = ("lightning", "gsae")
    times: dict[tuple[str, str], list[list[float]]] = {(o, m): [] for o in args.objectives for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for obj in args.objectives:
                for m in order:
                    system = tt.build_system(obj, lm, targs)
                    times[(obj, m)].append(fit(system, tokens, f"{tmp}/{obj}-{m}-{r}", args.log_every, m == "lightning",
                                                         args.device))
    for obj in args.objectives:
        added = {}
        for m in methods:
            logging_steps, other, every = [], [], []
            for run in times[(obj, m)]:
                for i, t in enumerate(run):
                    if i < args.warmup or i == len(run) - 1:  # the fit's last step also closes the fit
                        continue
                    every.append(t)
                    (logging_steps if (i + 1) % args.log_every == 0 else other).append(t)
            added[m] = (statistics.median(logging_steps) - statistics.median(other)) * 1e3
            mean = statistics.fmean(every) * 1e3
            print(f"log_step_ms_{obj}_{m}={added[m]:.2f}")
            print(f"mean_step_ms_{obj}_{m}={mean:.2f}")
            print(f"logging_share_{obj}_{m}={added[m] / args.log_every / mean:.3f}")
        if added["gsae"] > 0.05:
            print(f"log_step_speedup_{obj}={added['lightning'] / added['gsae']:.1f}")
        else:  # gsae's logging step is within the noise of a plain step: a ratio would mean nothing
            print(f"log_step_speedup_{obj}=nan  # gsae's logging step costs {added['gsae']:.2f} ms: within the noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
