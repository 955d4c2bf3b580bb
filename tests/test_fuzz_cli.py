"""Every command with a table of bad values (issue 11): paths that do not exist, are files where
folders belong (and the reverse), are read-only; numbers negative, zero, NaN, inf, huge, not
numbers; text with bytes that are not UTF-8 (argv carries them as surrogate escapes). Each must
exit with 2 (3 is the int8 gate's documented code), print no traceback, and leave nothing behind
in the working folder.

Values a command accepts (a seed of -1, say) are not listed: they are not bad input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgecraft.cli import app
from edgecraft.export import ExportOptions, export_run
from test_export import make_run

NOT_UTF8 = "\udcff\udcfe"  # the bytes ff fe in argv, as Python hands them over
NUMBERS = ["-1", "nan", "inf", "-inf", "1e400", "abc", ""]
RUN, BUNDLE = "runs/tiny", "export/tiny"
MISSING, A_FILE, A_FOLDER = "nope", "file.txt", "folder"
READ_ONLY = "readonly/out"


def _cases() -> list[list[str]]:
    cases: list[list[str]] = []
    # generate: every numeric option, paths, devices, text
    for opt in ("--temperature", "--top-p", "--repetition-penalty"):
        cases += [["generate", BUNDLE, "hi", opt, v] for v in NUMBERS]
    for opt in ("-n", "--top-k", "--threads", "--seed"):
        cases += [["generate", BUNDLE, "hi", opt, v] for v in ("nan", "1.5", "abc", "")]
    cases += [["generate", BUNDLE, "hi", opt, v] for opt in ("-n", "--top-k") for v in ("0", "-1")]
    cases += [["generate", BUNDLE, "hi", "--threads", "-1"]]
    cases += [["generate", p, "hi"] for p in (MISSING, A_FILE, A_FOLDER, NOT_UTF8)]
    cases += [["generate", BUNDLE, "--prompt-file", p] for p in (MISSING, A_FOLDER, NOT_UTF8)]
    cases += [["generate", BUNDLE, "hi", "--device", v] for v in ("gpu", NOT_UTF8, "")]
    cases += [["generate", BUNDLE, "hi", "--backend", v] for v in ("torch", NOT_UTF8)]
    cases += [["generate", BUNDLE, NOT_UTF8], ["generate", RUN, NOT_UTF8], ["generate", BUNDLE, "hi", "--stop", NOT_UTF8]]
    cases += [["generate", RUN, "hi", "--int8"], ["generate", BUNDLE, "hi", "--prompt-file", A_FILE]]
    # export
    for opt in ("--opset", "--calibrate", "--max-loss-increase"):
        cases += [["export", RUN, "--out", "o", "--int8", opt, v] for v in NUMBERS]
    cases += [["export", RUN, "--out", "o", "--int8", opt, "99999999999999999999999"] for opt in ("--opset", "--calibrate")]
    cases += [["export", p] for p in (MISSING, A_FILE, A_FOLDER, BUNDLE, NOT_UTF8)]
    cases += [["export", RUN, "--out", p] for p in (f"{A_FILE}/b", READ_ONLY, RUN)]
    cases += [["export", RUN, "--out", "o", "--text", p] for p in (MISSING, A_FOLDER, NOT_UTF8, "binary.bin")]
    cases += [["export", RUN, "--out", "o", "--int8", "--keep-float", v] for v in ("tail", NOT_UTF8)]
    cases += [["export", RUN, "--out", "o", "--calibrate", "2"]]  # an int8 flag without --int8
    cases += [["export", RUN, "--out", "o", "--int4", "--block-size", v] for v in ("-1", "0", "7", "nan", "abc")]
    cases += [["export", RUN, "--out", "o", "--block-size", "32"], ["export", RUN, "--web", "--out", READ_ONLY]]
    cases += [["generate", RUN, "hi", "--int4"], ["generate", BUNDLE, "hi", "--int4"], ["generate", BUNDLE, "hi", "--int8", "--int4"]]
    cases += [["generate", BUNDLE, "hi", "--backend", "tinygrad", "--device", v] for v in ("nope", NOT_UTF8)]
    # info
    cases += [["info", p, *j] for p in (MISSING, A_FILE, A_FOLDER, NOT_UTF8) for j in ([], ["--json"])]
    # bench
    for opt in ("--batch", "--prompt-len", "--new-tokens", "--runs", "--warmup", "--ppl-tokens"):
        cases += [["bench", BUNDLE, opt, v] for v in ("-1", "nan", "abc", "")]
    cases += [["bench", BUNDLE, opt, "0"] for opt in ("--batch", "--prompt-len", "--new-tokens", "--runs")]
    cases += [["bench", BUNDLE, "--threads", v] for v in ("-1", "nan", "one", "1,,2", "")]
    cases += [["bench", BUNDLE, "--new-tokens", "99999999999999999999999"], ["bench", BUNDLE, "--device", "gpu"]]
    cases += [["bench", p] for p in (MISSING, A_FILE, A_FOLDER, NOT_UTF8)]
    cases += [["bench", BUNDLE, "--text", p] for p in (MISSING, A_FOLDER, NOT_UTF8, "binary.bin")]
    cases += [["bench", BUNDLE, out, p] for out in ("--json", "--csv", "--markdown", "--plot")
              for p in (f"{A_FILE}/x", A_FOLDER, READ_ONLY)]
    # train
    cases += [["train", p] for p in (MISSING, A_FOLDER, "binary.bin", NOT_UTF8)]
    cases += [["train", "--resume", p] for p in (MISSING, A_FILE, A_FOLDER, NOT_UTF8)]
    cases += [["train", "recipe.toml", "--runs-dir", p] for p in (A_FILE, READ_ONLY)]
    for key in ("train.lr", "train.min_lr", "train.batch_size", "train.max_steps", "model.d_model",
                "model.n_heads", "model.block_size", "model.dropout", "data.val_fraction", "train.eval_every"):
        cases += [["train", "recipe.toml", "--set", f"{key}={v}"] for v in ("-1", "nan", "inf", "abc", "")]
    cases += [["train", "recipe.toml", "--set", f"{key}=0"] for key in ("train.lr", "train.batch_size", "model.d_model")]
    cases += [["train", "recipe.toml", "--set", "train.lr=1e4"], ["train", "recipe.toml", "--set", NOT_UTF8],
              ["train", "recipe.toml", "--set", f"data.source={NOT_UTF8}"], ["train", "recipe.toml", "--set", "seed=1e400"],
              ["train", "recipe.toml", "--set", f"data.source={A_FOLDER}"], ["train", RUN + "/recipe.toml", "--resume", RUN],
              ["train", "--resume", RUN, "--set", "train.lr=0.1"], ["train", "--resume", RUN, "--set", "train.max_steps=-1"]]
    # serve (every case fails before a server would start)
    for opt in ("--port", "--slots", "--max-tokens-limit", "--threads", "--max-queue"):
        cases += [["serve", BUNDLE, opt, v] for v in ("-1", "nan", "abc", "")]
    cases += [["serve", BUNDLE, "--port", "70000"], ["serve", BUNDLE, "--slots", "0"]]
    cases += [["serve", p] for p in (MISSING, A_FILE, A_FOLDER, RUN, NOT_UTF8)]
    cases += [["serve", BUNDLE, "--api-key-file", p] for p in (MISSING, A_FOLDER, "binary.bin")]
    cases += [["serve", BUNDLE, "--api-key", " "], ["serve", BUNDLE, "--api-key", "k", "--api-key-file", A_FILE]]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder with a run, its bundle (fp32 + int8), a recipe, a file, a folder, a
    binary file and a read-only folder."""
    root = tmp_path_factory.mktemp("fuzz")
    run = make_run(root)
    export_run(run, root / "export" / "tiny", ExportOptions(int8=True))
    (root / A_FILE).write_text("hello")
    (root / A_FOLDER).mkdir()
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x01" * 8)
    (root / "recipe.toml").write_text((run / "recipe.toml").read_text())
    return root


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


def test_every_command_answers_bad_values_with_one_line_and_exit_2(workdir: Path, readonly_dir: Path, monkeypatch) -> None:
    (workdir / "readonly").unlink(missing_ok=True)
    (workdir / "readonly").symlink_to(readonly_dir)
    monkeypatch.chdir(workdir)
    runner = CliRunner()
    before = _listing(workdir)
    failures = []
    for args in CASES:
        result = runner.invoke(app, args)
        unexpected = result.exception if not isinstance(result.exception, (SystemExit, type(None))) else None
        left = _listing(workdir) - before
        if result.exit_code not in (2, 3) or unexpected or "Traceback" in result.output or left:
            failures.append(f"{ascii(args)}: exit {result.exit_code}, {unexpected!r}, left {sorted(left)}, "
                            f"output {ascii(result.output.strip()[-300:])}")
        for name in sorted(left, reverse=True):  # clean up so one failure does not hide the next
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    assert not failures, f"{len(failures)} of {len(CASES)} cases:\n" + "\n".join(failures)
