"""Bad inputs through the real CLI, in process: exit code 1 and one ``error: ...`` line naming the option."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gsae.cli import main
from tests.conftest import quickstart_args

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK = "configs/quickstart/topk.yaml"


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """Run ``train.py`` in process on the quickstart config with extra args; returns (exit code, error line)."""
    monkeypatch.chdir(REPO_ROOT)
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # as a user's shell: no launcher's variables (a DDP test may set them)

    def run(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(quickstart_args(tmp_path, *extra, steps=2))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) <= 1, err
        return code, lines[0] if lines else ""

    return run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.hook", "blocks.99.hook_resid_pre"], ["--model.hook", "blocks.99.hook_resid_pre",
                                                                 "blocks.3.hook_resid_pre", "blocks.0.hook_resid_post"]),
        # a hook per pair of positions (B, heads, T, T): d_in came out as 1 and the first step raised an IndexError
        (["--model.init_args.hook", "blocks.0.attn.hook_pattern"], ["--model.hook: 'blocks.0.attn.hook_pattern' is not "
                                                                    "one vector per token", "blocks.L.hook_resid_pre"]),
        (["--model.init_args.sae.init_args.k", "2000"], ["--model.sae.k", "2000 > 1024"]),
        (["--model.sae", "null"], ["--model.sae is required for LocalSAESystem"]),  # an AttributeError traceback
        (["--model.init_args.sae.init_args.d_sae", "0"], ["--model.sae.d_sae", "got 0"]),
        (["--model.init_args.sae.init_args.k", "0"], ["--model.sae.k", "got 0"]),
        (["--data.context_size", "1000"], ["--data.context_size", "1000", "256"]),
        (["--data.batch_size", "0"], ["--data.batch_size"]),
        (["--data.val_batch_size", "-1"], ["--data.val_batch_size must be >= 1, or null"]),
        (["--model.init_args.sae.init_args.aux_coef", "-1"], ["--model.sae.aux_coef must be >= 0"]),
        (["--model.init_args.optimizer.init_args.lr", "0"], ["--model.optimizer.lr must be > 0 (got 0.0)"]),
        # a template with folders wrote checkpoints outside the run's folder (one run, one folder)
        (["--checkpoint.filename", "a/../../x{step}"], ["--checkpoint.filename 'a/../../x{step}': a file name, not a path"]),
        (["--checkpoint.every_n_train_steps", "-1"], ["--checkpoint.every_n_train_steps must be >= 0"]),
        (["--checkpoint.save_top_k", "-5"], ["--checkpoint.save_top_k must be -1 (keep all) or >= 0"]),
        (["--trainer.max_steps", "0"], ["--trainer.max_steps 0: nothing to train"]),
        (["--trainer.limit_train_batches", "0"], ["--trainer.limit_train_batches 0: nothing to train"]),
        (["--model.init_args.lm.name", "random-huge"], ["--model.lm.name", "random-huge"]),
        (["--ckpt_path", "last"], ["--ckpt_path last: no readable checkpoint in ", "quickstart-topk/checkpoints; nothing to resume"]),
        (["--ckpt_path", "does/not/exist.ckpt"], ["--ckpt_path: no checkpoint at 'does/not/exist.ckpt'"]),
        # --trainer values Lightning divides by after the first step, or rejects with its own exception
        (["--trainer.accumulate_grad_batches", "0"], ["--trainer.accumulate_grad_batches must be >= 1"]),
        (["--trainer.val_check_interval", "0"], ["--trainer.val_check_interval must be > 0"]),
        (["--trainer.precision", "bf16-true"], ["--trainer.precision bf16-true", "use bf16-mixed"]),
        pytest.param(["--trainer.accelerator", "gpu"], ["--trainer.accelerator gpu: this machine has no GPU"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
        (["--trainer.default_root_dir", str(REPO_ROOT / "README.md")], ["--trainer.default_root_dir: ",
                                                                      "README.md is a file, not a folder"]),
        (["--trainer.default_root_dir", "/proc/gsae-runs"], ["--trainer.default_root_dir: the run's checkpoints go to "
                                                             "/proc/gsae-runs/quickstart-topk/checkpoints, but cannot "
                                                             "write in /proc"]),
        (["--checkpoint.dirpath", "/proc/gsae-ckpts"], ["--checkpoint.dirpath: the run's checkpoints go to "
                                                        "/proc/gsae-ckpts, but cannot write in /proc"]),
        (["--model.init_args.optimizer.init_args.lr", "-0.001"], ["--model.optimizer: Invalid learning rate: -0.001"]),
        (["--model.init_args.optimizer.init_args.betas", "[1.5, 0.999]"],
         ["--model.optimizer: Invalid beta parameter at index 0: 1.5"]),
        (["--model.init_args.optimizer.init_args.eps", "-1"], ["--model.optimizer: Invalid epsilon value: -1.0"]),
        # several nodes and no launcher's variables: every node would be node 0, waiting 30 minutes for the others
        (["--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
         ["--trainer.num_nodes 2: no launcher told this process its node", "MASTER_ADDR, MASTER_PORT and NODE_RANK"]),
        # before DDP starts the ranks (each rank used to fail, and print it, on its own)
        (["--trainer.strategy", "ddp", "--trainer.devices", "3", "--trainer.accelerator", "cpu"],
         ["--data.n_streams (16) must be a multiple of the number of ranks (3"]),
        # spawned processes would need the LM and the parser's optimizer factory pickled
        (["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         ["--trainer.strategy ddp_spawn: train.py cannot start processes by spawn", "ddp_fork"]),
    ],
    ids=["hook", "hook_pattern", "k>d_sae", "no-sae", "d_sae=0", "k=0", "context_size>n_ctx", "batch_size=0", "val_batch_size<0", "aux_coef<0",
         "lr=0", "filename-path", "every_n<0", "save_top_k<-1", "max_steps=0", "limit_train_batches=0", "lm-preset", "ckpt-last",
         "ckpt-missing", "accumulate=0", "val_check_interval=0", "bf16-true", "gpu-on-cpu", "max_steps<0", "root-is-a-file", "root-unwritable", "dirpath-unwritable",
         "lr<0", "betas>1", "eps<0", "nodes-untold", "ddp-3-ranks", "ddp_spawn"],
)
def test_bad_option(run_cli, args: list[str], expected: list[str]) -> None:
    code, line = run_cli(*args)
    assert code == 1
    for text in expected:
        assert text in line, line


def test_a_run_that_fails_before_logging_leaves_no_empty_version_folder(run_cli, tmp_path) -> None:
    """A bad value found when the fit starts (after the logger made ``version_0``): the empty folder goes, so the
    next run is ``version_0``; a version folder with anything else in it, or a run that logged, stays."""
    code, line = run_cli("--data.context_size", "100000")
    assert code == 1 and "--data.context_size" in line
    assert not (tmp_path / "quickstart-topk").exists(), sorted(p.name for p in tmp_path.rglob("*"))
    kept = tmp_path / "quickstart-topk" / "version_0"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert run_cli("--data.context_size", "100000")[0] == 1
    assert sorted(p.name for p in (tmp_path / "quickstart-topk").iterdir()) == ["version_0"]
    assert (kept / "notes.txt").read_text() == "mine"
    from lightning.pytorch.loggers import TensorBoardLogger

    from gsae.cli import remove_empty_log_dirs

    class Trainer:  # a logger whose folder holds one logged value
        loggers = [TensorBoardLogger(str(tmp_path), name="logged")]

    Trainer.loggers[0].experiment.add_scalar("train/loss", 1.0, 0)
    assert remove_empty_log_dirs(Trainer) == [] and (tmp_path / "logged" / "version_0").is_dir()

    from gsae.loggers import TensorBoardLogger as GsaeLogger

    class Started:  # a fit that started (its HPARAMS session record) and failed at the first batch (a data error)
        loggers = [GsaeLogger(str(tmp_path), name="started")]

    Started.loggers[0].log_hyperparams({"lr": 0.1})
    assert (tmp_path / "started" / "version_0").is_dir()
    assert remove_empty_log_dirs(Started) == [tmp_path / "started" / "version_0"] and not (tmp_path / "started").exists()


def test_a_refused_resume_or_a_csv_logger_leaves_no_empty_version_folder(run_cli, tmp_path) -> None:
    """The config.yaml a failing run wrote goes with its empty folder (a refused resume); a CSVLogger's empty folder
    goes too; a config.yaml older than the run stays."""
    assert run_cli("--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2")[0] == 0
    run = tmp_path / "quickstart-topk"
    ckpt = run / "checkpoints" / "epoch=0-step=2.ckpt"

    def files() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}

    before = files()
    code, line = run_cli("--ckpt_path", str(ckpt), "--trainer.max_steps", "4", "--model.lm.name", "random-small")
    assert code == 1 and "another LM" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]
    # refused before the fit: no config.resume-step2.yaml, no empty event file in the run's version_0, nothing changed
    code, line = run_cli("--ckpt_path", "last", "--trainer.max_steps", "4", "--model.sae.k", "8")
    assert code == 1 and "'k': (16, 8)" in line, line
    code, line = run_cli("--ckpt_path", "last", "--trainer.max_steps", "4", "--data.batch_size", "3")
    assert code == 1 and "--data.batch_size" in line, line
    assert files() == before
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.logger.init_args.name", "csv"]
    assert run_cli(*csv, "--data.context_size", "100000")[0] == 1
    assert not (tmp_path / "csv").exists()
    old = tmp_path / "csv" / "version_0"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("from an earlier run")
    os.utime(old / "config.yaml", (0, 0))
    assert run_cli(*csv, "--trainer.logger.init_args.version", "0", "--data.context_size", "100000")[0] == 1
    assert (old / "config.yaml").exists()


def test_a_refused_resume_under_ddp_fork_is_one_line(run_cli, tmp_path) -> None:
    """Under ``ddp_fork`` the refusal is raised in a forked rank and reaches the parent as that rank's traceback in
    text (torch.multiprocessing's ``ProcessRaisedException``): still one line, exit code 1, no empty version folder."""
    assert run_cli("--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2")[0] == 0
    run = tmp_path / "quickstart-topk"
    ckpt = run / "checkpoints" / "epoch=0-step=2.ckpt"
    code, line = run_cli("--ckpt_path", str(ckpt), "--trainer.max_steps", "4", "--model.init_args.hook",
                         "blocks.1.hook_resid_post", "--trainer.strategy", "ddp_fork", "--trainer.devices", "2",
                         "--trainer.accelerator", "cpu")
    assert code == 1
    assert line == ("error: --ckpt_path: checkpoint hook 'blocks.2.hook_resid_post' differs from --model.hook "
                    "'blocks.1.hook_resid_post'"), line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]


def test_a_forked_rank_s_error_keeps_its_traceback_unless_the_user_caused_it() -> None:
    """What the parent reads from a forked rank's traceback: the innermost line naming an option, else the outermost
    error's; a bug (not one of the user errors) is not turned into one line."""
    from torch.multiprocessing import ProcessRaisedException

    from gsae.cli import child_user_message

    def raised(trace: str) -> ProcessRaisedException:
        return ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 123)

    chained = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
               "ValueError: --data.n_streams: 3 streams for 2 ranks\n\nThe above exception was the direct cause of "
               "the following exception:\n\nTraceback (most recent call last):\n  File \"y.py\", line 2\n"
               "jsonargparse.ArgumentError: Problem with given value\n")
    assert child_user_message(raised(chained.replace("jsonargparse.ArgumentError", "RuntimeError"))) == (
        "--data.n_streams: 3 streams for 2 ranks")
    assert child_user_message(raised("Traceback (most recent call last):\n  File \"z.py\", line 3\n"
                                     "FileNotFoundError: [Errno 2] No such file: 'a.ckpt'\n")) == (
        "[Errno 2] No such file: 'a.ckpt'")
    assert child_user_message(raised("Traceback (most recent call last):\n  File \"z.py\", line 3\n"
                                     "ZeroDivisionError: division by zero\n")) is None
    assert child_user_message(raised(chained)) is None  # the outermost error is not a user error
    unnamed = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\nValueError: bad shard 3\n\n"
               "The above exception was the direct cause of the following exception:\n\nTraceback (most recent call "
               "last):\n  File \"y.py\", line 2\nRuntimeError: could not read the data\n")
    assert child_user_message(raised(unnamed)) == "could not read the data"  # no line names an option: the outermost's
    assert child_user_message(ValueError("--x")) is None


def test_lightning_s_own_checks_name_the_trainer_option() -> None:
    """Lightning's messages quote the Trainer argument (under torchrun: ``--trainer.devices 3`` with 2 processes)."""
    from gsae.cli import user_message

    e = ValueError("You set `devices=3` and `num_nodes=1` in Lightning, but the product (3 * 1) does not match the "
                   "world size (2).")
    assert user_message(e).startswith("--trainer.devices: You set `devices=3`")
    assert user_message(ValueError("plain")) == "plain"
    e = ValueError("`Trainer(devices='0')` value is not a valid input using cpu accelerator.")
    assert user_message(e) == "--trainer.devices: `Trainer(devices='0')` value is not a valid input using cpu accelerator."
    e = ValueError("`Timer(duration='ten minutes')` is not a valid duration. Expected a string in the format DD:HH:MM:SS.")
    assert user_message(e).startswith("--trainer.max_time: `Timer(duration='ten minutes')` is not a valid duration")


def test_a_full_disk_says_that_the_checkpoints_written_are_kept() -> None:
    """A full disk while writing the run's files (TensorBoard's writer, a checkpoint being written) raises an error
    naming no file of the user's: the line says what was being written and that the checkpoints already written are
    kept. An error that names its file is said as it is."""
    import errno

    from gsae.cli import user_message

    assert user_message(OSError(errno.ENOSPC, "No space left on device")) == (
        "[Errno 28] No space left on device (writing the run's files; the checkpoints already written are kept)")
    named = OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.ckpt")
    assert user_message(named) == "[Errno 28] No space left on device: '/runs/x/last.ckpt'"


def test_lightning_s_info_lines_are_said_once_the_options_hold(run_cli, monkeypatch, request) -> None:
    """Lightning's INFO lines (``Seed set to 0``, ``GPU available: …``) are held while the trainer and the model are
    built: a bad option's error comes alone (and in a subprocess: tests/test_cli_errors.py), and a run whose options
    hold says them, in order, before training. Warnings are not held; what is held after an error is dropped."""
    import logging

    from gsae.cli import HeldInfo

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    for name in HeldInfo.LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [Keep()])
        request.addfinalizer(lambda logger=logger, level=logger.level: logger.setLevel(level))
        logger.setLevel(logging.INFO)  # an earlier test may have quieted Lightning (tests/science sets ERROR)
    code, _ = run_cli("--model.init_args.sae.init_args.k", "2000")
    assert code == 1 and not any("Seed set" in s for s in said), said
    assert run_cli("--evaluation.enabled", "false")[0] == 0
    assert any(s.startswith("Seed set to 0") for s in said), said

    log = logging.getLogger("lightning.pytorch")

    def say(level: int, text: str) -> None:
        log.handle(log.makeRecord(log.name, level, __file__, 0, text, None, None))

    said.clear()
    held = HeldInfo()
    say(logging.INFO, "GPU available: False")
    say(logging.WARNING, "a warning")
    say(logging.INFO, "Seed set to 0")
    assert said == ["a warning"]
    held.release()
    assert said == ["a warning", "GPU available: False", "Seed set to 0"]
    held = HeldInfo()
    say(logging.INFO, "held, then dropped")
    held.drop()
    say(logging.INFO, "after")
    assert said[-1] == "after" and "held, then dropped" not in said


def test_missing_local_dataset(run_cli, tmp_path) -> None:
    path = str(tmp_path / "no" / "corpus.txt")
    code, line = run_cli("--data.dataset", path)
    assert code == 1
    assert "--data.dataset" in line and path in line


def test_a_local_dataset_that_does_not_read_is_named(run_cli, tmp_path) -> None:
    """Binary data given as text, a JSON line that does not parse: one line naming --data.dataset and the file (the
    codec's words pointed at --config; pyarrow's named no file)."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "no comma" "x": 1}\n')
    for path, words in [(binary, "not UTF-8 text (invalid start byte at byte 0)"), (broken, "could not read it: JSON parse error")]:
        code, line = run_cli("--data.dataset", str(path))
        assert code == 1 and line.startswith(f"error: --data.dataset {str(path)!r}: {words}"), line


def test_dataset_without_text_column(run_cli, tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "hello world"}\n' * 5)
    code, line = run_cli("--data.dataset", str(path))
    assert code == 1
    assert "--data.text_column" in line and "body" in line


def test_corrupt_checkpoint(run_cli, tmp_path) -> None:
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    code, line = run_cli("--ckpt_path", str(bad))
    assert code == 1
    assert str(bad) in line and "corrupt or unreadable" in line


def test_foreign_checkpoint(run_cli, tmp_path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    code, line = run_cli("--ckpt_path", str(foreign))
    assert code == 1
    assert "not a gsae checkpoint" in line


def test_corrupt_checkpoint_names_the_option(run_cli, tmp_path) -> None:
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"\x00not a checkpoint")
    assert "--ckpt_path" in run_cli("--ckpt_path", str(bad))[1]


def test_shorthand_option_names_work(run_cli) -> None:
    """``--model.sae.k 64`` (no ``init_args``) reaches the SAE, as the README and the error messages say."""
    code, line = run_cli("--model.sae.k", "2000")
    assert code == 1 and "--model.sae.k" in line and "2000 > 1024" in line
    code, line = run_cli("--model.hook", "blocks.99.hook_resid_pre")
    assert code == 1 and "--model.hook" in line


def test_unknown_option_is_a_parse_error(run_cli) -> None:
    """Parse errors are one ``error:`` line too (no usage dump, no SystemExit from jsonargparse)."""
    code, line = run_cli("--model.init_args.sae.init_args.kk", "3")
    assert code == 2
    assert "--model.init_args.sae.init_args.kk" in line and "see python train.py --help" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(run_cli) -> None:
    code, line = run_cli("--trainer.accelerator", "gpu")
    assert code == 1 and "gpu" in line


def test_checkpoint_of_another_kind_of_run_is_one_line() -> None:
    """A sweep's checkpoint, or a g-SAE's, given to a TopK run: said in one line (a KeyError / an empty diff)."""
    from tests.systems.helpers import build_system

    system = build_system("topk")
    sweep = {"gsae": {"members": {"a": {}, "b": {}}, "hook": system.hook}}
    with pytest.raises(ValueError, match=r"^--ckpt_path: a sweep checkpoint \(members a, b\) does not resume"):
        system.on_load_checkpoint(sweep)
    gsae = {"gsae": {"sae_class": "gsae.sae.grad_topk.GradTopKSAE", "sae_config": {}, "hook": system.hook}}
    with pytest.raises(ValueError, match=r"checkpoint SAE is a gsae.sae.grad_topk.GradTopKSAE, the configured one a "
                                         r"gsae.sae.topk.TopKSAE"):
        system.on_load_checkpoint(gsae)
    e2e = {"gsae": {"objective": "E2ESAESystem", "sae_class": "gsae.sae.topk.TopKSAE", "sae_config": system.sae.config(),
                    "hook": system.hook}}  # the same SAE: its weights would load, and train on with another loss
    with pytest.raises(ValueError, match=r"^--ckpt_path: the checkpoint was trained by E2ESAESystem, this config's "
                                         r"--model is LocalSAESystem"):
        system.on_load_checkpoint(e2e)
    config = {**system.sae.config(), "k": 7, "beta": 1.0}  # keys on either side are compared
    with pytest.raises(ValueError, match=r"'k': \(7, 4\).*'beta': \(1.0, None\)|'beta': \(1.0, None\).*'k': \(7, 4\)"):
        system.on_load_checkpoint({"gsae": {"sae_config": config, "hook": system.hook}})
    # the same SAE read at another hook
    with pytest.raises(ValueError, match=r"^--ckpt_path: checkpoint hook 'blocks.0.hook_resid_post' differs from "
                                         r"--model.hook 'blocks.1.hook_resid_pre'$"):
        system.on_load_checkpoint({"gsae": {"sae_config": system.sae.config(), "hook": "blocks.0.hook_resid_post"}})


def test_checkpoint_of_another_lm_is_one_line() -> None:
    """Resuming on another model (name, a random preset's seed, centred writing weights) is refused in one line, where
    the SAE's shape may even match and the run would otherwise go on on other activations; the dtype, fold_ln and the
    forward path may change."""
    from tests.systems.helpers import build_system

    refused = {"random-tiny": {"name": "random-small", "seed": 3}, "gsae-tiny": {"center_writing_weights": False}}
    # a random preset is built in-process (weight processing has no effect on it); gsae-tiny's seed means nothing
    accepted = {"random-tiny": {"center_writing_weights": False}, "gsae-tiny": {"seed": 3}}
    for lm_name in refused:
        system = build_system("topk", lm_name=lm_name)
        meta = {"sae_config": system.sae.config(), "hook": system.hook, "lm": system.lm.describe()}
        for key, value in refused[lm_name].items():
            other = {**meta, "lm": {**meta["lm"], key: value}}
            with pytest.raises(ValueError, match=rf"^--ckpt_path: the checkpoint was trained on another LM .*'{key}'") as e:
                system.on_load_checkpoint({"gsae": other})
            assert "\n" not in str(e.value)
        for key, value in {"dtype": "bfloat16", "fold_ln": False, "center_unembed": False, **accepted[lm_name]}.items():
            system.on_load_checkpoint({"gsae": {**meta, "lm": {**meta["lm"], key: value}}})
        system.on_load_checkpoint({"gsae": {k: v for k, v in meta.items() if k != "lm"}})  # older checkpoints: no 'lm'
    # checkpoints from before fold_value_biases was recorded were TransformerLens' default, True
    system = build_system("topk", lm_name="gsae-tiny")
    assert system.lm.describe()["fold_value_biases"] is True
    older = {"sae_config": system.sae.config(), "hook": system.hook,
             "lm": {k: v for k, v in system.lm.describe().items() if k != "fold_value_biases"}}
    system.on_load_checkpoint({"gsae": older})
    with pytest.raises(ValueError, match=r"another LM .*'fold_value_biases': \(False, True\)"):
        system.on_load_checkpoint({"gsae": {**older, "lm": {**older["lm"], "fold_value_biases": False}}})
    # another LM of another width: said as such, not as an SAE whose d_in differs
    system = build_system("topk", lm_name="random-tiny")
    wider = {"sae_config": {**system.sae.config(), "d_in": 128}, "hook": system.hook,
             "lm": {**system.lm.describe(), "name": "gsae-tiny"}}
    with pytest.raises(ValueError, match=r"^--ckpt_path: the checkpoint was trained on another LM .*'name'"):
        system.on_load_checkpoint({"gsae": wider})


def test_e2e_downstream_hook_before_the_sae_hook_is_one_line() -> None:
    from gsae.lm import LanguageModel
    from gsae.sae import TopKSAE
    from gsae.systems import E2ESAESystem

    lm = LanguageModel("random-tiny", seed=0)
    with pytest.raises(ValueError, match=r"--model.downstream_hooks: 'blocks.0.hook_resid_post' is not after "
                                         r"--model.hook 'blocks.1.hook_resid_pre'"):
        E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook="blocks.1.hook_resid_pre",
                     downstream_hooks=["blocks.0.hook_resid_post"])
    E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook="blocks.1.hook_resid_pre",
                 downstream_hooks=["blocks.1.hook_resid_post"])  # later: fine
    # an SAE hook inside a block (mlp_out, resid_mid) skipped the check: an earlier hook, or the SAE's own, trained
    # with a downstream term that stayed 0; a hook outside the blocks (ln_final) raised a KeyError at the first step
    refused = {
        ("blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"): "is not after --model.hook 'blocks.1.hook_mlp_out' (the "
                                                              "SAE's output changes only later activations: a later "
                                                              "hook, e.g. blocks.1.hook_resid_post)",
        ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_pre"): "is not after",
        ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_mid"): "is not after",
        ("blocks.1.hook_resid_mid", "blocks.1.attn.hook_z"): "is not after",  # attention reads resid_pre
        ("blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"): "none is later in this model: leave it empty",
        ("blocks.0.hook_resid_post", "ln_final.hook_normalized"): "is not inside a block",
        ("blocks.0.hook_resid_post", "hook_embed"): "is not inside a block",
    }
    for (hook, ds), words in refused.items():
        with pytest.raises(ValueError, match="^--model.downstream_hooks: ") as e:
            E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook=hook, downstream_hooks=[ds])
        assert words in str(e.value), (hook, ds, str(e.value))
    with pytest.raises(ValueError, match="names a hook twice"):
        E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook="blocks.0.hook_resid_pre",
                     downstream_hooks=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre"])
    for hook, ds in [("blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"), ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"),
                     ("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"), ("hook_embed", "blocks.0.hook_resid_pre"),
                     ("blocks.0.attn.hook_z", "blocks.1.hook_resid_pre")]:
        E2ESAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook=hook, downstream_hooks=[ds])  # each reads the SAE's output


def test_e2e_objectives_that_train_nothing_or_the_wrong_thing_are_one_line() -> None:
    """From an audit: a g-SAE in an e2e run trained as plain TopK (no ∇ₓL is harvested) and was then evaluated with
    gradient selection; all coefficients 0 trained nothing (loss 0, rc 0); a negative per-hook coefficient maximised
    the downstream MSE; a downstream_coef without hooks, or beside downstream_coefs, was silently dropped."""
    from gsae.lm import LanguageModel
    from gsae.sae import GradTopKSAE, TopKSAE
    from gsae.systems import E2ESAESystem

    lm = LanguageModel("random-tiny", seed=0)
    hook, later = "blocks.0.hook_resid_post", ["blocks.1.hook_resid_post"]

    def build(sae=lambda d: TopKSAE(d, 64, 4), **kw):
        return E2ESAESystem(lm, sae, hook=hook, **kw)

    with pytest.raises(ValueError, match="--model.sae: E2ESAESystem trains TopK or ReLU SAEs; a GradTopKSAE"):
        build(lambda d: GradTopKSAE(d, 64, 4, beta=1e4))
    build(lambda d: GradTopKSAE(d, 64, 4, beta=0.0))  # β = 0: it is a TopK SAE
    with pytest.raises(ValueError, match="are all 0: nothing to train on"):
        build(kl_coef=0.0)
    for negative in (dict(downstream_hooks=later, downstream_coefs=[-1.0]), dict(kl_coef=-1.0, local_mse_coef=1.0),
                     dict(local_mse_coef=-0.5), dict(downstream_hooks=later, downstream_coef=-2.5)):
        with pytest.raises(ValueError, match=r"must be >= 0 \(a negative term is maximised\)"):
            build(**negative)
    with pytest.raises(ValueError, match="--model.downstream_coef is set but --model.downstream_hooks is empty"):
        build(downstream_coef=2.5)
    with pytest.raises(ValueError, match="both set: give one of them"):
        build(downstream_hooks=later, downstream_coef=2.5, downstream_coefs=[1.0])
    build(kl_coef=0.0, local_mse_coef=1.0)  # a local objective alone trains
    build(kl_coef=0.5, downstream_hooks=later, downstream_coef=2.5)  # e2e+ds


def test_an_empty_held_out_set_is_refused_before_training(run_cli, tmp_path):
    """Evaluation (on by default) needs held-out contexts: with none, the run used to train to its first checkpoint
    (step 1000 in the GPT-2 configs) and end there with an error naming no option, and every resume again."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": "a b c d e f g h " * 20 + str(i)}) + "\n" for i in range(40)))
    code, line = run_cli("--data.dataset", str(data), "--data.val_documents", "0")
    assert code == 1 and line.startswith("error: --data.val_documents 0: the held-out set gives no context")
    assert "--evaluation.enabled false" in line
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any step
    code, line = run_cli("--data.dataset", str(data), "--data.val_documents", "0", "--evaluation.enabled", "false")
    assert code == 0, line


def test_training_saves_checkpoints_without_tmpdir(tmp_path, monkeypatch):
    """The Trainer's checkpoint IO is gsae's same-folder one (gsae.files): no $TMPDIR detour."""
    from gsae.cli import build_cli
    from gsae.files import SameFolderCheckpointIO

    monkeypatch.chdir(REPO_ROOT)
    cli = build_cli(quickstart_args(tmp_path, "--evaluation.enabled", "false", steps=2))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert isinstance(cli.trainer.strategy.checkpoint_io, SameFolderCheckpointIO)
    assert (tmp_path / "quickstart-topk" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("args", [["--conf", "configs/quickstart/topk.yaml"], ["--trainer.max_step", "5"],
                                  ["--model.sae.k_au", "4"]])
def test_abbreviated_options_are_refused(run_cli, args) -> None:
    """No prefix of an option stands for it (argparse's default): ``--trainer.max_step 5`` silently set ``max_steps``,
    and a prefix would change meaning once another option shares it."""
    code, err = run_cli(*args)
    assert code == 2 and err.startswith(f"error: {args[0]}: ") and "option" in err, err


def test_a_warm_up_as_long_as_the_run_is_said(run_cli, caplog, tmp_path) -> None:
    """``--model.lr_warmup_steps`` > the run's steps: the learning rate never reaches its peak (said once, run goes on)."""
    with caplog.at_level("WARNING"):
        code, _ = run_cli("--model.init_args.lr_warmup_steps", "8", "--evaluation.enabled", "false")
    assert code == 0
    said = [r.getMessage() for r in caplog.records if "lr_warmup_steps" in r.getMessage()]
    assert said == ["--model.lr_warmup_steps 8 > the run's 2 steps: the learning rate never reaches its peak "
                    "(at most 0.25 of it)"], said
    caplog.clear()  # a warm-up exactly as long as the run reaches the peak at its last step: nothing to say
    with caplog.at_level("WARNING"):
        code, _ = run_cli("--model.init_args.lr_warmup_steps", "2", "--evaluation.enabled", "false",
                          "--trainer.default_root_dir", str(tmp_path / "equal"))
    assert code == 0 and not [r for r in caplog.records if "lr_warmup_steps" in r.getMessage()]


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_ctrl_c_while_starting_is_one_line(script) -> None:
    """Ctrl+C in a command's first seconds (torch and lightning importing) printed a KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, script, "--config" if script == "train.py" else "--help", QUICK],
                         cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "stopped (Ctrl+C)", (p.returncode, err[-2000:])


def test_ctrl_c_before_training_is_one_line(run_cli, monkeypatch, capsys, tmp_path) -> None:
    """Ctrl+C while the LM loads or the data is checked (before the fit, where Lightning stops cleanly)."""
    import gsae.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gsae.cli, "checks_before_training", interrupted)
    assert gsae.cli.main(["--config", QUICK, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped (Ctrl+C) before training"


@pytest.mark.parametrize("config", ["configs/quickstart/gsae.yaml", "configs/quickstart/sweep.yaml"])
def test_a_g_sae_whose_training_positions_have_no_gradient_is_refused(config, tmp_path, monkeypatch, capsys) -> None:
    """``--data.context_size 2`` with a BOS first trains on each context's last position only, where ∇ₓL is exactly 0
    (it predicts nothing): the g-SAE trained as a plain TopK SAE with no word. Refused before any step; at 3 it trains
    (position 1 predicts position 2, so the gradient reaches the training rows)."""
    monkeypatch.chdir(REPO_ROOT)

    def run(size: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["--config", config, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / size),
                     "--trainer.enable_progress_bar", "false", "--evaluation.enabled", "false",
                     "--data.context_size", size])
        return code, capsys.readouterr().err

    code, err = run("2")
    assert code == 1 and "Traceback" not in err, err
    assert ("error: --data.context_size 2: a g-SAE trains on the positions after the BOS, here only each context's "
            "last, whose loss gradient is 0") in err, err
    assert not list((tmp_path / "2").rglob("*.ckpt"))
    code, err = run("3")
    assert code == 0, err


def test_a_replaced_class_says_which_options_it_drops(tmp_path, monkeypatch) -> None:
    """``--model.class_path`` / ``--model.sae.class_path`` over a config whose class took other options: jsonargparse
    drops those options and said so only at debug level (the TopK quickstart switched to e2e lost ``buffer_size``
    without a word). Said once each, as one warning line; a config that replaces nothing says nothing."""
    import warnings

    from gsae.cli import build_cli

    monkeypatch.chdir(REPO_ROOT)

    def said(*extra: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_cli(quickstart_args(tmp_path, *extra, steps=2))
        return [str(w.message) for w in caught if "replaces" in str(w.message)]

    assert said("--model.class_path", "gsae.systems.E2ESAESystem") == [
        "gsae.systems.E2ESAESystem replaces gsae.systems.LocalSAESystem: its options that E2ESAESystem does not take "
        "are dropped (buffer_size=4096)"]
    assert said("--model.sae.class_path", "gsae.sae.ReLUSAE") == [
        "gsae.sae.ReLUSAE replaces gsae.sae.TopKSAE: its options that ReLUSAE does not take are dropped (k=16)"]
    assert said("--model.sae.class_path", "gsae.sae.GradTopKSAE") == []  # takes all of TopK's options
    assert said() == []
    # a sweep config replaces the parser's own SAESystem, whose sae=None nobody set: nothing to say (it said
    # "... are dropped (sae=None)" on every sweep run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["--config", "configs/quickstart/sweep.yaml", "--trainer.default_root_dir", str(tmp_path / "s")])
    assert not [str(w.message) for w in caught if "replaces" in str(w.message)]


def test_logged_warnings_are_marked_as_python_warnings_are(monkeypatch, capsys) -> None:
    """A notice logged as a warning (the warm-up outlasting the run, a resume's changed lr) prints as ``warning: …``,
    as a Python warning does; informational lines stay as they are."""
    import logging

    from gsae.startup import log_to_terminal

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as train.py starts: no handler yet (pytest's own are put back)
    monkeypatch.setattr(root, "level", logging.WARNING)
    log_to_terminal()
    log = logging.getLogger("gsae.systems.base")
    log.warning("--model.lr_warmup_steps 20 > the run's 2 steps")
    log.info("Seed set to 0")
    log.warning("warning: said once")
    assert capsys.readouterr().err.splitlines() == [
        "warning: --model.lr_warmup_steps 20 > the run's 2 steps", "Seed set to 0", "warning: said once"]


def test_nothing_to_train_names_one_cut_short_thing_in_the_singular():
    from gsae.cli import trained_to_the_end

    assert trained_to_the_end("x.ckpt", 6, 6, ["evaluation"]) == (
        "nothing to train: x.ckpt is at step 6 and --trainer.max_steps is 6; its evaluation was cut short: finishing it")
    assert trained_to_the_end("x.ckpt", 5, 6, ["evaluation"]) is None
    # no step limit (-1, Lightning's default; None): a resume always has steps to train
    assert trained_to_the_end("x.ckpt", 6, -1, ["evaluation"]) is None
    assert trained_to_the_end("x.ckpt", 6, None) is None


def test_float16_true_precision_is_refused_like_bf16_true(tmp_path, monkeypatch, capsys):
    from gsae.cli import main
    from tests.conftest import quickstart_args

    monkeypatch.chdir(REPO_ROOT)
    assert main(quickstart_args(tmp_path, "--trainer.precision", "16-true", steps=2)) == 1
    err = capsys.readouterr().err
    assert "--trainer.precision 16-true" in err and "use bf16-mixed" in err


def test_only_warnings_are_marked_and_a_formatter_set_before_is_kept(monkeypatch, capsys) -> None:
    """``log_to_terminal`` marks warnings alone (an error or a critical line is not called a warning), and only
    through plain formatters: a handler with a formatter class of its own keeps it."""
    import io
    import logging

    from gsae.startup import log_to_terminal

    class Bracketed(logging.Formatter):  # a formatter of its own (pytest's, a user's)
        pass

    root = logging.getLogger()
    own = logging.StreamHandler(io.StringIO())
    own.setFormatter(Bracketed("[%(levelname)s] %(message)s"))
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    log_to_terminal()
    root.addHandler(own)
    log_to_terminal()  # a second call (evaluate.py after train.py in one process) leaves the chosen formatter alone
    log = logging.getLogger("gsae.systems.base")
    log.error("the disk is full")
    log.critical("stopped")
    log.warning("slow")
    assert capsys.readouterr().err.splitlines() == ["the disk is full", "stopped", "warning: slow"]
    assert own.stream.getvalue().splitlines() == ["[ERROR] the disk is full", "[CRITICAL] stopped", "[WARNING] slow"]


def test_python_warnings_are_one_line_where_they_are_sent_and_ctrl_c_raises_again(monkeypatch) -> None:
    """``one_line_warnings`` prints ``warning: <message>`` to the file a warning is sent to (stderr if none);
    ``ctrl_c_raises`` after ``stop_on_ctrl_c``: Ctrl+C raises ``KeyboardInterrupt`` again (the fit stops cleanly)."""
    import io
    import signal
    import warnings

    from gsae.startup import ctrl_c_raises, one_line_warnings, stop_on_ctrl_c

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    one_line_warnings()
    sent = io.StringIO()
    warnings.showwarning(UserWarning("half the tokens are padding"), UserWarning, "x.py", 3, file=sent)
    assert sent.getvalue() == "warning: half the tokens are padding\n"
    before = signal.getsignal(signal.SIGINT)
    try:
        stop_on_ctrl_c()
        ctrl_c_raises()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not SIG_DFL, which would end the process
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode
                pass
    finally:
        signal.signal(signal.SIGINT, before)


def test_checkpoint_options_out_of_range_are_refused_in_one_line() -> None:
    """``--checkpoint.every_n_train_steps`` 0 or null (only at the end of training) and ``save_top_k`` -1 (all) or
    ``>= 0`` are taken; below those, and a filename that is a path, are refused with the option's name."""
    from gsae.callbacks.checkpoint import SAECheckpoint

    for ok in ({"every_n_train_steps": 0}, {"every_n_train_steps": None}, {"save_top_k": -1}, {"save_top_k": 0},
               {"filename": "step{step}"}):
        SAECheckpoint(**ok)
    with pytest.raises(ValueError, match=r"--checkpoint.every_n_train_steps must be >= 0 \(got -1;"):
        SAECheckpoint(every_n_train_steps=-1)
    with pytest.raises(ValueError, match=r"--checkpoint.save_top_k must be -1 \(keep all\) or >= 0 \(got -2\)"):
        SAECheckpoint(save_top_k=-2)
    for path in ("a/b", "", ".", ".."):
        with pytest.raises(ValueError, match="a file name, not a path"):
            SAECheckpoint(filename=path)


def test_optimizer_group_options_and_schedule_options_torch_takes_unchecked_are_one_line() -> None:
    """``check_optimizer_groups`` refuses what torch's optimizers take unchecked in a param group (a sweep member's
    options are groups), at the bounds' edges: lr 0, a beta of exactly 1, negative eps or weight_decay; a one-SAE
    system refuses a negative warm-up and a floor outside [0, 1], and takes their edges."""
    from gsae.lm import LanguageModel
    from gsae.optim import Adam
    from gsae.sae import TopKSAE
    from gsae.systems import LocalSAESystem
    from gsae.systems.base import check_optimizer_groups

    p = torch.nn.Parameter(torch.zeros(2))
    bad = {"lr": (0.0, r"\[1\].lr must be > 0 \(got 0.0\)"),
           "betas": ((0.9, 1.0), r"\[1\].betas must be two numbers in \[0, 1\) \(got \[0.9, 1.0\]\)"),
           "eps": (-1e-8, r"\[1\].eps must be >= 0"), "weight_decay": (-0.1, r"\[1\].weight_decay must be >= 0")}
    for key, (value, message) in bad.items():
        opt = Adam([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))], key: value}], lr=1e-3)
        with pytest.raises(ValueError, match=message):
            check_optimizer_groups(opt, ["--model.members[0]", "--model.members[1]"])
    edges = Adam([{"params": [p], "betas": (0.0, 0.0), "eps": 0.0, "weight_decay": 0.0, "lr": 1e-9}], lr=1e-3)
    check_optimizer_groups(edges, ["--model.optimizer"])

    lm = LanguageModel("random-tiny", seed=0)

    def build(**kw):
        return LocalSAESystem(lm, lambda d: TopKSAE(d, 64, 4), hook="blocks.0.hook_resid_post", **kw)

    with pytest.raises(ValueError, match=r"--model.lr_warmup_steps must be >= 0 \(got -1\)"):
        build(lr_warmup_steps=-1)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"--model.lr_min_ratio must be in \[0, 1\] \(got {ratio}\)"):
            build(lr_min_ratio=ratio)
    build(lr_warmup_steps=0, lr_min_ratio=0.0)
    build(lr_min_ratio=1.0)
