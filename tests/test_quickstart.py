"""The quickstart configs run through the real CLI and write checkpoints, SAELens exports and TensorBoard curves."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsae.cli import main

TRAIN_TAGS = {
    "train/mse", "train/nmse", "train/explained_variance", "train/l0", "train/dead_fraction",
    "train/aux_loss", "lr", "train/tokens_seen", "train/tokens_per_s",
}
VAL_TAGS = {"val/mse", "val/nmse", "val/explained_variance", "val/l0"}
EXTRA = {"topk": set(), "gsae": {"train/beta_attribution_median"}, "e2e": {"train/kl", "val/kl"}}


@pytest.mark.parametrize("name", ["topk", "gsae", "e2e"])
def test_quickstart_config_trains_and_writes_everything(tmp_path, name):
    args = [
        "--config", f"configs/quickstart/{name}.yaml",
        "--trainer.max_steps", "20",
        "--trainer.val_check_interval", "10",
        "--trainer.log_every_n_steps", "2",
        "--checkpoint.every_n_train_steps", "10",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]
    assert main(args) == 0
    run = tmp_path / f"quickstart-{name}"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["epoch=0-step=10.ckpt", "epoch=0-step=20.ckpt", "last.ckpt"]
    for c in ckpts:
        export = run / "checkpoints" / (Path(c).stem + ".saelens")
        assert (export / "cfg.json").exists() and (export / "sae_weights.safetensors").exists()
    (events,) = list(run.glob("version_0/events.out.tfevents.*"))
    assert (run / "version_0" / "config.yaml").exists()
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    missing = (TRAIN_TAGS | VAL_TAGS | EXTRA[name]) - tags
    assert not missing, f"missing TensorBoard tags: {sorted(missing)}"
    ev = [e.value for e in acc.Scalars("train/explained_variance")]
    assert ev[-1] > ev[0], "the SAE should be learning"
