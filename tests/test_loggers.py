"""gsae's TensorBoard logger writes what Lightning's writes (less ``epoch`` and ``hp_metric``), as one event per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from gsae.loggers import TensorBoardLogger, curves_first


def _read(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's ``(step, value)`` list of the run in ``folder``."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


CALLS = [
    ({"train/loss": 0.123456789, "train/l0": 32, "lr": torch.tensor(3e-4), "train/nmse": torch.tensor([0.25]),
      "train/flag": True, "train/np": np.float32(1.5), "epoch": 0}, 9),
    ({"train/loss": float("nan"), "pair": {"a": 1.0, "b": 2.0}, "train/l0": torch.tensor(31, dtype=torch.int64)}, 19),
]


@pytest.mark.parametrize("prefix", ["", "sae"])
def test_scalars_match_lightnings_logger(tmp_path, prefix):
    ours = TensorBoardLogger(str(tmp_path), name="ours", prefix=prefix)
    ref = LightningTensorBoardLogger(str(tmp_path), name="ref", prefix=prefix, default_hp_metric=False)
    for metrics, step in CALLS:
        ours.log_metrics(metrics, step)
        ref.log_metrics(metrics, step)
    ours.finalize("success")
    ref.finalize("success")
    got = _read(tmp_path / "ours" / "version_0")
    want = _read(tmp_path / "ref" / "version_0")
    want = {k: v for k, v in want.items() if not k.endswith("epoch")}  # dropped (an SAE run has one epoch)
    assert set(got) == set(want) and got.keys() >= {f"{prefix}-train/loss" if prefix else "train/loss"}
    for tag in want:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], tag
        np.testing.assert_array_equal([v for _, v in got[tag]], [v for _, v in want[tag]], err_msg=tag)  # NaN == NaN


def test_one_call_is_one_event(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    logger.log_metrics({f"train/m{i}/nmse": i / 7 for i in range(140)}, step=3)
    logger.finalize("success")
    assert len(_read(tmp_path / "run" / "version_0")) == 140
    (events,) = list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))
    summaries = [e for e in EventFileLoader(str(events)).Load() if e.HasField("summary")]
    assert len(summaries) == 1 and len(summaries[0].summary.value) == 140 and summaries[0].step == 3


def test_unsupported_values_fail_as_in_lightning(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with pytest.raises(ValueError, match="not supported"):
        logger.log_metrics({"train/loss": 1.0, "train/text": "abc"}, step=0)


def test_curves_first_converts_lightnings_logger(tmp_path):
    (lg,) = loggers = [LightningTensorBoardLogger(str(tmp_path), name="run")]
    curves_first(loggers)
    assert type(lg) is TensorBoardLogger
    lg.log_metrics({"train/loss": 1.0, "epoch": 0, "hp_metric": -1}, step=0)
    lg.finalize("success")
    assert set(_read(tmp_path / "run" / "version_0")) == {"train/loss"}
