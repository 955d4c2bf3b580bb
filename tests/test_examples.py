"""The example apps run as a user would run them: a subprocess, lines on stdin."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_autocomplete_suggests_completions_for_each_line(tiny_bundle):
    result = run_example("autocomplete.py", str(tiny_bundle), "-n", "3", "--seed", "1", stdin="hello\nthe qu\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("  ") for line in lines)
    hello = [line for line in lines if line.strip()[3:].startswith("hello")]
    the_qu = [line for line in lines if line.strip()[3:].startswith("the qu")]
    assert 1 <= len(hello) <= 3 and 1 <= len(the_qu) <= 3 and len(hello) + len(the_qu) == len(lines)
    assert hello[0].startswith("  1. hello")
    again = run_example("autocomplete.py", str(tiny_bundle), "-n", "3", "--seed", "1", stdin="hello\nthe qu\n")
    assert again.stdout == result.stdout  # same seed, same suggestions


def test_autocomplete_reports_a_bad_bundle_in_one_line(tmp_path):
    result = run_example("autocomplete.py", str(tmp_path / "nope"), stdin="hello\n")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
