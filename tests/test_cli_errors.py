"""Errors jsonargparse raises before anything is built, through the real ``python train.py`` (a subprocess):
a non-zero exit, at most two lines on stderr naming the file or option, no usage dump, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart/topk.yaml"


def train(*args: str) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("GSAE_DEBUG", None)
    p = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return p.returncode, [line for line in p.stderr.splitlines() if line.strip()]


def check(code: int, lines: list[str], *expected: str) -> str:
    assert code != 0
    assert 1 <= len(lines) <= 2, lines
    text = "\n".join(lines)
    assert "Traceback" not in text and "usage:" not in text, text
    assert lines[-1].startswith("error: "), lines
    assert "see python train.py --help" in text
    for e in expected:
        assert e in text, text
    return text


def test_missing_config_file(tmp_path) -> None:
    path = tmp_path / "no-such.yaml"
    check(*train("--config", str(path)), "--config", str(path), "no such file")


def test_yaml_syntax_error(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_steps: 10\n  logger: [a, b\nmodel: {}\n")
    check(*train("--config", str(path)), f"--config {path}", "YAML syntax error", "line 4")


def test_wrongly_typed_option() -> None:
    text = check(*train("--config", QUICKSTART, "--model.init_args.sae.init_args.k", "abc"))
    assert "--model.init_args.sae.init_args.k: expected an integer, got 'abc'" in text


def test_wrongly_typed_option_in_config_file(tmp_path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text("model:\n  init_args:\n    sae:\n      init_args:\n        k: abc\n")
    check(*train("--config", QUICKSTART, "--config", str(path)), "--model.sae.k: expected an integer, got 'abc'")


def test_unknown_key_in_a_config_file_names_the_option_and_the_file(tmp_path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("trainer:\n  max_stepz: 3\n")
    check(*train("--config", QUICKSTART, "--config", str(path)), f"--trainer.max_stepz: unknown option (in --config {path})")


def test_bad_choice() -> None:
    check(*train("--config", QUICKSTART, "--model.init_args.lr_schedule", "linear"), "--model.init_args.lr_schedule",
          "one of 'cosine', 'constant'", "'linear'")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", QUICKSTART, "--model.init_args.sae.class_path", "gsae.sae.TopKSAEE"],
         "--model.init_args.sae.class_path: no class 'TopKSAEE' in gsae.sae"),
        (["--config", QUICKSTART, "--model.init_args.optimizer.init_args.lr", "inf"],
         "--model.init_args.optimizer.init_args.lr: expected a number, got 'inf'"),
        (["--config", QUICKSTART, "--trainer.precision", "15"], "--trainer.precision: expected one of 64, 32, 16, "),
        (["--config", "configs/quickstart/sweep.yaml", "--model.sae.k", "8"],
         "--model.sae.k: no such option of SweepSAESystem"),
        (["--config", QUICKSTART, "--checkpoint.save_last", "yes please"],
         "--checkpoint.save_last: expected one of true, false, 'link', got 'yes please'"),
        # these said only "Given value: ..." (the whole model's settings for a config file's class_path)
        (["--config", QUICKSTART, "--model", "gsae.systems.Nope"], "--model: no class 'Nope' in gsae.systems"),
        (["--config", QUICKSTART, "--model", "torch.nn.Linear"], "--model: torch.nn.Linear is not a SAESystem"),
        (["--config", QUICKSTART, "--model.sae", "torch.nn.Linear"],
         "--model.sae: torch.nn.Linear is not a SparseAutoencoder"),
        (["--config", QUICKSTART, "--seed_everything", "abc"],
         "--seed_everything: expected true or false or an integer, got 'abc'"),
        (["--config", QUICKSTART, "--evaluation.options", '{"loss_added": {n_seqs: 4}'],
         "--evaluation.options: expected a mapping (not valid YAML/JSON at column 27"),
        (["--config", "configs/quickstart/sweep.yaml", "--model.members", "null"],
         "--model.members: required (not given, or null)"),
    ],
    ids=["no-such-class", "lr-inf", "precision-union", "sweep-has-no-sae", "bool-or-literal", "no-such-system",
         "not-a-system", "not-an-sae", "seed-union", "options-json", "members-null"],
)
def test_nested_and_union_errors_say_what_is_wrong(args: list[str], expected: str) -> None:
    """jsonargparse ends these with ``Given value: NestedArg(...)``, which said nothing of what was wrong."""
    text = check(*train(*args), expected)
    assert "NestedArg" not in text and "Given value" not in text


def test_an_unknown_class_in_a_config_file_is_named(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text((REPO_ROOT / QUICKSTART).read_text().replace("gsae.sae.TopKSAE", "gsae.sae.NoSuchSAE"))
    text = check(*train("--config", str(config)), "--model.sae: no class 'NoSuchSAE' in gsae.sae")
    assert "Given value" not in text and "buffer_size" not in text


@pytest.mark.parametrize("option", ["--data.no_such_option", "--model.init_args.sae.init_args.beta"])
def test_unknown_option(option: str) -> None:
    check(*train("--config", QUICKSTART, option, "1"), option)


def test_help_still_prints_usage() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout and "--model" in p.stdout


def test_config_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    check(*train("--config", str(path)), f"--config {path}: not a YAML mapping of options")


@pytest.mark.parametrize("case", ["source", "held-out"])
def test_a_data_error_under_ddp_is_said_once_before_the_ranks_start(tmp_path, case) -> None:
    """``--trainer.devices 2 --trainer.strategy ddp`` with bad data: checked in the launching process, so one line,
    not one per rank (each rank used to fail in its own setup and print the same error)."""
    from tests.systems.launch import QUICKSTART, free_port, start

    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "docs.txt").write_text("".join(f"document {i} has a few words in it\n\n" for i in range(50)))
    data = {"source": ["--data.dataset", str(tmp_path / "empty")],  # no text files
            "held-out": ["--data.dataset", str(tmp_path / "text"), "--data.val_documents", "0"]}[case]
    args = ["--config", QUICKSTART, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator",
            "cpu", "--trainer.default_root_dir", str(tmp_path / "run"), *data]
    proc = start(args, MASTER_PORT=str(free_port()))
    out, _ = proc.communicate(timeout=300)
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert proc.returncode == 1 and len(errors) == 1, out[-3000:]
    want = {"source": "--data.dataset: no .json/.jsonl/.parquet/.txt files", "held-out": "--data.val_documents 0"}[case]
    assert errors[0].startswith(f"error: {want}"), errors
    assert "Starting with 2 processes" not in out  # refused before the second rank started


def test_an_error_found_while_building_comes_alone(tmp_path) -> None:
    """Options that parse but fail when the model or data is built (k > d_sae, a missing dataset file) printed
    Lightning's "Seed set to 0" / "GPU available" / "TPU available" lines first, as if training had started; they
    are held until the checks pass, so the error is the only line. A file that is not parquet named .parquet:
    ``datasets``' builder logged its error twice before the one line."""
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(range(256)) * 8)
    for args, said in ((("--model.sae.k", "5000"), "error: --model.sae.k must be <= d_sae (got 5000 > 1024)"),
                       (("--data.dataset", str(tmp_path / "none.txt")), "error: --data.dataset: local path"),
                       (("--data.dataset", str(bad)), f"error: --data.dataset: could not open {str(bad)!r} (split "
                                                       "'train'): Parquet magic bytes not found")):
        code, lines = train("--config", QUICKSTART, *args, "--trainer.default_root_dir", str(tmp_path))
        assert code == 1 and len(lines) == 1 and lines[0].startswith(said), lines
