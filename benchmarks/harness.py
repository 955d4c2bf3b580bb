"""What every script in benchmarks/ shares: child processes, interleaved rounds, the greedy engine
loop, the machine description and the results files.

Scripts run as `python benchmarks/NAME.py`, which puts this folder on sys.path: `import harness`.

- `child(script, role, payload)` runs `script --child ROLE` in a fresh Python (another interpreter
  for a peer library, another checkout of edgecraft for a before/after row), the payload as JSON
  on stdin, and returns the JSON on its last stdout line; the script's `__main__` answers it with
  `serve_child(roles)`.
- `interleave(rows, rounds)` calls every row once per round, so a machine that gets busier or
  quieter during a run shifts every row alike.
- `RunInfo` is the header of every results file: machine, library versions, load average at the
  start and the end, and the command that reproduces the figures.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # the team's data folder, beside the checkout
CHILD = "--child"


def default_corpus() -> Path | None:
    """The --corpus default: tiny-shakespeare where the shared data folder holds it, else None
    (the recipe's built-in corpus)."""
    return SHARED_CORPUS if SHARED_CORPUS.is_file() else None


def int_list(text: str) -> list[int]:
    """A comma-separated flag such as --threads 1,2."""
    return [int(x) for x in text.split(",") if x]


# ---------------------------------------------------------------- child processes


def child(script: str | Path, role: str, payload: dict | None = None, python: str = sys.executable,
          tree: Path | None = None) -> Any:
    """`python script --child ROLE` with `payload` on stdin -> the JSON of its last stdout line.
    `tree`: a checkout whose edgecraft package the child imports instead of this one's."""
    proc = subprocess.run([python, str(script), CHILD, role], input=json.dumps(payload or {}),
                          capture_output=True, text=True, env=_environment(tree))
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{Path(script).name} {CHILD} {role} failed in {python} (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_child(roles: dict[str, Callable[[dict], Any]]) -> bool:
    """Answer a `child()` call (True), or return False in the main process."""
    if len(sys.argv) < 3 or sys.argv[1] != CHILD:
        return False
    payload = json.loads(sys.stdin.read() or "{}")
    out, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not corrupt the JSON line
    out.write(json.dumps(roles[sys.argv[2]](payload)) + "\n")
    return True


def edgecraft_cli(*args: str, tree: Path | None = None) -> None:
    """`python -m edgecraft.cli ARGS` (of `tree` when given), failing loudly."""
    subprocess.run([sys.executable, "-m", "edgecraft.cli", *args], check=True, env=_environment(tree))


def _environment(tree: Path | None) -> dict[str, str]:
    """A child's environment: `tree`'s edgecraft package first when given, then this checkout's."""
    paths = [str(tree)] if tree else []
    paths += [str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# ---------------------------------------------------------------- measuring


def interleave(rows: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               after_round: Callable[[dict[str, list]], None] | None = None) -> dict[str, list]:
    """Each row's results over `rounds` rounds after `warmup` dropped ones; every other round runs
    the rows in reverse so none always follows the same one. `after_round` sees the results so
    far (a report rewritten each round leaves numbers if a run is cut short)."""
    out: dict[str, list] = {name: [] for name in rows}
    for r in range(warmup + rounds):
        for name in list(rows)[:: 1 if r % 2 == 0 else -1]:
            value = rows[name]()
            if r >= warmup:
                out[name].append(value)
        print(f"round {r + 1}/{warmup + rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        if r >= warmup and after_round:
            after_round(out)
    return out


def greedy(engine, prompt: np.ndarray, n: int) -> tuple[np.ndarray, float, float, float]:
    """Greedy decoding on an engine (edgecraft/runtime/engine.py): tokens (B, n), seconds for
    reset + prefill + the first token, then wall and CPU seconds of the n - 1 one-token steps."""
    B = prompt.shape[0]
    out = np.empty((B, n), dtype=np.int64)  # (B, n)
    t0 = time.perf_counter()
    engine.reset(B)
    tok = engine.prefill(prompt)[:, -1].argmax(-1)  # (B,)
    out[:, 0] = tok
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(1, n):
        tok = engine.decode(tok).argmax(-1)
        out[:, i] = tok
    return out, t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def best_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of `repeats` calls, in seconds: short calls' noise only ever adds time."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two rows' greedy tokens agree: identical sequences, and the shortest common prefix."""
    prefixes = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b)]
    return {"identical": sum(p == len(x) for p, x in zip(prefixes, a)), "of": len(a), "min_prefix": min(prefixes)}


def random_run(root: Path, recipe: str = "char-1m", seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """A run directory of recipes/RECIPE.toml's model with random weights (torch.manual_seed(seed))
    and tiny-shakespeare's 65 characters: what a benchmark measures when given no --run.
    `overrides`: recipe keys (`model.d_model=256`) for another shape."""
    import string

    import torch

    from edgecraft.checkpoint import save_model
    from edgecraft.data import make_char_tokenizer
    from edgecraft.model import GPT, GPTConfig
    from edgecraft.recipe import load_recipe, to_toml

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    nowhere = f"data.source={json.dumps(str(root / 'absent.txt'))}"  # no data is read: weights are random
    resolved = load_recipe(REPO / "recipes" / f"{recipe}.toml", [nowhere, *overrides])
    (run / "recipe.toml").write_text(to_toml(resolved))
    tokenizer = make_char_tokenizer(["\n !$&',-.3:;?" + string.ascii_letters])
    tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tokenizer.get_vocab_size(), **resolved.model.model_dump())
    save_model(GPT(cfg), run / "model.safetensors")
    return run


# ---------------------------------------------------------------- results


def bundle_or_random(bundle: Path | None, tmp: Path, *flags: str, overrides: tuple[str, ...] = ()) -> Path:
    """`bundle`, or the char-1m recipe's model (with recipe `overrides`) with random weights exported
    into `tmp` with `flags` (--int8, --int4): what a tinygrad benchmark measures when given no --bundle."""
    if bundle is not None:
        return bundle
    edgecraft_cli("export", str(random_run(tmp, overrides=overrides)), *flags, "--out", str(tmp / "bundle"))
    return tmp / "bundle"


def paired_ratio(a: list[dict], b: list[dict], key: str = "tok_cpu_s") -> str:
    """Row a against row b, round by round: "median x [min-max]" of the per-round ratios of `key`."""
    ratios = [x[key] / y[key] for x, y in zip(a, b)]
    return f"{np.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


class RunInfo:
    """A results file's header, taken when a benchmark starts and finished when it writes."""

    def __init__(self, title: str, extra: str = "") -> None:
        from edgecraft.bench.system import system_info

        self.data = {
            "title": title, "machine": system_info(), "load_before": os.getloadavg(),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "extra": extra,
        }

    def markdown(self, body: str, level: str = "#") -> str:
        return render(self.data | {"load_after": os.getloadavg()}, body, level)

    def append(self, path: Path, body: str) -> None:
        """A section (header and body) at the end of `path`: a results file kept as a log."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("\n" + self.markdown(body, "##"))

    def write(self, stem: Path, body: str, data: dict | None = None) -> None:
        """STEM.md (header and body) and, with `data`, STEM.json (header and data), atomically."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = self.data | {"load_after": os.getloadavg(), "created": created}
        write_atomic(stem.with_suffix(".md"), render(info, body))
        if data is not None:
            write_atomic(stem.with_suffix(".json"), json.dumps(info | data, indent=1) + "\n")


def render(info: dict, body: str, level: str = "#") -> str:
    """The header every results file starts with, then `body`."""
    from edgecraft.bench.system import describe

    loads = ["/".join(f"{x:.2f}" for x in info[k]) for k in ("load_before", "load_after")]
    machine = describe(info["machine"]).replace("\n", "  \n")
    return (
        f"{level} {info['title']}\n\nMachine: {machine}  \n"
        f"Load average (1/5/15 min) at the start {loads[0]}, at the end {loads[1]}"
        " (a shared machine: compare rows within a table, measured side by side).  \n"
        f"Command: `{info['command']}`{info.get('extra', '')}\n\n{body.rstrip()}\n"
    )


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` in this Python (another interpreter's libraries, say)."""
    from importlib import metadata

    found = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
    return {name: found[name] for name in names if name in found}
