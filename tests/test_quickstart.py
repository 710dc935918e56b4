"""The quickstart configs run through the real CLI and write checkpoints, SAELens exports and TensorBoard curves."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gsae.cli import main

TRAIN_TAGS = {
    "train/mse", "train/nmse", "train/explained_variance", "train/l0", "train/dead_fraction",
    "train/aux_loss", "lr", "train/tokens_seen", "train/tokens_per_s",
}
VAL_TAGS = {"val/mse", "val/nmse", "val/explained_variance", "val/l0"}
#: What the evaluation callback writes for every checkpoint with the shipped configs (on by default).
EVAL_KEYS = {"loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "latents"}
EXTRA = {"topk": set(), "gsae": {"train/beta_attribution_median"}, "e2e": {"train/kl", "val/kl"}}


@pytest.mark.parametrize("name", ["topk", "gsae", "e2e"])
def test_quickstart_config_trains_and_writes_everything(tmp_path, name, caplog):
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
    with caplog.at_level(logging.INFO, logger="gsae"):
        assert main(args) == 0
    # an evaluation says when it starts (at GPT-2 scale it runs for minutes after the step's line) and how long it took
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluat")]
    assert re.fullmatch(r"evaluating .*loss_added.* at step 10", said[0]), said
    assert re.fullmatch(r"evaluated .*loss_added.* at step 10 in \d+:\d\d:\d\d", said[1]), said
    assert re.fullmatch(r"evaluating .* at step 20 \(the last evaluation took \d+:\d\d:\d\d\)", said[2]), said
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
    check_evaluation(run, ckpts, acc)


def check_evaluation(run: Path, ckpts: list[str], acc: EventAccumulator) -> None:
    """Evaluation is on by default: a JSON with every promised benchmark and a latent dashboard per checkpoint,
    `eval/` scalars, figures for each benchmark and the dashboards as TensorBoard text."""
    for c in ckpts:
        path = run / "checkpoints" / c
        results = json.loads(Path(str(path) + ".eval.json").read_text())["results"]
        assert EVAL_KEYS <= set(results), sorted(results)
        page = Path(str(path) + ".latents.html").read_text()
        assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
        assert len(re.findall(r'class="latent"', page)) >= 16
        assert len(re.findall(r'class="ctx"', page)) >= 16 * 8
    tags = acc.Tags()
    benches = {t.split("/")[1] for t in tags["scalars"] if t.startswith("eval/")}
    assert {"loss_added", "dead_latents", "steering", "sensitive_directions"} <= benches
    figs = {t.split("/")[1] for t in tags["images"] if t.startswith("eval/")}
    assert {"loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "latents"} <= figs, figs
    texts = [t for t in tags.get("tensors", []) if "latents" in t]
    assert len(texts) >= 16, f"latent dashboards as TensorBoard text: {texts[:3]}"
