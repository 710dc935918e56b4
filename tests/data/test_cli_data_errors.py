"""Bad data sources and data options through the real CLI: exit code 1 and one ``error:`` line, never a hang."""

from __future__ import annotations

import pytest

from tests.test_errors import run_cli  # noqa: F401  (the fixture)


def test_empty_file_is_one_error_line(run_cli, tmp_path) -> None:  # noqa: F811
    """An empty or blank file is named as such, with the default options too (it was told as a held-out set without
    contexts, then, with the evaluation off, as a stream without training documents)."""
    for name, content in [("empty.jsonl", ""), ("blank.txt", "\n\n\n"), ("spaces.txt", "  \n\n   \n"),
                          ("empty-texts.jsonl", '{"text": ""}\n{"text": "  "}\n{"text": null}\n'), ("zero.txt", "")]:
        path = tmp_path / name
        path.write_text(content)
        for options in (("--data.val_documents", "0", "--evaluation.enabled", "false"), ()):
            code, line = run_cli("--data.dataset", str(path), *options)
            assert code == 1
            assert line == f"error: --data.dataset: {str(path)!r} holds no text (every document in it is empty or blank)" or (
                name == "empty.jsonl" and line == f"error: --data.dataset: {str(path)!r} has no documents (empty file)"), line


def test_source_without_a_training_context_is_one_error_line(run_cli, tmp_path) -> None:  # noqa: F811
    path = tmp_path / "short.txt"
    path.write_text("hi\n" * 40)
    line_docs = ("--data.text_unit", "line")  # one document per line
    code, line = run_cli("--data.dataset", str(path), *line_docs, "--data.val_documents", "0", "--evaluation.enabled", "false")  # 2-token lines, 64-token contexts
    assert code == 1
    assert "--data.dataset" in line and "no complete 64-token context" in line
    code, line = run_cli("--data.dataset", str(path), *line_docs)  # every document held out for validation
    assert code == 1
    assert "--data.dataset" in line and "no training document" in line


def test_workers_that_do_not_divide_the_streams(run_cli, tmp_path) -> None:  # noqa: F811
    path = tmp_path / "docs.txt"
    path.write_text("some words of text here\n" * 50)
    code, line = run_cli("--data.dataset", str(path), "--data.text_unit", "line", "--data.num_workers", "3",
                         "--data.val_documents", "2")
    assert code == 1
    assert "--data.num_workers (3)" in line and "--data.n_streams" in line


@pytest.mark.parametrize("workers", ["0", "2"])
def test_pretokenized_ids_of_another_vocabulary_are_one_error_line(run_cli, tmp_path, workers) -> None:  # noqa: F811
    """``input_ids`` of GPT-2's tokenizer fed to gsae-tiny (vocabulary 1391): found while tokenizing, in the main
    process or in a DataLoader worker (whose error the DataLoader re-raises as "Caught ... in DataLoader worker"),
    not an IndexError in the embedding at the first step."""
    import json

    path = tmp_path / "gpt2_ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [5, 48971 if i % 50 == 49 else 7] * 40}) + "\n" for i in range(400)))
    code, line = run_cli("--data.dataset", str(path), "--data.val_documents", "10", "--data.num_workers", workers,
                         "--evaluation.enabled", "false")
    assert code == 1
    assert line == ("error: --data.dataset: its input_ids hold token 48971, outside the model's vocabulary of 1391 "
                    "(pretokenized for another tokenizer? see --model.lm.name)"), line
    # found at the first batch, after the logger made version_0: the empty run folder goes with it
    assert not (tmp_path / "quickstart-topk").exists(), sorted(p.name for p in tmp_path.rglob("*"))
