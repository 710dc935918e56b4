"""End to end: a quickstart run through the CLI with the EvaluationCallback writes one ``.eval.json`` per
checkpoint and TensorBoard figures; ``evaluate.py`` on the run folder prints the table and writes the JSON.
Plus the one-line errors of ``evaluate.py`` and the callback's guards."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gsae.callbacks import EvaluationCallback
from gsae.evaluate import main as evaluate_main
from tests.conftest import quickstart_args

ALL = ["loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry"]
QUICKSTART_HOOK = "blocks.2.hook_resid_post"  # configs/quickstart/topk.yaml
SMALL_OPTIONS = {
    "steering": {"n_latents": 2, "n_positions": 1, "alphas": [0, 50]},
    "sensitive_directions": {"lengths": [1.0, 5.0], "direction_types": ["isotropic"], "substitution": False},
    "decoder_geometry": {"n_per_bin": 3},
}
CALLBACK_YAML = """\
evaluation:
  benchmarks: [loss_added, dead_latents]
  n_seqs: 4
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from gsae.cli import main

    tmp = tmp_path_factory.mktemp("run")
    extra = tmp / "eval.yaml"
    extra.write_text(CALLBACK_YAML)
    args = quickstart_args(tmp, "--config", str(extra), "--checkpoint.every_n_train_steps", "5", steps=10)
    assert main(args) == 0
    return tmp / "quickstart-topk"


@pytest.mark.slow
def test_callback_writes_eval_json_per_checkpoint_and_figures(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=0-step=10.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    for c in ckpts:
        payload = json.loads(Path(str(c) + ".eval.json").read_text())
        assert set(payload["results"]) == {"loss_added", "dead_latents"}
        assert payload["n_seqs"] == 4 and payload["step"] in (5, 10)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(glob.glob(str(run_dir / "version_0" / "events*"))[0], size_guidance={"images": 0})
    ea.Reload()
    assert "eval/dead_latents/density_histogram" in ea.Tags()["images"]
    steps = [e.step for e in ea.Scalars("eval/loss_added/L_added")]
    assert steps == [5, 10]  # once per step, although last.ckpt is saved at the same steps


@pytest.mark.slow
def test_evaluate_cli_on_the_run_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = evaluate_main(
        [
            str(run_dir),
            "--benchmarks",
            ",".join(ALL),
            "--n-seqs",
            "4",
            "--context-size",
            "32",
            "--device",
            "cpu",
            "--options",
            json.dumps(SMALL_OPTIONS),
            "--output",
            str(out),
            "--logdir",
            str(tmp_path / "tb"),
        ]
    )
    assert rc == 0
    written = json.loads(out.read_text())
    res = written["results"]
    assert list(res) == ALL
    labels = list(res["loss_added"])
    assert [Path(lb).name for lb in labels] == ["epoch=0-step=5.ckpt", "epoch=0-step=10.ckpt"]  # last.ckpt deduplicated
    table = capsys.readouterr().out
    assert "loss_added.L_added" in table and "epoch=0-step=10.ckpt" in table
    # what the numbers were computed on is in the file (it held results only) and under the table
    settings = written["settings"]
    assert settings["benchmarks"] == ALL and settings["n_seqs"] == 4 and settings["device"] == "cpu"
    assert settings["options"]["steering"]["alphas"] == [0, 50]
    assert all(settings["versions"][p] for p in ("gsae", "torch", "transformer_lens", "sae_lens")), settings["versions"]
    assert list(settings["saes"]) == labels
    for lb, step in zip(labels, (5, 10)):
        s = settings["saes"][lb]
        assert s["source"] == {"kind": "ckpt", "path": lb, "step": step} and s["lm"] == "gsae-tiny"
        # how the LM was loaded (a SAELens folder's loads without folding or centring: other activations)
        assert {k: s["lm_options"][k] for k in ("fold_ln", "center_writing_weights", "fold_value_biases")} == dict.fromkeys(
            ("fold_ln", "center_writing_weights", "fold_value_biases"), True)
        assert (s["dataset"], s["context_size"], s["prepend_bos"]) == ("gsae-corpus", 32, True)
        assert s["contexts"] == dict.fromkeys(ALL, 4) and s["hook"] == QUICKSTART_HOOK
        assert f"step {step}" in s["about"] and s["sae"]["d_sae"] > s["sae"]["d_in"]
        # the contexts it names are the tokens behind the results: 4 contexts of 32, BOS and end-of-text not counted
        assert 0 < res["loss_added"][lb]["n_tokens"] <= 4 * 31
    assert f"tokens: gsae-corpus, contexts of 32 ({', '.join(f'{b} 4' for b in ALL)})" in table
    assert len(list((tmp_path / "tb").iterdir())) == 1  # one TensorBoard run for the run folder, steps 5 and 10
    # evaluated again into the same --logdir: the new values replace the old at each step, not a second point
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [str(run_dir), "--benchmarks", "loss_added", "--n-seqs", "2", "--context-size", "32", "--device", "cpu",
            "--logdir", str(tmp_path / "tb")]
    assert evaluate_main(args) == 0
    (run,) = (tmp_path / "tb").iterdir()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/loss_added/L_added")] == [5, 10]
    assert [e.step for e in events.Images("eval/loss_added/ce_and_kl")] == [5, 10]
    assert [e.step for e in events.Scalars("eval/dead_latents/alive_fraction")] == [5, 10]  # not evaluated again: kept


@pytest.mark.slow
def test_evaluate_py_on_a_checkpoint_reproduces_its_eval_json(run_dir, tmp_path):
    """The run's evaluation settings (benchmarks, n_seqs, options, seed) are recorded in its checkpoints: evaluate.py
    on a checkpoint, told nothing else, evaluates with them and gives the checkpoint's .eval.json. It used to take its
    own defaults (every benchmark, 64 contexts each), so the run summary's suggested command gave other numbers."""
    from tests.systems.test_ddp_evaluation import _same

    ckpt = run_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    out = tmp_path / "again.json"
    assert evaluate_main([str(ckpt), "--device", "cpu", "--output", str(out)]) == 0
    want = json.loads(Path(str(ckpt) + ".eval.json").read_text())["results"]
    got = {b: per[str(ckpt)] for b, per in json.loads(out.read_text())["results"].items()}
    assert list(got) == ["loss_added", "dead_latents"]
    _same(got, want)
    # its SAELens export records them too: evaluated with the run's settings on the run's data, it gives the same
    # numbers (it took evaluate.py's defaults, 64 contexts per benchmark and every benchmark, and others)
    export = ckpt.with_name(ckpt.stem + ".saelens")
    assert evaluate_main([str(export), "--device", "cpu", "--output", str(out)]) == 0
    from_export = {b: per[str(export)] for b, per in json.loads(out.read_text())["results"].items()}
    assert list(from_export) == ["loss_added", "dead_latents"]
    _same(from_export, want)
    # the command line wins (here --n-seqs), and a run folder's checkpoints share the settings
    assert evaluate_main([str(run_dir), "--n-seqs", "2", "--output", str(out)]) == 0
    again = json.loads(out.read_text())["results"]
    assert list(again) == ["loss_added", "dead_latents"] and len(again["loss_added"]) == 2
    # 2 contexts of 64 (BOS and end-of-text tokens not counted), against the run's 4
    assert all(r["n_tokens"] <= 2 * 63 < got["loss_added"]["n_tokens"] for r in again["loss_added"].values())


@pytest.mark.slow
def test_evaluate_cli_on_a_saelens_export_uses_the_recorded_training_dataset(run_dir, tmp_path, monkeypatch):
    """gsae's SAELens export records its training data (gsae-corpus): evaluate.py reads its held-out tokens, as for
    the checkpoint, instead of OpenWebText (which an offline machine cannot open, and the SAE never saw)."""
    import gsae.evaluate as ev

    used = []
    real = ev.held_out_tokens
    monkeypatch.setattr(ev, "held_out_tokens",
                        lambda lm, dataset, *a, **k: used.append(dataset) or real(lm, dataset, *a, **k))
    ckpt = run_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    out = tmp_path / "res.json"
    args = ["--benchmarks", "loss_added", "--n-seqs", "4", "--device", "cpu", "--output", str(out)]
    assert evaluate_main([str(ckpt.with_suffix(".saelens")), str(ckpt), *args]) == 0
    assert used and set(used) == {"gsae-corpus"}
    res = json.loads(out.read_text())["results"]["loss_added"]
    a, b = res[str(ckpt.with_suffix(".saelens"))], res[str(ckpt)]
    assert a["kl_sae"] == pytest.approx(b["kl_sae"], rel=1e-4) and a["l0"] == b["l0"]


@pytest.mark.slow
def test_evaluate_plateaus_prints_the_table_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "plateaus.json"
    opts = {"plateaus": {"n_perturbations": 12, "step_size": "auto", "ap_threshold": "auto", "windows": "all"}}
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    rc = evaluate_main([ckpt, "--benchmarks", "plateaus", "--n-seqs", "8", "--options", json.dumps(opts), "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model_generated" in printed and "synthetic_structured" in printed and "abs_ks" in printed
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["plateaus"]
    tables = next(iter(res["plateaus"].values()))["tables"]["ms"]
    assert tables["model_generated"]["abs_ks"] == 0.0
    assert set(tables) >= {"random", "synthetic_baseline", "synthetic_structured", "sae_reconstruction"}


def test_evaluate_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("# a run's config\nseed_everything: 0\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "cfg.json").write_text("{}")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "cfg.json").write_text("{oops")
    (tmp_path / "badjson" / "sae_weights.safetensors").write_bytes(b"")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint either")
    cases = {
        # named, not torch's words for it ("mmap can only be used with files saved with …")
        (str(text_file),): f"'{text_file}' is not a checkpoint (a gsae .ckpt file): torch.load cannot read it",
        (str(tmp_path / "badjson"),): f"PATH '{tmp_path / 'badjson'}': cfg.json does not read as JSON (Expecting",
        (str(tmp_path / "missing.ckpt"),): "PATH",
        (str(bad),): "corrupt or unreadable",
        (str(yaml_file),): "is not a checkpoint (a gsae .ckpt file)",  # a config.yaml is not a corrupt checkpoint
        (str(bad), "--benchmarks", "loss_added,nope"): "--benchmarks",
        (str(bad), "--n-seqs", "0"): "--n-seqs",
        (str(bad), "--options", "{oops"): "--options",
        # option names and types are checked before any work (they were dropped, or failed mid-benchmark)
        (str(bad), "--benchmarks", "loss_added", "--options", '{"loss_added": {"n_seqz": 4}}'):
            "--options.loss_added: unknown option 'n_seqz'; loss_added takes batch_size, exclude_special_tokens, n_seqs",
        (str(bad), "--benchmarks", "steering", "--options", '{"steering": {"n_latents": "abc"}}'):
            "--options.steering.n_latents: expected int, got 'abc'",
        (str(bad), "--benchmarks", "steering", "--options", '{"steering": {"mode": "every"}}'):
            "--options.steering.mode: expected 'position' or 'all', got 'every'",
        # and their values (a traceback after the evaluation, a ZeroDivisionError; or NaN, or the wrong latents)
        (str(bad), "--options", '{"dead_latents": {"bin_width": 0}}'): "--options.dead_latents.bin_width must be > 0",
        (str(bad), "--options", '{"dead_latents": {"batch_tokens": -5}}'):
            "--options.dead_latents.batch_tokens must be > 0 (got -5)",  # was blamed on the dataset
        (str(bad), "--options", '{"steering": {"alphas": []}}'): "--options.steering.alphas must be non-empty",
        (str(bad), "--options", '{"steering": {"n_latents": -3}}'): "--options.steering.n_latents must be > 0",
        (str(bad), "--options", '{"decoder_geometry": {"tail_quantile": 0.7}}'):
            "--options.decoder_geometry.tail_quantile must be in (0, 0.5] (got 0.7)",
        (str(bad), "--options", '{"sensitive_directions": {"lengths": [1, -2]}}'):
            "--options.sensitive_directions.lengths must have every value > 0 (got [1, -2])",
        (str(tmp_path / "empty"),): "no .ckpt files",
        # checked before any work (the JSON failed after the whole evaluation, with a traceback)
        (str(bad), "--output", str(tmp_path)): "is a folder; give a file",
        (str(bad), "--output", str(bad / "x.json")): f"{bad} is a file, not a folder",
        # a folder that refuses files (as root, permission bits would not tell): found before the evaluation
        (str(bad), "--output", "/proc/x.json"): "--output '/proc/x.json': cannot write in /proc",
        (str(bad), "--logdir", "/proc/tb"): "--logdir '/proc/tb': cannot write in /proc",
        (str(bad), "--logdir", str(bad)): "is a file, not a folder",
        (str(bad), "--device", "nonsense"): "--device 'nonsense': not a torch device (e.g. cpu, cuda",
        (str(bad), "--context-size", "0"): "--context-size must be > 0",  # was silently the default
        (str(bad), "--benchmarks", ""): "--benchmarks: no benchmark given",
        (str(tmp_path / "noweights"),): "a SAELens folder (cfg.json) without sae_weights.safetensors",
        (str(bad), "--out", "x.json"): "unrecognized arguments: --out",  # no abbreviations: --output in full
    }
    if not torch.cuda.is_available():
        cases[(str(bad), "--device", "cuda")] = "this machine has no CUDA GPU"
    for args, needle in cases.items():
        assert evaluate_main(list(args)) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, (args, err)


def test_callback_guards(tmp_path):
    with pytest.raises(ValueError, match="--evaluation.benchmarks: unknown benchmark"):
        EvaluationCallback(benchmarks=["nope"])
    with pytest.raises(ValueError, match=r"^--evaluation.options: \['nope'\] are not benchmarks"):
        EvaluationCallback(benchmarks=["loss_added"], options={"nope": {}})
    # named as the user types them (they said EvaluationCallback.n_seqs); a batch size <= 0 failed every evaluation
    for kwargs, message in [({"n_seqs": 0}, "--evaluation.n_seqs must be > 0"),
                            ({"every_n_steps": -1}, "--evaluation.every_n_steps must be > 0 or null"),
                            ({"every_n_steps": 0}, "--evaluation.every_n_steps must be > 0 or null"),  # else: never
                            ({"batch_size": -2}, "--evaluation.batch_size must be > 0, or null"),
                            ({"batch_size": 0}, "--evaluation.batch_size must be > 0, or null")]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            EvaluationCallback(**kwargs)
    with pytest.raises(ValueError, match="options.steering.n_seqs"):
        EvaluationCallback(options={"steering": {"n_seqs": 0}})
    # at construction (before training), not at the first checkpoint: names, and types from run's annotations
    with pytest.raises(ValueError, match=r"--evaluation.options.steering: unknown option 'n_latentz'"):
        EvaluationCallback(options={"steering": {"n_latentz": 3}})
    with pytest.raises(ValueError, match=r"--evaluation.options.steering.n_latents: expected int, got 'abc'"):
        EvaluationCallback(options={"steering": {"n_latents": "abc"}})
    with pytest.raises(ValueError, match=r"sensitive_directions.lengths: expected list\[float\] \| None"):
        EvaluationCallback(options={"sensitive_directions": {"lengths": 5}})
    with pytest.raises(ValueError, match=r"--evaluation.options.latents.latents must have every value >= 0"):
        EvaluationCallback(options={"latents": {"latents": [3, -1]}})
    with pytest.raises(ValueError, match=r"--evaluation.options.plateaus.target_cos must be in \[-1, 1\]"):
        EvaluationCallback(options={"plateaus": {"target_cos": 1.5}})
    ok = {"steering": {"n_latents": 2, "alphas": [0, 50.5], "mode": "all", "n_seqs": 4},
          "plateaus": {"step_size": "auto", "position": None, "schedules": ["linear"], "target_cos": "estimate"},
          "sensitive_directions": {"lengths": [1, 5.0], "direction_types": ["isotropic"]}}
    EvaluationCallback(options=ok)
    # a config's options for benchmarks left out of the set are kept, unused (one option changes the set)
    assert EvaluationCallback(benchmarks=["loss_added"], options={"steering": {"n_latents": 2}}).benchmarks == [
        "loss_added"
    ]
    assert list(EvaluationCallback().benchmarks) == [
        "loss_added", "dead_latents", "steering", "sensitive_directions", "decoder_geometry", "latents"
    ]
    cb = EvaluationCallback()
    ckpt = tmp_path / "x.ckpt"
    cb.on_sae_checkpoint(SimpleNamespace(is_global_zero=False, global_step=1), None, ckpt)  # rank > 0: nothing
    assert not Path(str(ckpt) + ".eval.json").exists()


@pytest.mark.slow
def test_callback_on_a_gsae_every_n_steps_and_at_checkpoints(tmp_path):
    """A g-SAE system: evaluated every 2 steps and at each checkpoint (step 3 and the final step 4),
    once per step; the SAE is back in training mode afterwards."""
    from tests.systems.helpers import build_data, build_system, build_trainer

    system = build_system("gsae")
    cb = EvaluationCallback(benchmarks=["loss_added", "dead_latents"], n_seqs=2, every_n_steps=2)
    steps: list[int] = []
    evaluate = cb.evaluate

    def record(trainer, pl_module):
        steps.append(trainer.global_step)
        assert pl_module.sae.training
        return evaluate(trainer, pl_module)

    cb.evaluate = record
    build_trainer(tmp_path, 4, callbacks=[cb], checkpoint_every=3).fit(system, datamodule=build_data(system))
    assert cb._last[0] == 4 and sorted(set(steps)) == [2, 3, 4]
    written = {json.loads(p.read_text())["step"] for p in (tmp_path / "ckpts").glob("*step=*.ckpt.eval.json")}
    assert written == {3, 4} and (tmp_path / "ckpts" / "last.ckpt.eval.json").exists()
    assert system.sae.training


@pytest.fixture
def fake_benchmark(monkeypatch):
    from gsae import evals

    monkeypatch.setitem(evals._MODULES, "fake", "tests.evals.fake_benchmark")
    return "fake"


def _fake_trainer(tmp_path, tiny_lm, step=3):
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.evals.helpers import build_tokens

    dm = SimpleNamespace(contexts=lambda which: iter(build_tokens(6, 16).tolist()), batch_size=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    return SimpleNamespace(is_global_zero=True, global_step=step, datamodule=dm, loggers=[logger]), logger


def test_callback_writes_artifacts_beside_the_checkpoint_and_logs_texts(tmp_path, tiny_lm, fake_benchmark):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.evals.helpers import HOOK, build_topk

    trainer, logger = _fake_trainer(tmp_path, tiny_lm)
    module = SimpleNamespace(sae=build_topk(), hook=HOOK, lm=tiny_lm)
    cb = EvaluationCallback(benchmarks=["loss_added", "fake"], n_seqs=6, options={"fake": {"n_seqs": 2}})
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    cb.on_sae_checkpoint(trainer, module, ckpt)
    page = Path(str(ckpt) + ".fake.html").read_text()  # 2 of the 6 contexts; which SAE at which step
    assert page == f"<p>32 tokens at {HOOK} (tb · {ckpt.name} · step 3 · random-tiny · {HOOK} · TopKSAE · d_sae 128 · k 8)</p>"
    payload = json.loads(Path(str(ckpt) + ".eval.json").read_text())
    assert payload["results"]["fake"]["n_tokens"] == 32 and payload["results"]["loss_added"]["n_tokens"] == 6 * 15
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    assert "eval/fake/summary/text_summary" in ea.Tags()["tensors"]


@pytest.mark.parametrize("context_size", [16, 32])
def test_callback_gives_dead_latents_its_window_at_any_context_size(tmp_path, tiny_lm, context_size):
    """Without n_seqs, dead_latents reads the contexts its "batches" window needs (5 batches of ``batch_tokens``,
    BOS not counted), whatever the data's context size, and its ``dead_fraction_batches`` is computed; the other
    benchmarks read their own n_seqs, or 64."""
    from tests.evals.helpers import HOOK, build_tokens, build_topk

    trainer, _ = _fake_trainer(tmp_path, tiny_lm)
    trainer.datamodule.contexts = lambda which: iter(build_tokens(100, context_size).tolist())
    module = SimpleNamespace(sae=build_topk(), hook=HOOK, lm=tiny_lm)
    cb = EvaluationCallback(benchmarks=["dead_latents", "loss_added"], options={"dead_latents": {"batch_tokens": 64}},
                            log_figures=False)
    cb.on_sae_checkpoint(trainer, module, tmp_path / "x.ckpt")
    need = -(-5 * 64 // (context_size - 1))  # contexts holding 5 x 64 tokens after BOS
    assert cb._counts == {"dead_latents": None, "loss_added": 64} and cb._tokens.shape == (64, context_size)
    payload = json.loads((tmp_path / "x.ckpt.eval.json").read_text())
    assert payload["n_seqs"] == 64 and payload["contexts"] == {"dead_latents": need, "loss_added": 64}
    result = payload["results"]
    assert result["dead_latents"]["n_tokens"] == 5 * 64 and result["dead_latents"]["dead_fraction_batches"] is not None
    assert result["loss_added"]["n_tokens"] == 64 * (context_size - 1)
    # dead_latents alone: the contexts read are its window's, with room for special tokens (WINDOW_MARGIN 1.25)
    cb = EvaluationCallback(benchmarks=["dead_latents"], options={"dead_latents": {"batch_tokens": 64}},
                            log_figures=False)
    cb.on_sae_checkpoint(trainer, module, tmp_path / "y.ckpt")
    assert cb._tokens.shape[0] == -(-5 * 64 * 5 // (4 * (context_size - 1))) >= need
    assert json.loads((tmp_path / "y.ckpt.eval.json").read_text())["results"]["dead_latents"]["n_tokens"] == 5 * 64


def test_disabled_callback_does_nothing(tmp_path, tiny_lm):
    trainer, _ = _fake_trainer(tmp_path, tiny_lm)
    cb = EvaluationCallback(enabled=False)
    ckpt = tmp_path / "x.ckpt"
    cb.on_sae_checkpoint(trainer, None, ckpt)  # would fail on the None module if it ran
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert list(tmp_path.glob("x.ckpt*")) == []


def test_every_n_steps_evaluates_at_its_multiples_but_not_at_step_0(tmp_path, tiny_lm):
    """``every_n_steps``: at global steps n, 2n, ...; the micro-batches a gradient accumulation ends before the first
    optimizer step (global step 0) do not evaluate the untrained SAE."""
    trainer, _ = _fake_trainer(tmp_path, tiny_lm)
    cb = EvaluationCallback(every_n_steps=2, log_figures=False)
    steps: list[int] = []
    cb.evaluate = lambda trainer, module: steps.append(trainer.global_step)
    for step in (0, 0, 1, 1, 2, 3, 4):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert steps == [2, 4]


def test_evaluation_seconds_add_up_also_when_an_evaluation_fails():
    """``seconds_total`` (kept out of the run summary's training rate) is the sum over evaluations, failed ones too."""
    import time

    cb = EvaluationCallback()
    cb.seconds_total = 100.0  # the evaluations before
    with cb._timed():
        time.sleep(0.01)
    assert cb.seconds_total >= 100.01
    with pytest.raises(RuntimeError, match="boom"), cb._timed():
        time.sleep(0.01)
        raise RuntimeError("boom")
    assert cb.seconds_total >= 100.02


def test_the_json_and_the_checkpoint_record_the_callbacks_seed_and_batch_size(tmp_path, tiny_lm, fake_benchmark,
                                                                                monkeypatch):
    """The benchmarks run with the callback's seed and batch size (not the data's); the JSON records the seed, and the
    checkpoint the settings ``evaluate.py`` re-evaluates it with."""
    from gsae.callbacks import evaluation
    from tests.evals.helpers import HOOK, build_topk

    calls = []
    real = evaluation.run_benchmarks_at
    monkeypatch.setattr(evaluation, "run_benchmarks_at", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    trainer, _ = _fake_trainer(tmp_path, tiny_lm)  # the data's batch_size is 2
    module = SimpleNamespace(sae=build_topk(), hook=HOOK, lm=tiny_lm)
    cb = EvaluationCallback(benchmarks=["fake"], n_seqs=5, batch_size=3, seed=7, options={"fake": {"n_seqs": 2}},
                            log_figures=False)
    cb.on_sae_checkpoint(trainer, module, tmp_path / "x.ckpt")
    assert [(kw["seed"], kw["batch_size"]) for kw in calls] == [(7, 3)]
    payload = json.loads((tmp_path / "x.ckpt.eval.json").read_text())
    assert payload["seed"] == 7 and payload["results"]["fake"]["seed"] == 7
    assert payload["n_seqs"] == 5 and payload["contexts"] == {"fake": 2}
    checkpoint: dict = {}
    cb.on_save_checkpoint(trainer, module, checkpoint)
    assert checkpoint == {"gsae_evaluation": {"benchmarks": ["fake"], "options": {"fake": {"n_seqs": 2}}, "n_seqs": 5,
                                              "seed": 7, "batch_size": 3}}
    checkpoint = {}
    EvaluationCallback(enabled=False).on_save_checkpoint(trainer, module, checkpoint)
    assert checkpoint == {}
    # write_json false: the artifacts, no JSON, and nothing for a resume to redo
    quiet = EvaluationCallback(benchmarks=["fake"], n_seqs=2, write_json=False, log_figures=False)
    quiet.on_sae_checkpoint(trainer, module, tmp_path / "y.ckpt")
    assert (tmp_path / "y.ckpt.fake.html").exists() and not (tmp_path / "y.ckpt.eval.json").exists()
    assert quiet.evaluated(tmp_path / "y.ckpt", [""])
    # a sweep's checkpoint is evaluated once every member's JSON is there (<checkpoint>.<member>.eval.json)
    assert not cb.evaluated(tmp_path / "z.ckpt", ["a", "b"])
    (tmp_path / "z.ckpt.a.eval.json").write_text("{}")
    assert not cb.evaluated(tmp_path / "z.ckpt", ["a", "b"])
    (tmp_path / "z.ckpt.b.eval.json").write_text("{}")
    assert cb.evaluated(tmp_path / "z.ckpt", ["a", "b"]) and cb.evaluated(tmp_path / "x.ckpt", [""])


def test_figures_are_drawn_in_the_background_by_default_only_on_a_gpu(tmp_path, tiny_lm):
    trainer, _ = _fake_trainer(tmp_path, tiny_lm)
    for device, background in (("cpu", False), ("cuda", True)):
        trainer.strategy = SimpleNamespace(root_device=torch.device(device))
        cb = EvaluationCallback(log_figures=False)  # not started: no worker process
        cb.setup(trainer, None, "validate")
        assert cb.figures.background is background, device
        cb = EvaluationCallback(log_figures=False, figures_in_background=not background)
        cb.setup(trainer, None, "validate")
        assert cb.figures.background is (not background), device


def test_under_ddp_every_rank_evaluates_only_when_distributed(tmp_path, monkeypatch):
    """Under DDP the ranks share an evaluation (``distributed``, the default); with ``distributed: false`` rank 0
    evaluates alone and the other ranks do nothing at a checkpoint."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    rank1 = SimpleNamespace(world_size=2, is_global_zero=False, global_step=3)
    shared, alone = EvaluationCallback(), EvaluationCallback(distributed=False)
    assert shared._world(rank1) == 2 and shared._takes_part(rank1)
    assert alone._world(rank1) == 1 and not alone._takes_part(rank1)
    alone.on_sae_checkpoint(rank1, None, tmp_path / "x.ckpt")  # would fail on the None module if it ran
    assert list(tmp_path.iterdir()) == []


def test_the_seconds_of_a_benchmark_run_in_parts_are_logged_as_their_sum():
    """A DDP evaluation times each part of a benchmark split between ranks (``name#part``): one scalar, their sum."""
    import time

    logged = []
    trainer = SimpleNamespace(loggers=[SimpleNamespace(log_metrics=lambda values, step: logged.append((step, values)))])
    cb = EvaluationCallback(log_figures=False)
    cb.last_seconds = {"loss_added#0": 1.5, "loss_added#1": 2.0, "steering": 4.0}
    cb._log(trainer, {"": {}}, 7, time.perf_counter())
    assert logged == [(7, {"eval/seconds/loss_added": 3.5, "eval/seconds/steering": 4.0})]


def test_a_sweeps_members_on_a_plain_tensorboard_logger_are_tagged_with_their_names(tmp_path, tiny_lm,
                                                                                       fake_benchmark):
    """A sweep logged by a TensorBoard logger without a run per member: each member's texts and figures under
    ``eval/<member>/``; with ``log_figures`` false, no figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.evals.helpers import HOOK, build_topk

    trainer, logger = _fake_trainer(tmp_path, tiny_lm)
    saes = {"a": (build_topk(), {}), "b": (build_topk(), {"hook": HOOK})}
    module = SimpleNamespace(saes=lambda: saes, hook=HOOK, lm=tiny_lm)
    for step, figures in ((3, False), (4, True)):
        trainer.global_step = step
        cb = EvaluationCallback(benchmarks=["fake", "dead_latents"], n_seqs=4, log_figures=figures)
        cb.on_sae_checkpoint(trainer, module, tmp_path / f"step={step}.ckpt")
        cb.figures.drain()
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"eval/a/fake/summary/text_summary", "eval/b/fake/summary/text_summary"} <= set(ea.Tags()["tensors"])
    images = ea.Tags()["images"]
    assert {"eval/a/dead_latents/density_histogram", "eval/b/dead_latents/density_histogram"} <= set(images), images
    assert all(t.startswith(("eval/a/", "eval/b/")) and [e.step for e in ea.Images(t)] == [4] for t in images), images


def test_evaluate_py_writes_artifacts_next_to_output(tmp_path, fake_benchmark, capsys):
    from tests.evals.helpers import HOOK, export_tiny

    export_tiny(tmp_path / "a.saelens")
    out = tmp_path / "out" / "res.json"
    rc = evaluate_main([str(tmp_path / "a.saelens"), "--benchmarks", "fake", "--n-seqs", "3", "--output", str(out)])
    assert rc == 0
    (art,) = list(out.parent.glob("res.*.fake.html"))
    assert art.name == "res.a.saelens.fake.html"  # named by the SAE's table label (its folders left out), not its path
    # which SAE: the path given, the LM, the hook, SAELens's architecture and the width (a file read on its own)
    assert art.read_text() == (f"<p>48 tokens at {HOOK} ({tmp_path / 'a.saelens'} · random-tiny · {HOOK} · "
                               "saelens:topk · d_sae 128 · k 8)</p>")


def test_evaluate_py_output_is_strict_json_and_a_failed_write_is_one_line(tmp_path, fake_benchmark, monkeypatch,
                                                                         capsys):
    """A metric undefined on the set (NaN) is written ``null`` (Python's ``NaN`` is not JSON: jq and JavaScript
    reject it); writing the results or their artifacts fails with one ``error:`` line, not a traceback after the
    whole evaluation (an artifact's name too long for the filesystem, here)."""
    from tests.evals import fake_benchmark as fake
    from tests.evals.helpers import HOOK, export_tiny

    monkeypatch.setattr(fake, "run", lambda *a, seed=0, **o: {"n_tokens": 3, "hook": HOOK, "ratio": float("nan"),
                                                              "curve": [1.0, float("inf")]})
    export_tiny(tmp_path / "a.saelens")
    args = [str(tmp_path / "a.saelens"), "--benchmarks", "fake", "--n-seqs", "3"]
    out = tmp_path / "res.json"
    assert evaluate_main([*args, "--output", str(out)]) == 0

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    (result,) = strict(out.read_text())["results"]["fake"].values()
    assert result["ratio"] is None and result["curve"] == [1.0, None]
    capsys.readouterr()
    long = tmp_path / ("r" * 240 + ".json")  # fits; "<stem>.<sae>.fake.html" beside it does not (255 bytes)
    assert evaluate_main([*args, "--output", str(long)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and "File name too long" in err, err


def test_cli_evaluation_group_is_on_by_default_and_one_option_turns_it_off(tmp_path):
    from gsae.cli import build_cli

    cli = build_cli(quickstart_args(tmp_path, steps=1))
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)]
    assert cb.enabled and set(cb.benchmarks) >= {"loss_added", "dead_latents", "steering", "sensitive_directions"}
    assert cb.options["sensitive_directions"]["sweep_seqs"] == 8 and cb.options["sensitive_directions"]["n_seqs"] == 32  # the config's budgets
    off = build_cli(quickstart_args(tmp_path, "--evaluation.enabled", "false", steps=1))
    assert not [c for c in off.trainer.callbacks if isinstance(c, EvaluationCallback)][0].enabled
    some = build_cli(quickstart_args(tmp_path, "--evaluation.benchmarks", "[loss_added,steering]", steps=1))
    assert [c for c in some.trainer.callbacks if isinstance(c, EvaluationCallback)][0].benchmarks == [
        "loss_added", "steering"
    ]


def test_a_benchmark_that_raises_during_training_is_recorded_and_training_goes_on(
    tmp_path, fake_benchmark, monkeypatch, caplog
):
    """An error no up-front check can see (here a CUDA-style OOM in one benchmark) at a checkpoint: that benchmark's
    result is ``{"failed": ...}`` in the JSON, said in one log line, the other benchmarks' results are there, and the
    run trains to its last step (``evaluate.py`` and ``GSAE_DEBUG=1`` still raise)."""
    import logging

    from tests.evals import fake_benchmark as fake
    from tests.systems.helpers import build_data, build_system, build_trainer

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong details")

    monkeypatch.setattr(fake, "run", oom)
    system = build_system("topk")
    cb = EvaluationCallback(benchmarks=["loss_added", "fake"], n_seqs=4, log_figures=False)
    trainer = build_trainer(tmp_path, 4, callbacks=[cb], checkpoint_every=2)
    with caplog.at_level(logging.INFO, logger="gsae.callbacks.evaluation"):
        trainer.fit(system, datamodule=build_data(system))
    assert trainer.global_step == 4
    for step in (2, 4):
        results = json.loads((tmp_path / "ckpts" / f"epoch=0-step={step}.ckpt.eval.json").read_text())["results"]
        assert results["fake"] == {"failed": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
        assert isinstance(results["loss_added"]["L_added"], float)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("evaluation: fake failed at step 2 (RuntimeError: CUDA out of memory" in e for e in errors), errors
    infos = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluated ")]
    assert infos and all("fake" not in m and "loss_added" in m for m in infos), infos
    from gsae.callbacks.summary import headline_numbers  # the run summary's eval line says it failed

    assert ("fake.failed", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB") in headline_numbers(results)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # evaluate.py's default: the error propagates
        from gsae.evals import run_benchmarks

        run_benchmarks(["fake"], system.sae, system.lm, system.hook, torch.zeros(2, 8, dtype=torch.long))
    monkeypatch.setenv("GSAE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cb._last = None
        cb.evaluate(trainer, system)


@pytest.mark.slow
def test_evaluate_cli_gives_dead_latents_its_window_by_default(run_dir, tmp_path, monkeypatch, capsys):
    """Without ``--n-seqs``, dead_latents reads the contexts its "batches" definition needs (the paper's 5 batches of
    4096 tokens; 5 × 256 here, through its ``batch_tokens`` option), so ``dead_fraction_batches`` is computed; the
    other benchmarks read 64. ``--n-seqs`` sets every benchmark's count, a benchmark's own ``n_seqs`` option its own."""
    import gsae.evaluate as ev
    from gsae.lm import LanguageModel

    seen = {}
    real, read = ev.run_benchmarks, ev.held_out_tokens
    monkeypatch.setattr(ev, "run_benchmarks", lambda names, sae, lm, hook, toks, **kw: seen.update(
        {n: tuple(t.shape) for n, t in toks.items()}, lm=lm) or real(names, sae, lm, hook, toks, **kw))
    monkeypatch.setattr(ev, "held_out_tokens",
                        lambda *a, **k: seen.setdefault("read", []).append(read(*a, **k)) or seen["read"][-1])
    # evaluate.py's own defaults: a checkpoint that records no evaluation settings (a run with the evaluation off)
    state = torch.load(run_dir / "checkpoints" / "epoch=0-step=10.ckpt", weights_only=False)
    del state["gsae_evaluation"]
    ckpt = str(tmp_path / "epoch=0-step=10.ckpt")
    torch.save(state, ckpt)

    def run(*extra: str) -> dict:
        out = tmp_path / "res.json"
        assert evaluate_main([ckpt, "--benchmarks", "dead_latents,loss_added", "--output", str(out), *extra]) == 0
        return json.loads(out.read_text())["results"]["dead_latents"][ckpt]

    dead = run("--options", json.dumps({"dead_latents": {"batch_tokens": 256}}))
    lm: LanguageModel = seen["lm"]
    # the reference: count each context's non-special tokens until 5 × 256 are there
    counted, need = 0, None
    for i, ctx in enumerate(seen["read"][-1].tolist()):
        counted += sum(t not in lm.special_token_ids for t in ctx)
        if counted >= 5 * 256:
            need = i + 1
            break
    assert need is not None and seen["dead_latents"] == (need, 64) and seen["loss_added"] == (64, 64)
    assert dead["n_tokens"] == 5 * 256 and dead["dead_fraction_batches"] is not None and "note" not in dead
    dead = run("--n-seqs", "4")
    assert seen["dead_latents"] == seen["loss_added"] == (4, 64)
    assert dead["dead_fraction_batches"] is None and "raise n_seqs" in dead["note"] and "in 4 contexts" in dead["note"]
    run("--options", json.dumps({"dead_latents": {"n_seqs": 30}}))
    assert seen["dead_latents"] == (30, 64) and seen["loss_added"] == (64, 64)
    assert evaluate_main([ckpt, "--options", json.dumps({"dead_latents": {"n_seqs": 0}})]) == 1
    assert "--options.dead_latents.n_seqs must be > 0" in capsys.readouterr().err


def test_evaluate_py_ctrl_c_is_one_line(monkeypatch, capsys, tmp_path):
    """Ctrl+C during evaluate.py printed a 59-line KeyboardInterrupt traceback; now one line and exit code 130."""
    import gsae.evaluate as ev

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    assert ev.main([str(tmp_path / "x.ckpt")]) == 130
    assert capsys.readouterr().err.strip() == "stopped (Ctrl+C)"
    for error, line in ((RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB"), "CUDA out of memory."),
                        (OSError(), "OSError")):  # an error of several lines: its first; none: its type
        monkeypatch.setattr(ev, "evaluate", lambda args, error=error: (_ for _ in ()).throw(error))
        assert ev.main([str(tmp_path / "x.ckpt")]) == 1
        assert capsys.readouterr().err == f"error: {line}\n"


def test_evaluate_tensorboard_run_reads_back_in_step_order_across_a_writer_counter_digit(tmp_path, fake_benchmark,
                                                                                        monkeypatch):
    """``--logdir`` keeps one writer per TensorBoard run for the whole call. A writer per checkpoint named its files
    ``…<second>.<host>.<pid>.<n>``, ``n`` counting the process's writers: made in one second with ``n`` 9 and 10, step
    10's file sorted first and TensorBoard (which reads a run's files in name order) gave the steps as [10, 5]. Here
    the counter is set to 9 and the clock stopped, which made that order every time. Evaluating again, with an error
    before the second step, replaces the first step's value and keeps the second's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    from gsae.evaluate import TensorBoardOut

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: 1_800_000_000.0))
    with TensorBoardOut(str(tmp_path), ["fake"]) as tb:
        for step in (5, 10, 15):
            tb.write("run", step, {"fake": {"n_tokens": step, "hook": "h"}})

    def read():
        acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
        return [(e.step, e.value) for e in acc.Scalars("eval/fake/n_tokens")], len(acc.Tensors("eval/fake/summary/text_summary"))

    assert read() == ([(5, 5.0), (10, 10.0), (15, 15.0)], 3)
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    with pytest.raises(KeyboardInterrupt), TensorBoardOut(str(tmp_path), ["fake"]) as tb:
        tb.write("run", 5, {"fake": {"n_tokens": 50, "hook": "h"}})
        raise KeyboardInterrupt
    points, texts = read()  # (in one process and one stopped second the new file's counter, 10, sorts it first)
    assert sorted(points) == [(5, 50.0), (10, 10.0), (15, 15.0)] and texts == 3


def test_evaluate_py_without_an_output_skips_the_benchmarks_whose_results_are_files(tmp_path, capsys, caplog):
    """``latents`` (dashboards: HTML files, TensorBoard texts) runs by default only where its results can go: with
    ``--output`` or ``--logdir``, or when ``--benchmarks`` or ``--options`` names it; else the table showed only
    its settings, for its cost."""
    import logging

    from tests.evals.helpers import export_tiny

    export_tiny(tmp_path / "a.saelens")
    small = json.dumps({**SMALL_OPTIONS, "steering": {**SMALL_OPTIONS["steering"], "alphas": [0, 50]}})
    base = [str(tmp_path / "a.saelens"), "--n-seqs", "2", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="gsae.evaluate"):
        assert evaluate_main([*base, "--options", small]) == 0
    table = capsys.readouterr().out
    assert "loss_added.L_added" in table and not re.search(r"^latents\.", table, re.M)
    assert "not running latents" in caplog.text
    assert evaluate_main([*base, "--options", small, "--output", str(tmp_path / "r.json")]) == 0
    assert "latents.n_latents" in capsys.readouterr().out and list(tmp_path.glob("r.*.latents.html"))
    assert evaluate_main([*base, "--options", small, "--logdir", str(tmp_path / "tb")]) == 0  # its texts go there
    assert "latents.n_latents" in capsys.readouterr().out
    opts = json.dumps({"latents": {"n_latents": 2}})
    assert evaluate_main([*base, "--benchmarks", "loss_added,latents"]) == 0
    assert "latents.n_latents" in capsys.readouterr().out
    assert evaluate_main([*base, "--options", opts]) == 0 and "latents.n_latents" in capsys.readouterr().out


def test_evaluate_py_reads_a_local_dataset_s_own_text_column_and_names_a_file_that_does_not_read(run_dir, tmp_path, capsys):
    """``--text-column`` picks a local dataset's text (training's ``--data.text_column``; evaluate.py had none, and its
    error told the user to set that train.py option); a binary .txt or a JSON line that does not parse is one line
    naming ``--dataset`` and the file (it was the codec's or pyarrow's words alone)."""
    ckpt = str(run_dir / "checkpoints" / "epoch=0-step=10.ckpt")
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": f"The red fox {i} jumps over the lazy dog. " * 8}) + "\n" for i in range(40)))
    base = [ckpt, "--benchmarks", "loss_added", "--n-seqs", "2", "--dataset", str(body)]
    assert evaluate_main(base) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --text-column: dataset has no 'text' or 'input_ids' column (columns: ['body'])"), err
    out = tmp_path / "out.json"
    assert evaluate_main([*base, "--text-column", "body", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["loss_added"]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "no comma" "x": 1}\n')
    for path, words in [(binary, "not UTF-8 text"), (broken, "could not read it: JSON parse error")]:
        capsys.readouterr()
        assert evaluate_main([ckpt, "--benchmarks", "loss_added", "--n-seqs", "2", "--dataset", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: --dataset {str(path)!r}: {words}"), err


def test_evaluate_py_refuses_an_unreadable_path_before_evaluating_the_others(run_dir, tmp_path, capsys, monkeypatch):
    """A truncated checkpoint or a SAELens folder with corrupt weights as a later PATH: refused before the first PATH's
    evaluation (which used to run in full, then be lost); PATHs may follow the options."""
    good = run_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    export = tmp_path / "broken.saelens"
    export.mkdir()
    for f in (run_dir / "checkpoints" / "epoch=0-step=10.saelens").iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    (export / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    calls = []
    import gsae.evaluate as ev

    real = ev.run_benchmarks
    monkeypatch.setattr(ev, "run_benchmarks", lambda *a, **k: calls.append(1) or real(*a, **k))
    for bad, words in [(cut, "is corrupt or unreadable"), (export, "sae_weights.safetensors does not read")]:
        capsys.readouterr()
        assert evaluate_main([str(good), str(bad), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: PATH {str(bad)!r}: ") and words in err, err
    assert calls == []  # nothing evaluated
    out = tmp_path / "after.json"
    assert evaluate_main(["--benchmarks", "loss_added", "--n-seqs", "2", "--output", str(out), str(good)]) == 0
    assert list(json.loads(out.read_text())["results"]["loss_added"]) == [str(good)]


def test_evaluate_py_says_a_g_sae_export_encodes_as_topk(tmp_path, caplog):
    """A g-SAE's SAELens export evaluates as the plain TopK SAE of its weights (SAELens has no gradient-weighted
    selection): said once when it is loaded, as a researcher comparing it with its .ckpt would read them as one SAE;
    a TopK export says nothing."""
    from gsae.export import export_saelens
    from gsae.sae import GradTopKSAE
    from tests.evals.helpers import HOOK, build_topk

    meta = {"hook": HOOK, "lm": {"name": "random-tiny"}, "context_size": 16}
    export_saelens(GradTopKSAE(64, d_sae=128, k=8, beta=3.0), tmp_path / "g.saelens", {**meta, "sae_class": "gsae.sae.GradTopKSAE"})
    export_saelens(build_topk(), tmp_path / "t.saelens", {**meta, "sae_class": "gsae.sae.TopKSAE"})
    with caplog.at_level("WARNING"):
        assert evaluate_main([str(tmp_path / "g.saelens"), str(tmp_path / "t.saelens"), "--benchmarks", "loss_added",
                              "--n-seqs", "2"]) == 0
    said = [r.getMessage() for r in caplog.records if "SAELens export" in r.getMessage()]
    assert said == [f"{tmp_path / 'g.saelens'} is a g-SAE's SAELens export: SAELens has no gradient-weighted selection, "
                    "so it encodes as the plain TopK SAE of its weights (β = 0); evaluate its .ckpt for the g-SAE itself"]


def test_a_text_column_for_generated_text_is_refused(run_dir, capsys):
    """``--text-column`` with gsae-corpus (generated text, no columns) was silently ignored."""
    ckpt = str(run_dir / "checkpoints" / "epoch=0-step=10.ckpt")
    args = [ckpt, "--benchmarks", "loss_added", "--n-seqs", "2", "--dataset", "gsae-corpus", "--text-column", "body"]
    assert evaluate_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: --text-column 'body': gsae-corpus is generated, with no columns", err


@pytest.mark.slow
@pytest.mark.parametrize("data", ["txt-paragraphs", "jsonl-column"])
def test_evaluate_py_reads_the_runs_own_held_out_text(tmp_path, capsys, data):
    """A run on paragraphs of a .txt file, or on a JSONL's ``content`` column with 40 held-out documents: evaluate.py
    on its checkpoint and on its SAELens export reads the held-out contexts the run's evaluation read (its recorded
    ``text_unit``, ``text_column``, ``val_documents``), so it gives the run's .eval.json. It read whole files and the
    'text' column (other numbers, said nowhere), or refused the JSONL; the tokens line names the options."""
    from gsae.cli import main
    from tests.systems.test_ddp_evaluation import _same

    paragraphs = [f"Paragraph {i}: the {['red', 'blue', 'green'][i % 3]} fox {i} jumps over {i % 7} lazy dogs. "
                  * (2 + i % 4) for i in range(1200)]
    if data == "txt-paragraphs":
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(paragraphs))
        opts = ["--data.text_unit", "paragraph"]
        said = "text_unit paragraph"
    else:
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"content": p}) + "\n" for p in paragraphs))
        opts = ["--data.text_column", "content", "--data.val_documents", "40"]
        said = "val_documents 40, text_column content"
    args = quickstart_args(tmp_path, "--data.dataset", str(path), *opts, "--checkpoint.every_n_train_steps", "4",
                           "--evaluation.benchmarks", "[loss_added]", "--evaluation.n_seqs", "8", steps=4)
    assert main(args) == 0
    ckpt = tmp_path / "quickstart-topk" / "checkpoints" / "epoch=0-step=4.ckpt"
    want = json.loads(Path(str(ckpt) + ".eval.json").read_text())["results"]
    out = tmp_path / "again.json"
    for source in (ckpt, ckpt.with_suffix(".saelens")):
        capsys.readouterr()
        assert evaluate_main([str(source), "--device", "cpu", "--output", str(out)]) == 0
        assert f"tokens: {path}, {said}, contexts of 64 (loss_added 8)" in capsys.readouterr().out
        _same({b: per[str(source)] for b, per in json.loads(out.read_text())["results"].items()}, want)


def test_a_sigterm_during_an_evaluation_stops_it_there(tmp_path, monkeypatch, capsys):
    """A preempted job has seconds and an evaluation takes minutes at GPT-2 scale: a SIGTERM that arrives while the
    callback evaluates stops the evaluation before its next benchmark (it used to run to the end first, and at the end
    of training the signal went unnoticed), the run exits 143 with last.ckpt at the step, and the resume redoes the
    evaluation, which the stop left unwritten."""
    from gsae import evals
    from gsae.cli import main
    from tests.evals import sigterm_benchmark

    monkeypatch.setitem(evals._MODULES, "sigterm_bench", "tests.evals.sigterm_benchmark")
    monkeypatch.setitem(evals._MODULES, "fake", "tests.evals.fake_benchmark")
    ran = []
    real = evals.run_benchmark
    monkeypatch.setattr(evals, "run_benchmark", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    sigterm_benchmark.CALLS.clear()
    monkeypatch.setattr(sigterm_benchmark, "ARMED", [True])
    args = quickstart_args(tmp_path, "--checkpoint.every_n_train_steps", "4", "--evaluation.benchmarks",
                           "[sigterm_bench,fake]", steps=8)
    assert main(args) == 143
    assert ran == ["sigterm_bench"] and len(sigterm_benchmark.CALLS) == 1  # fake never ran
    ckpts = tmp_path / "quickstart-topk" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not list(ckpts.glob("*.eval.json"))
    assert "stopped (SIGTERM" in capsys.readouterr().out
    monkeypatch.setattr(sigterm_benchmark, "ARMED", [False])  # no signal this time
    assert main([*args, "--ckpt_path", "last"]) == 0
    assert json.loads((ckpts / "epoch=0-step=4.ckpt.eval.json").read_text())["results"].keys() == {"sigterm_bench", "fake"}
    assert (ckpts / "epoch=0-step=8.ckpt.eval.json").is_file()


def test_a_sigterm_during_a_ddp_evaluation_is_said(caplog):
    """Under DDP the ranks share an evaluation's benchmarks, so none stops midway; a SIGTERM then waited for the next
    step, and after the last step the run ended 'finished', exit 0, with no word of the signal. Rank 0 now says it."""
    from types import SimpleNamespace

    from gsae.callbacks.evaluation import say_sigterm_waited

    def trainer(noted, rank0=True, max_steps=10):
        return SimpleNamespace(is_global_zero=rank0, max_steps=max_steps,
                               _signal_connector=SimpleNamespace(gsae_noted=noted, received_sigterm=False))

    with caplog.at_level("WARNING", logger="gsae.callbacks.evaluation"):
        say_sigterm_waited(trainer(False), 5, 2)
        say_sigterm_waited(trainer(True, rank0=False), 5, 2)
        assert not caplog.records
        say_sigterm_waited(trainer(True), 5, 2)
        say_sigterm_waited(trainer(True), 10, 2)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["SIGTERM during the evaluation at step 5: its 2 ranks share the benchmarks, so it ran to its end; "
                    "the run stops at the next step and saves it",
                    "SIGTERM during the evaluation at step 10: its 2 ranks share the benchmarks, so it ran to its end; "
                    "training had finished, so the run ends now (nothing to resume)"], said


def test_a_saelens_sae_whose_tokens_cannot_be_read_fails_before_any_evaluation(run_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """A SAELens SAE on gsae-tiny records no gsae dataset, so evaluate.py's default is OpenWebText, which an offline
    machine cannot open: named after the checkpoint, that failure came after the checkpoint's evaluation (minutes at
    GPT-2 scale), with nothing written. Its tokens are now read first."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    import gsae.evaluate as ev

    meta = SAEMetadata(hook_name=QUICKSTART_HOOK, model_name="gsae-tiny", context_size=32, prepend_bos=True)
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=128, d_sae=64, metadata=meta)).save_model(tmp_path / "sl")
    ran = []
    monkeypatch.setattr(ev, "run_benchmarks", lambda *a, **k: ran.append(a[0]) or {})
    ckpt = str(run_dir / "checkpoints" / "epoch=0-step=10.ckpt")
    assert evaluate_main([ckpt, str(tmp_path / "sl"), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Skylion007/openwebtext is evaluate.py's default" in err, err
    assert ran == []


def test_evaluate_py_names_a_paths_tensorboard_run_by_its_own_path_whatever_the_other_paths(tmp_path, fake_benchmark,
                                                                                          monkeypatch):
    """``--logdir``'s runs were named relative to the PATHs' common folder: a lone ``a/last.saelens`` became the run
    ``last.saelens``, so another call's ``b/last.saelens`` (another SAE) drew on the same curve, and ``a``'s SAE
    evaluated beside ``b`` got a second run. Now each PATH's run is its path from the current folder."""
    from gsae.evaluate import tensorboard_runs
    from tests.evals.helpers import export_tiny

    monkeypatch.chdir(tmp_path)
    for run, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        export_tiny(tmp_path / run / "last.saelens")
    tb = tmp_path / "tb"
    common = ["--benchmarks", "fake", "--n-seqs", "3", "--logdir", str(tb)]
    assert evaluate_main(["a/last.saelens", *common]) == 0
    assert evaluate_main([str(tmp_path / "b" / "last.saelens"), *common]) == 0  # absolute, inside the current folder
    assert evaluate_main(["a/last.saelens", "b/last.saelens", *common]) == 0
    assert sorted(p.name for p in tb.iterdir()) == ["a_last.saelens", "b_last.saelens"]
    # a PATH named twice: its run gets one point (as a later call replaces it), not two at one step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert evaluate_main(["a/last.saelens", "a/last.saelens", *common]) == 0
    events = EventAccumulator(str(tb / "a_last.saelens"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/fake/n_tokens")] == [0]
    assert tensorboard_runs(["x.ckpt:m", "../y", "..", "sae_lens:rel/id"]) == {
        "x.ckpt:m": "x.ckpt:m", "../y": str(tmp_path.parent / "y"), "..": str(tmp_path.parent),
        "sae_lens:rel/id": "sae_lens:rel/id"}


def test_a_short_held_out_set_is_said_before_training_not_at_the_first_checkpoint(tmp_path):
    """The held-out contexts are read when the fit is set up (and kept for every checkpoint), so a held-out set shorter
    than the benchmarks read is said at the start: it was said at the first checkpoint, after the training up to it."""
    import lightning.pytorch as pl

    from gsae.data import TokenDataModule
    from tests.systems.helpers import build_system, build_trainer

    text = tmp_path / "docs.txt"
    text.write_text("".join(f"document {i} has a few words in it, then some more words.\n\n" for i in range(300)))
    system = build_system("topk")
    data = TokenDataModule(system.lm, dataset=str(text), context_size=16, batch_size=4, val_documents=6,
                           text_unit="paragraph")
    ev = EvaluationCallback(benchmarks=["loss_added"], n_seqs=64, log_figures=False)
    seen = []

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(ev._tokens is not None and 0 < ev._tokens.shape[0] < 64)

    with pytest.warns(UserWarning, match=r"evaluation: the held-out set gives \d+ contexts of the 64"):
        build_trainer(tmp_path, 1, callbacks=[ev, AtStart()]).fit(system, datamodule=data)
    assert seen == [True]


def test_a_held_out_set_one_context_short_is_said_and_an_empty_one_is_refused_in_one_line(tmp_path, tiny_lm):
    from tests.evals.helpers import build_tokens

    trainer, _ = _fake_trainer(tmp_path, tiny_lm)
    trainer.datamodule.contexts = lambda which: iter(build_tokens(63, 16).tolist())
    cb = EvaluationCallback(benchmarks=["loss_added"], n_seqs=64, log_figures=False)
    with pytest.warns(UserWarning, match=r"evaluation: the held-out set gives 63 contexts of the 64"):
        assert cb.held_out_tokens(trainer).shape == (63, 16)
    trainer.datamodule.contexts, trainer.datamodule.val_documents = (lambda which: iter([])), 0
    empty = r"^--data.val_documents 0: the held-out set gives no context to evaluate on"
    with pytest.raises(ValueError, match=empty):
        EvaluationCallback(benchmarks=["loss_added"]).held_out_tokens(trainer)
    with pytest.raises(ValueError, match=empty):  # the ranks that do not evaluate check it too
        EvaluationCallback(benchmarks=["loss_added"]).check_held_out(trainer)


def test_the_runs_seed_and_options_are_taken_and_the_command_line_wins():
    """evaluate.py takes a checkpoint's recorded seed, benchmarks, n_seqs and options; ``--seed`` and ``--options``
    (per key) win over them."""
    from gsae.evals import BENCHMARKS, OPT_IN
    from gsae.evaluate import Source, _batch_size, _benchmarks, _merged_options, build_parser, with_run_settings

    run = {"benchmarks": ["steering"], "n_seqs": 4, "seed": 7, "options": {"steering": {"n_latents": 2, "alphas": [0, 5]}}}
    src = Source("a.ckpt", "ckpt", "a.ckpt", "a.ckpt", evaluation=run)
    args = with_run_settings(build_parser().parse_args(["a.ckpt"]), [src])
    assert args.seed == 7 and args.n_seqs == 4 and args.benchmarks == "steering"
    assert with_run_settings(build_parser().parse_args(["a.ckpt", "--seed", "3"]), [src]).seed == 3
    merged = _merged_options(args.run_options, {"steering": {"n_latents": 5}}, ["steering"])
    assert merged == {"steering": {"n_latents": 5, "alphas": [0, 5]}}
    # the run's evaluation batch size is the one evaluate.py uses, unless --batch-size says otherwise
    src = src._replace(evaluation={**run, "batch_size": 6}, batch_size=2)
    args = with_run_settings(build_parser().parse_args(["a.ckpt"]), [src])
    assert _batch_size(args, src, {}) == 6
    assert _batch_size(with_run_settings(build_parser().parse_args(["a.ckpt", "--batch-size", "3"]), [src]), src, {}) == 3
    # checkpoints evaluated differently (or SAELens folders) get evaluate.py's defaults, one set for all
    other = src._replace(label="b.ckpt", evaluation={**run, "seed": 8})
    args = with_run_settings(build_parser().parse_args(["a.ckpt", "b.ckpt"]), [src, other])
    assert (args.seed, args.n_seqs, args.benchmarks, args.run_options, args.run_batch_size) == (0, None, None, {}, None)
    assert _batch_size(args, src, {}) == 2
    # by default every benchmark but the opt-in ones (plateaus: minutes per SAE)
    assert _benchmarks(None) == [b for b in BENCHMARKS if b not in OPT_IN] and "plateaus" in BENCHMARKS


def test_recorded_data_options_apply_only_to_the_training_dataset():
    from gsae.evaluate import Source, _token_options, build_parser

    src = Source("a.ckpt", "ckpt", "a.ckpt", "a.ckpt", dataset="train.txt", data={"text_unit": "line"})
    args = build_parser().parse_args(["a.ckpt"])
    assert _token_options(args, src, {}, "train.txt") == {"text_unit": "line"}
    assert _token_options(args, src, {}, "other.jsonl") == {}


def test_a_checkpoints_info_has_its_training_batch_size_and_its_data_description_over_its_stream_options(tmp_path):
    """What evaluate.py reads of a checkpoint: the training batch size (the data module's: the evaluation's batch size
    when the run recorded no evaluation settings) and the data options, the run's data description (``gsae``
    section) over the data module's saved stream options, which only fill in what the description lacks."""
    from gsae.evaluate import _ckpt_info

    torch.save({"global_step": 7, "TokenDataModule": {
        "dataset": "d.txt", "batch_size": 3, "text_unit": "document",
        "position_options": {"dataset": "d.txt", "split": "train", "text_column": "text", "val_documents": 50}},
        "gsae": {"data": {"text_unit": "paragraph", "text_column": "content"}}}, tmp_path / "a.ckpt")
    step, dataset, batch_size, hooks, evaluation, options = _ckpt_info(tmp_path / "a.ckpt")
    assert (step, dataset, batch_size, hooks, evaluation) == (7, "d.txt", 3, None, None)
    assert options == {"split": "train", "val_documents": 50, "text_column": "content", "text_unit": "paragraph"}


def test_an_empty_held_out_set_is_refused_in_one_line(tmp_path, tiny_lm):
    """A held-out set that gives no context (a run's ``val_documents`` 0): refused by name, not handed to the
    benchmarks as an empty tensor."""
    from gsae.evaluate import ArgumentError, held_out_tokens

    text = tmp_path / "t.txt"
    text.write_text("hello world this is text\n\nmore text here\n")
    assert held_out_tokens(tiny_lm, str(text), 16, 2).shape == (2, 16)
    with pytest.raises(ArgumentError, match=r"^--dataset '.*t\.txt': no validation contexts$"):
        held_out_tokens(tiny_lm, str(text), 16, 2, val_documents=0)


def test_evaluate_py_says_which_model_did_not_load_and_names_a_recorded_dataset_that_is_gone(run_dir, tmp_path,
                                                                                               capsys):
    """An LM that does not load is ``--model``'s when given (train.py's option name replaced), and a checkpoint
    whose recorded training dataset (a local file) is gone gets that file's error alone: not the hint for an SAE
    that records no dataset ("… is evaluate.py's default … pass --dataset")."""
    from tests.evals.helpers import export_tiny

    export_tiny(tmp_path / "a.saelens")
    assert evaluate_main([str(tmp_path / "a.saelens"), "--benchmarks", "loss_added", "--n-seqs", "2",
                          "--model", "random-nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model: unknown random preset 'random-nope'; choose from"), err
    state = torch.load(run_dir / "checkpoints" / "epoch=0-step=10.ckpt", weights_only=False)
    gone = tmp_path / "gone.txt"
    state["TokenDataModule"]["dataset"] = state["gsae"]["data"]["dataset"] = str(gone)
    torch.save(state, tmp_path / "g.ckpt")
    assert evaluate_main([str(tmp_path / "g.ckpt"), "--benchmarks", "loss_added", "--n-seqs", "2"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --dataset: local path {str(gone)!r} does not exist"


def test_a_run_folders_last_checkpoint_at_a_new_step_is_kept(tmp_path):
    """A last.ckpt at a step no step checkpoint holds (a run stopped between checkpoints) is one of the run's steps;
    one at a step checkpoint's step is shown once."""
    from gsae.evaluate import _run_folder

    for name, step in (("epoch=0-step=5.ckpt", 5), ("epoch=0-step=10.ckpt", 10), ("last.ckpt", 12)):
        torch.save({"global_step": step}, tmp_path / name)
    assert [(c.name, info[0]) for c, info in _run_folder(tmp_path)] == [
        ("epoch=0-step=5.ckpt", 5), ("epoch=0-step=10.ckpt", 10), ("last.ckpt", 12)]
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")  # a copy of the step-10 one: shown once
    assert [c.name for c, _ in _run_folder(tmp_path)] == ["epoch=0-step=5.ckpt", "epoch=0-step=10.ckpt"]


def test_evaluate_py_table_tokens_line_and_short_labels_by_hand():
    """The printed table (a benchmark's ``SETTINGS`` rows under their own line, six significant digits, columns at
    least 12 wide), the tokens line (the data options that differ from ``TokenDataModule``'s defaults, "no BOS") and
    the table's labels (the common leading folder removed), written out by hand."""
    from gsae.evaluate import short_labels, table, tokens_line

    results = {"loss_added": {"a": {"L_added": 0.0123456789, "n_tokens": 100}, "bb": {"L_added": 2.5, "n_tokens": 7}}}
    assert table(results, ["a", "bb"]).splitlines() == [
        " " * 19 + " " + "a".rjust(12) + " " + "bb".rjust(12),  # the longest row name: 19 characters
        "loss_added.L_added " + " " + "0.0123457".rjust(12) + " " + "2.5".rjust(12),
        "settings and counts:",
        "loss_added.n_tokens" + " " + "100".rjust(12) + " " + "7".rjust(12),
    ]
    saes = {"x/a.ckpt": {"dataset": "d.txt", "context_size": 16, "prepend_bos": False, "contexts": {"loss_added": 4},
                         "data_options": {"text_unit": "paragraph", "split": "train", "seed": 0}}}
    assert tokens_line(saes, {"x/a.ckpt": "a.ckpt"}) == "tokens: d.txt, text_unit paragraph, contexts of 16, no BOS (loss_added 4)"
    saes["y/b.ckpt"] = {**saes["x/a.ckpt"], "prepend_bos": True, "data_options": {}}
    assert tokens_line(saes, {"x/a.ckpt": "x/a.ckpt", "y/b.ckpt": "y/b.ckpt"}).splitlines() == [
        "tokens of x/a.ckpt: d.txt, text_unit paragraph, contexts of 16, no BOS (loss_added 4)",
        "tokens of y/b.ckpt: d.txt, contexts of 16 (loss_added 4)"]
    assert short_labels(["runs/a/x.ckpt"]) == {"runs/a/x.ckpt": "x.ckpt"}
    assert short_labels(["runs/a/x.ckpt", "runs/b/y.ckpt:m", "sae_lens:r/i"]) == {
        "runs/a/x.ckpt": "a/x.ckpt", "runs/b/y.ckpt:m": "b/y.ckpt:m", "sae_lens:r/i": "sae_lens:r/i"}


def test_evaluate_py_passes_its_seed_and_batch_size_and_says_why_a_benchmark_was_skipped(tmp_path, fake_benchmark,
                                                                                         monkeypatch, capsys):
    """``--seed`` and ``--batch-size`` reach the benchmark (and the JSON's settings); a benchmark's ``skipped`` reason is
    printed under the table; the SAE's own context size is capped at the model's n_ctx (here 128, of 1000), and a
    context size of exactly n_ctx is taken."""
    from tests.evals import fake_benchmark as fake
    from tests.evals.helpers import export_tiny

    seen = {}

    def run(sae, lm, hook, tokens, *, seed=0, **options):
        seen.update(seed=seed, batch_size=options.get("batch_size"), shape=tuple(tokens.shape), first=tokens[:, 0].tolist(),
                    bos=lm.bos_token_id)
        return {"n_tokens": int(tokens.numel()), "hook": hook, "skipped": "fake: nothing to measure here"}

    monkeypatch.setattr(fake, "run", run)
    export_tiny(tmp_path / "a.saelens", context_size=1000)
    out = tmp_path / "res.json"
    args = [str(tmp_path / "a.saelens"), "--benchmarks", "fake", "--n-seqs", "3", "--output", str(out)]
    assert evaluate_main([*args, "--seed", "5", "--batch-size", "3"]) == 0
    assert seen["seed"] == 5 and seen["batch_size"] == 3 and seen["shape"] == (3, 128)
    assert set(seen["first"]) == {seen["bos"]}  # BOS first: the export records prepend_bos True
    (setup,) = json.loads(out.read_text())["settings"]["saes"].values()
    assert setup["batch_size"] == 3 and setup["context_size"] == 128
    assert "fake skipped for a.saelens: nothing to measure here" in capsys.readouterr().out
    # a SAELens SAE trained without BOS is evaluated on contexts without it
    export_tiny(tmp_path / "n.saelens", prepend_bos=False)
    assert evaluate_main([str(tmp_path / "n.saelens"), "--benchmarks", "fake", "--n-seqs", "3"]) == 0
    assert seen["shape"] == (3, 16) and seen["bos"] not in seen["first"]
    assert "no BOS" in capsys.readouterr().out


def test_evaluate_py_refuses_an_sae_that_cannot_be_evaluated_in_one_line(tmp_path, fake_benchmark, capsys):
    """NaN weights (their benchmarks gave nulls and an L0 of k), an SAE narrower than its hook, a batch size of 0 and
    options for a benchmark not run: one ``error:`` line each, exit 1."""
    from tests.evals.helpers import HOOK, build_topk, export_tiny

    nan = build_topk()
    with torch.no_grad():
        nan.W_enc[0, 0] = float("nan")
    export_tiny(tmp_path / "nan.saelens", nan)
    export_tiny(tmp_path / "narrow.saelens", build_topk(d_in=32))
    export_tiny(tmp_path / "ok.saelens")
    cases = {
        (str(tmp_path / "nan.saelens"),): "the SAE's W_enc hold NaN or inf values",
        (str(tmp_path / "narrow.saelens"),): f"the SAE reads 32-wide activations, random-tiny's {HOOK} is 64 wide",
        (str(tmp_path / "ok.saelens"), "--batch-size", "0"): "--batch-size must be > 0 (got 0)",
        (str(tmp_path / "ok.saelens"), "--options", '{"loss_added": {"n_seqs": 2}}'):
            "--options: ['loss_added'] are not among --benchmarks ['fake']",
    }
    for args, needle in cases.items():
        assert evaluate_main([*args, "--benchmarks", "fake", "--n-seqs", "2"]) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, (args, err)


def test_evaluate_py_device_default_and_a_failed_rank_under_torchrun(monkeypatch):
    """The default device is cuda where there is one (under torchrun: this process's ``cuda:<LOCAL_RANK>``); a rank
    without an error of its own stops on another rank's, named by its rank."""
    import gsae.evaluate as ev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev._device(None) == "cuda" and ev._device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(ev, "_ranks", lambda: (1, 2))
    assert ev._device(None) == "cuda:1" and ev._device("cuda:0") == "cuda:0"

    def gather(into, mine):  # rank 0 failed; this is rank 1, which did not
        into[:] = ["OSError: disk full", mine]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    with pytest.raises(RuntimeError, match=r"^rank 0 failed: OSError: disk full$"):
        ev._agree(None)
    with pytest.raises(ValueError, match="its own"):
        ev._agree(ValueError("its own"))


def test_evaluate_py_reads_a_checkpoint_trained_without_bos_without_it(run_dir, tmp_path, fake_benchmark, monkeypatch,
                                                                       capsys):
    """A checkpoint of a run whose contexts had no BOS (``--data.prepend_bos false``, as its ``gsae`` section records)
    is evaluated on contexts without it, and the JSON and the tokens line say so."""
    from tests.evals import fake_benchmark as fake

    firsts = []
    monkeypatch.setattr(fake, "run", lambda sae, lm, hook, tokens, **o: firsts.append(
        (set(tokens[:, 0].tolist()), lm.bos_token_id)) or {"n_tokens": int(tokens.numel()), "hook": hook})
    state = torch.load(run_dir / "checkpoints" / "epoch=0-step=10.ckpt", weights_only=False)
    ckpts = {}
    for bos in (True, False):
        state["gsae"]["data"]["prepend_bos"] = bos
        ckpts[bos] = tmp_path / f"bos={bos}.ckpt"
        torch.save(state, ckpts[bos])
    out = tmp_path / "res.json"
    args = [str(ckpts[True]), str(ckpts[False]), "--benchmarks", "fake", "--n-seqs", "2", "--output", str(out)]
    assert evaluate_main(args) == 0
    (with_bos, bos_id), (without, _) = firsts
    assert with_bos == {bos_id} and bos_id not in without
    saes = json.loads(out.read_text())["settings"]["saes"]
    assert [saes[str(ckpts[b])]["prepend_bos"] for b in (True, False)] == [True, False]
    assert "tokens of bos=False.ckpt: gsae-corpus, contexts of 64, no BOS (fake 2)" in capsys.readouterr().out
