"""Every YAML in configs/ parses with the real CLI parser (no model is built, so GPT-2 configs need no
network); ``--help`` shows the docstrings; ``--print_config`` round-trips."""

from __future__ import annotations

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
    ``grad_mean_tokens`` 4064 and ``num_workers`` 2 under a quickstart)."""
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
    # β=1e5's reference scale: the CE mean over one device's B·(T−1) predictions of this config
    assert config.model.init_args.grad_mean_tokens == config.data.batch_size * (config.data.context_size - 1)


def test_e2e_ds_uses_apollos_pretokenized_rows_as_is(parse_only) -> None:
    config = parse_only(["--config", "configs/gpt2/e2e_ds.yaml"])
    assert config.data.prepend_bos is False and config.data.context_size == 1024
    assert config.model.init_args.sae.init_args.tied_init is False  # Apollo's untied nn.Linear encoder
