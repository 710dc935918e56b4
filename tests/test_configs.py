"""Every YAML in configs/ parses with the real CLI parser (no model is built, so GPT-2 configs need no
network); ``--help`` shows the docstrings; ``--print_config`` round-trips."""

from __future__ import annotations

import re
import subprocess
import sys
from argparse import ArgumentError
from pathlib import Path

import pytest
import yaml

from gsae import cli
from gsae.cli_errors import parse_error_line

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


@pytest.fixture
def parse_only(monkeypatch):
    """``build_cli`` exactly as ``train.py`` runs it, minus instantiating the classes: returns the config."""
    monkeypatch.setattr(cli.GSAECLI, "instantiate_classes", lambda self: None)
    monkeypatch.chdir(REPO_ROOT)
    return lambda args: cli.build_cli(args).config


def _assert_contains(parsed, expected, where: str) -> None:
    """Every key of the YAML is a known option and keeps its value."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert key in parsed, f"{where}.{key} missing from the parsed config"
            _assert_contains(parsed[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(parsed) == len(expected), where
        for i, (p, e) in enumerate(zip(parsed, expected)):
            _assert_contains(p, e, f"{where}[{i}]")
    else:
        assert parsed == expected, f"{where}: parsed {parsed!r}, file says {expected!r}"


def test_there_are_configs() -> None:
    names = {p.relative_to(REPO_ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"gpt2/topk.yaml", "quickstart/topk.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO_ROOT / "configs").as_posix())
def test_config_parses(parse_only, path: Path) -> None:
    config = parse_only(["--config", str(path)])
    _assert_contains(config, yaml.safe_load(path.read_text()), path.name)
    assert config.model.class_path.startswith("gsae.systems.")
    if config.model.class_path == "gsae.systems.SweepSAESystem":  # a sweep: every member names a gsae SAE
        members = config.model.init_args.members
        assert members and all(str(m["sae"]["class_path"]).startswith("gsae.sae.") for m in members)
    else:
        assert config.model.init_args.sae.class_path.startswith("gsae.sae.")


def test_a_typo_in_a_config_is_rejected(parse_only, tmp_path, capsys) -> None:
    data = yaml.safe_load((REPO_ROOT / "configs/quickstart/topk.yaml").read_text())
    data["model"]["init_args"]["sae"]["init_args"]["kk"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    args = ["--config", str(bad)]
    with pytest.raises(ArgumentError) as exc:  # main() prints it as one line (tests/test_cli_errors.py)
        parse_only(args)
    assert parse_error_line(str(exc.value), args).startswith("--model.sae.kk: no such option")


def test_parse_errors_name_the_file_or_option_the_user_gave(parse_only, tmp_path) -> None:
    """The one line :func:`parse_error_line` makes of jsonargparse's errors, for the spellings the subprocess tests of
    ``tests/test_cli_errors.py`` do not use: ``--config=FILE``, an inline config before a broken file, two configs of
    which the second is not a mapping, an option without its value (last on the line), a bad value in a config file
    beside a typed option of the same name elsewhere, and ``--print_config`` last on the line."""
    quick = "configs/quickstart/topk.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: 10\n  logger: [a, b\nmodel: {}\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    seed = tmp_path / "seed.yaml"
    seed.write_text("model:\n  init_args:\n    sae:\n      init_args:\n        seed: abc\n")
    k = tmp_path / "k.yaml"
    k.write_text("model:\n  init_args:\n    sae:\n      init_args:\n        k: abc\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  foo: 1\n")
    syntax = (f"--config {broken}: YAML syntax error at line 4, column 6: expected ',' or ']', but got ':' (while "
              "parsing a flow sequence from line 3, column 11)")
    cases = [
        ([f"--config={broken}"], syntax),
        (["--config", "{trainer: {max_steps: 2}}", "--config", str(broken)], syntax),  # an inline config is no file
        (["--config", quick, "--config", str(listed)], f"--config {listed}: not a YAML mapping of options"),
        (["--config", quick, "--trainer.max_steps"], "--trainer.max_steps: expected a value"),
        # --data.seed is typed, but the bad seed is the SAE's, from the file
        (["--config", quick, "--data.seed", "1", "--config", str(seed)], "--model.sae.seed: expected an integer, got 'abc'"),
        (["--config", quick, "--config", str(k), "--print_config"], "--model.sae.k: expected an integer, got 'abc'"),
        # the config file at fault, not the last one given; -c as --config
        (["--config", str(listed), "--config", quick], f"--config {listed}: not a YAML mapping of options"),
        (["-c", str(broken)], syntax),
        ([f"-c{listed}"], f"--config {listed}: not a YAML mapping of options"),
        (["--config", quick, "--config", str(unknown), "--config", quick], f"--trainer.foo: unknown option (in --config {unknown})"),
        # a group's or a class's options from a file that is not there or not a mapping; a value inside a mapping
        (["--config", quick, "--data", "/no/such.yaml"], "--data: no such file '/no/such.yaml'"),
        (["--config", quick, "--trainer", "/no/such.yaml"], "--trainer: no such file '/no/such.yaml'"),
        (["--config", quick, "--model", "/no/such.yaml"], "--model: no such file '/no/such.yaml'"),
        (["--config", quick, "--model.sae", "/no/such.yaml"], "--model.sae: no such file '/no/such.yaml'"),
        (["--config", quick, "--model.sae", "TopKSAEE"], "--model.sae: 'TopKSAEE' is neither a class (module.Class) nor a config file"),
        (["--config", quick, "--model.sae", str(listed)],
         f"--model.sae: expected a class (module.Class) or a mapping of its options, got '{listed}'"),
        (["--config", quick, "--data", str(listed)], f"--data: '{listed}' is not a config file it can read (a YAML mapping of options)"),
        (["--config", quick, "--model.optimizer", "{lr: abc}"], "--model.optimizer.lr: expected a number, got 'abc'"),
    ]
    for args, line in cases:
        with pytest.raises(ArgumentError) as exc:
            parse_only(args)
        assert parse_error_line(str(exc.value), args) == f"{line} (see python train.py --help)", args


def test_a_config_without_trainer_or_checkpoint_options_gets_gsae_s_defaults(parse_only, tmp_path) -> None:
    """What ``train.py`` sets where a config says nothing (every shipped config sets these itself, so only a user's own
    config relies on them): a checkpoint every 1000 steps, a logged step every 10, no epoch limit (the stream is
    endless), seed 0, the run under ``checkpoints/``, no model summary."""
    data = yaml.safe_load((REPO_ROOT / "configs/quickstart/topk.yaml").read_text())
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"model": data["model"], "data": data["data"]}))
    config = parse_only(["--config", str(own)])
    assert config.checkpoint.every_n_train_steps == 1000
    assert config.trainer.log_every_n_steps == 10 and config.trainer.max_epochs == -1
    assert config.trainer.default_root_dir == "checkpoints" and config.trainer.enable_model_summary is False
    assert config.seed_everything == 0


def test_command_line_overrides_the_config(parse_only) -> None:
    config = parse_only(["--config", "configs/quickstart/topk.yaml", "--model.init_args.sae.init_args.k", "8",
                         "--data.batch_size", "3"])
    assert config.model.init_args.sae.init_args.k == 8 and config.data.batch_size == 3
    # the shorthand without init_args (subclass mode) sets the same options
    config = parse_only(["--config", "configs/quickstart/topk.yaml", "--model.sae.k", "4", "--model.hook",
                         "blocks.0.hook_resid_post"])
    assert config.model.init_args.sae.init_args.k == 4
    assert config.model.init_args.hook == "blocks.0.hook_resid_post"


@pytest.mark.parametrize("flag", [["-c", "{}"], ["-c{}"], ["--config={}"]])
def test_short_config_flags_replace_the_default_config(parse_only, flag) -> None:
    """``-c FILE`` is ``--config FILE``: the default GPT-2 config must not go underneath it (it did, and set
    ``grad_mean_tokens`` 8160 and ``num_workers`` 2 under a quickstart)."""
    path = "configs/quickstart/layers_sweep.yaml"
    expected = parse_only(["--config", path])
    got = parse_only([f.format(path) for f in flag])
    assert got.model == expected.model and got.data == expected.data and got.trainer == expected.trainer


def test_default_config_is_gpt2_topk(parse_only) -> None:
    config = parse_only([])
    assert config.model.init_args.lm.name == "gpt2"
    assert config.model.init_args.hook == "blocks.7.hook_resid_post"


def _exit_output(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.build_cli(args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


def test_help_shows_the_docstrings(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    out = _exit_output(capsys, ["--help"])
    assert "--model.help" in out and "--data.context_size" in out
    assert "tokens per context, BOS included" in out  # TokenDataModule's Args: line
    out = _exit_output(capsys, ["--model.help", "LocalSAESystem"])
    assert "--model.sae" in out and "the SAE class and its options" in out
    assert "--model.buffer_size" in out
    out = _exit_output(capsys, ["--config", "configs/quickstart/topk.yaml", "--model.sae.help", "TopKSAE"])
    assert "number of active latents per token" in out and "k" in out


def test_print_config_round_trips(capsys, parse_only, tmp_path) -> None:
    printed = _exit_output(capsys, ["--config", "configs/quickstart/topk.yaml", "--print_config"])
    data = yaml.safe_load(printed)
    assert data["model"]["init_args"]["sae"]["init_args"]["k"] == 16
    assert data["model"]["init_args"]["lm"]["name"] == "gsae-tiny"
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    original = parse_only(["--config", "configs/quickstart/topk.yaml"])
    reparsed = parse_only(["--config", str(again)])
    assert reparsed.model == original.model and reparsed.data == original.data


@pytest.mark.slow
def test_train_py_help_and_print_config_in_a_subprocess() -> None:
    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--model.help" in run.stdout and "--ckpt_path" in run.stdout
    run = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart/topk.yaml", "--print_config"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["model"]["init_args"]["sae"]["init_args"]["d_sae"] == 1024


PAPER = [p for p in CONFIGS if p.parent.name in ("gpt2", "scaling")]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO_ROOT / "configs").as_posix())
def test_configs_leave_the_run_folder_to_the_root_dir(parse_only, path: Path) -> None:
    """No config hard-codes where the logger writes: ``--trainer.default_root_dir`` holds the whole run."""
    logger = yaml.safe_load(path.read_text())["trainer"].get("logger") or {}
    assert "save_dir" not in logger.get("init_args", {}), f"{path.name} hard-codes the logger's save_dir"
    config = parse_only(["--config", str(path), "--trainer.default_root_dir", "/some/root"])
    assert config.trainer.logger.init_args.save_dir == "/some/root"
    assert config.trainer.logger.init_args.name  # every run keeps its name


@pytest.mark.parametrize("path", [p for p in PAPER if "ReLU" not in p.read_text()], ids=lambda p: p.name)
def test_paper_topk_configs_have_no_auxk(parse_only, path: Path) -> None:
    """smol-sae (the g-SAE authors' base) has no AuxK; it changes late-training dead fractions (Table 1)."""
    model = parse_only(["--config", str(path)]).model.init_args
    if "members" in model:  # a sweep: every member
        assert model.members and all(m["sae"]["init_args"]["k_aux"] == 0 for m in model.members)
    else:
        assert model.sae.init_args.k_aux == 0


@pytest.mark.parametrize("path", [p for p in PAPER if "GradTopKSAE" in p.read_text()], ids=lambda p: p.name)
def test_gsae_configs_state_the_gradient_scale(parse_only, path: Path) -> None:
    config = parse_only(["--config", str(path)])
    # β=1e5's reference scale: the CE mean over smol-sae's LM batch, 32 contexts of 256 (SPEC §1.2, §1.3), whatever
    # this config's own batch (16 × 256 here: its default, 16 × 255, made each token's gradient twice the paper's)
    assert config.model.init_args.grad_mean_tokens == 32 * (256 - 1)


@pytest.mark.parametrize("path", [p for p in PAPER if "ReLU" not in p.read_text()], ids=lambda p: p.name)
def test_paper_configs_train_smol_sae_batches(parse_only, path: Path) -> None:
    """The g-SAE paper's runs as its authors' smol-sae makes them (SPEC §1.3): 4096-token steps of contexts of 256
    (they were 32 x 128: half the context every token's gradient and every prediction sees), ~14M tokens, biases
    initialised to zero (gsae's default is Gao et al.'s geometric median). The header's multi-GPU command keeps the
    one-GPU run: the same tokens per step and, per device, 1/8 of the shuffle buffer (131072 per rank filled for 8x
    as many steps, ~7% fewer tokens trained)."""
    config = parse_only(["--config", str(path)])
    model, data = config.model.init_args, config.data
    assert (data.context_size, data.batch_size) == (256, 16)
    assert 3456 * data.batch_size * data.context_size == 14_155_776  # "~14M tokens" (Fig. 4)
    assert model.b_dec_init == "zeros"
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    multi = re.search(r"--trainer\.devices (\d+) --data\.batch_size (\d+)(?: --model\.buffer_size (\d+))?", header)
    assert multi, f"{path.name}: no multi-GPU command in its header"
    devices, per_device, buffer = (int(g) if g else None for g in multi.groups())
    assert devices * per_device == data.batch_size
    assert (buffer is None) == (model.get("buffer_size") in (None, 0)), "a buffered config names its per-device buffer"
    if buffer is not None:
        assert devices * buffer == model.buffer_size


def test_e2e_ds_uses_apollos_pretokenized_rows_as_is(parse_only) -> None:
    config = parse_only(["--config", "configs/gpt2/e2e_ds.yaml"])
    assert config.data.prepend_bos is False and config.data.context_size == 1024
    assert config.model.init_args.sae.init_args.tied_init is False  # Apollo's untied nn.Linear encoder


GPT2_CONFIGS = sorted((REPO_ROOT / "configs" / "gpt2").glob("*.yaml"))
SCALING_CONFIGS = sorted((REPO_ROOT / "configs" / "gpt2" / "scaling").glob("*.yaml"))


@pytest.mark.parametrize("path", SCALING_CONFIGS, ids=lambda p: p.stem)
def test_each_scaling_config_has_a_random_preset_of_its_models_shape(path):
    """The scaling configs can be tried offline on ``random-<model>``, which has the model's shape (TransformerLens'
    config of each GPT-2 size): their hook is a layer three quarters of the way through, 20× expansion, k 32."""
    from gsae.lm import RANDOM_PRESETS

    init = yaml.safe_load(path.read_text())["model"]["init_args"]
    model = init["lm"]["name"]
    shape = RANDOM_PRESETS[f"random-{model}"]
    want = {"gpt2-medium": (24, 1024, 16, 4096), "gpt2-large": (36, 1280, 20, 5120), "gpt2-xl": (48, 1600, 25, 6400)}
    assert (shape["n_layers"], shape["d_model"], shape["n_heads"], shape["d_mlp"]) == want[model]
    layer = int(init["hook"].split(".")[1])
    assert layer < shape["n_layers"] and abs(layer / shape["n_layers"] - 0.75) < 0.05, init["hook"]
    assert init["sae"]["init_args"]["d_sae"] == 20 * shape["d_model"] and init["sae"]["init_args"]["k"] == 32


@pytest.mark.slow
def test_the_medium_scaling_config_trains_offline_at_its_shape(tmp_path):
    """``configs/gpt2/scaling/gpt2-medium-gsae.yaml`` on ``random-gpt2-medium`` (24 layers, d_model 1024, 20480
    latents), two steps of a small batch: the g-SAE harvest at layer 17, the checkpoint and its export."""
    import shutil

    from tests.systems.launch import finish, start

    root = tmp_path / "run"
    args = ["--config", "configs/gpt2/scaling/gpt2-medium-gsae.yaml", "--model.lm.name", "random-gpt2-medium",
            "--data.dataset", "synthetic", "--data.batch_size", "2", "--data.context_size", "32",
            "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir",
            str(root), "--evaluation.enabled", "false", "--trainer.enable_progress_bar", "false"]
    try:
        out = finish(start(args), timeout=600)
        assert "finished: 2 steps" in out, out[-2000:]
        assert sorted(p.name for p in root.rglob("*.saelens")) == ["epoch=0-step=2.saelens", "last.saelens"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", GPT2_CONFIGS, ids=lambda p: p.stem)
def test_each_gpt2_config_trains_at_gpt2_shape(path, tmp_path):
    """The shipped GPT-2 configs through ``python train.py`` at GPT-2 small's shape (``random-gpt2``: its weights
    random, so no download), on synthetic tokens at a small batch: two steps of every SAE they define (the 10-member
    Table 1 sweep, the layers sweep, e2e and e2e-ds with their KL, the g-SAE's harvest), the checkpoint and each
    member's SAELens export. The parse-only tests above would not see a config whose options fail when the system is
    built or stepped (a member the stack cannot hold, a schedule, a hook the model lacks). The evaluation is off: its
    GPT-2 budgets take minutes on a CPU (``benchmarks/eval_speed.py`` times them). ``last.ckpt`` links the step's
    checkpoint (the sweep's is 2.8 GB: written twice, the suite filled CI's disk); each run folder is removed after
    its test, so the suite holds one at a time."""
    import os
    import shutil

    from tests.systems.launch import finish, start

    root = tmp_path / "run"
    args = ["--config", str(path), "--model.lm.name", "random-gpt2", "--data.dataset", "synthetic",
            "--data.batch_size", "2", "--data.context_size", "32", "--trainer.max_steps", "2",
            "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(root),
            "--evaluation.enabled", "false", "--trainer.enable_progress_bar", "false"]
    try:
        out = finish(start(args), timeout=600)
        (ckpt,) = root.rglob("epoch=0-step=2.ckpt")
        members = yaml.safe_load(path.read_text())["model"]["init_args"].get("members")
        exports = sorted(p.name for p in ckpt.parent.glob("epoch=0-step=2*.saelens"))
        want = [f"epoch=0-step=2.{m['name']}.saelens" for m in members] if members else ["epoch=0-step=2.saelens"]
        assert exports == sorted(want), exports
        assert os.readlink(ckpt.parent / "last.ckpt") == ckpt.name
        assert "finished: 2 steps" in out, out[-2000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)
