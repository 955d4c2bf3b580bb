"""DDP through torchrun: 2 gloo processes on loopback training the tiny model for real.

Ranks are started by torchrun itself or, where a test must signal one rank, as torchrun starts
them (RANK, WORLD_SIZE, MASTER_ADDR... in the environment), so the test knows each process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_recipe
from edgecraft.errors import UserError
from edgecraft.recipe import load_recipe
from edgecraft.train import resume_run, train_recipe

EDGECRAFT = [sys.executable, "-m", "edgecraft"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LONG = ["train.max_steps=400", "train.checkpoint_every=5", "train.eval_every=1000", "train.sample_every=1000"]


def _sets(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], cwd: Path, world: int = 2) -> list[subprocess.Popen]:
    """`world` ranks of `edgecraft ARGS` with torchrun's environment, stdout and stderr piped."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen([*EDGECRAFT, *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while not path.is_dir():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in procs]
        time.sleep(0.02)


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _mean_abs_diff(a: Path, b: Path) -> float:
    """Mean |dw| over all weights. The attention's key bias is left out of a stricter per-tensor
    check: its true gradient is zero (softmax ignores a shift shared by every key), so AdamW turns
    float rounding noise, which differs between 1 and 2 processes, into full-size steps."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        if name.endswith("attn.qkv.bias"):
            diff = diff.view(3, -1)[[0, 2]]  # query and value biases
        assert diff.mean() < 1e-6, name
    return sum((wa[k] - wb[k]).abs().sum().item() for k in wa) / sum(w.numel() for w in wa.values())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`torchrun --nproc_per_node=2 -m edgecraft train` of the tiny recipe: 2 processes x batch_size 8
    x grad_accum 2 (DDP skips the all-reduce of the first micro-batch), 20 steps."""
    root = tmp_path_factory.mktemp("ddp")
    recipe = write_tiny_recipe(root)
    done = subprocess.run([*TORCHRUN, "-m", "edgecraft", "train", str(recipe), *_sets(["train.max_steps=20", "train.grad_accum=2"])],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, done


def test_two_processes_write_one_run_that_equals_one_process_with_the_global_batch(ddp_run, tmp_path):
    root, done = ddp_run
    run = root / "runs" / "tiny"
    # rank 0 alone writes and speaks: one run directory, one checkpoint set, each line once
    assert sorted(p.name for p in root.iterdir()) == ["cache", "corpus.txt", "runs", "tiny.toml"]
    assert [p.name for p in (root / "runs").iterdir()] == ["tiny"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "metrics.jsonl", "model.safetensors", "recipe.toml", "samples.txt", "tb", "tokenizer.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    assert len(list((run / "tb").iterdir())) == 1
    assert done.stderr.count("global batch 32 = batch_size 8 x grad_accum 2 x 2 processes") == 1
    assert done.stderr.count("data: ") == 1 and done.stderr.count("step 20: val loss") == 1
    assert done.stdout.count("run written to runs/tiny") == 1
    assert (run / "samples.txt").read_text().count("===== step") == 2
    train = _events(run, "train")
    assert [e["step"] for e in train] == [5, 10, 15, 20]  # one record per logged step
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    state = json.loads((run / "checkpoints" / "step-000020" / "state.json").read_text())
    assert (state["world_size"], state["batch_size"], state["global_batch"]) == (2, 8, 32)
    assert state["tokens_seen"] == 20 * 32 * 16

    # one process reading the same global batch (batch_size 16) takes the same steps
    single = train_recipe(load_recipe(root / "tiny.toml", ["train.max_steps=20", "train.grad_accum=2", "train.batch_size=16"]),
                          runs_dir=tmp_path / "runs")
    assert _mean_abs_diff(run / "model.safetensors", single / "model.safetensors") < 1e-5
    for a, b in zip(_events(run, "eval"), _events(single, "eval")):  # exact eval, sharded over ranks
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for a, b in zip(train, _events(single, "train")):  # the loss is all-reduced before it is logged
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_resume_on_two_processes_is_exact_and_on_one_keeps_the_global_batch(ddp_run, tmp_path):
    root, _ = ddp_run
    finished = root / "runs" / "tiny" / "model.safetensors"
    for name in ("two", "one"):
        shutil.copytree(root / "runs" / "tiny", tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-000020")

    procs = _launch(["train", "--resume", str(tmp_path / "two")], cwd=root)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    a, b = load_file(str(finished)), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    resume_run(tmp_path / "one")  # this process alone: batch_size 16 keeps the global batch
    assert _mean_abs_diff(finished, tmp_path / "one" / "model.safetensors") < 1e-5
    state = json.loads((tmp_path / "one" / "checkpoints" / "step-000020" / "state.json").read_text())
    assert (state["world_size"], state["batch_size"], state["global_batch"]) == (1, 16, 32)


def test_resume_refuses_a_world_size_that_would_change_the_global_batch(tmp_path):
    from edgecraft.train.state import resume_batch_size

    recipe = load_recipe(write_tiny_recipe(tmp_path))  # batch_size 8
    saved = {"world_size": 2, "batch_size": 8, "global_batch": 16}
    assert [resume_batch_size(saved, recipe, world, "run") for world in (1, 2, 4, 16)] == [16, 8, 4, 1]
    with pytest.raises(UserError, match=r"global batch is 16 .*batch_size 8 x grad_accum 1 x 2 processes.*divides 16"):
        resume_batch_size(saved, recipe, 3, "run")
    assert resume_batch_size({}, recipe, 2, "run") == 4  # a checkpoint from before DDP: 1 process


def test_ctrl_c_on_one_rank_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    procs = _launch(["train", str(recipe), *_sets(LONG)], cwd=tmp_path)
    run = tmp_path / "runs" / "tiny"
    _wait_for(run / "checkpoints" / "step-000005", procs)
    procs[1].send_signal(signal.SIGINT)
    (_, err0), (_, err1) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [130, 130], (err0, err1)
    assert "interrupted at step" in err0 and "Traceback" not in err0
    assert "error" not in err1 and "Traceback" not in err1  # rank 0 reports for both
    stopped = int(err0.split("interrupted at step ")[1].split(";")[0])
    assert 5 <= stopped < 400
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert newest.name == f"step-{stopped:06d}" and not (run / "model.safetensors").exists()
    assert json.loads((newest / "state.json").read_text())["step"] == stopped


def test_a_dead_rank_stops_the_others_with_one_clear_line(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    procs = _launch(["train", str(recipe), *_sets(LONG)], cwd=tmp_path)
    _wait_for(tmp_path / "runs" / "tiny" / "checkpoints" / "step-000005", procs)
    procs[1].kill()
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert procs[0].returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "lost the other training processes" in lines[0], err
    assert "--resume" in lines[0] and "Traceback" not in err


def test_qat_under_ddp_saves_one_set_of_ranges_and_exports(tmp_path):
    from edgecraft.export import ExportOptions, export_run

    recipe = write_tiny_recipe(tmp_path, extra='\n[quant]\nqat = true\nstart_step = 5\nscheme = "static"\n')
    procs = _launch(["train", str(recipe), *_sets(["train.max_steps=10"])], cwd=tmp_path)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    run = tmp_path / "runs" / "tiny"
    ranges = load_file(str(run / "quant.safetensors"))
    assert "blocks.0.attn.qkv.act_range" in ranges and all(torch.isfinite(r).all() for r in ranges.values())
    bundle = export_run(run, tmp_path / "bundle", ExportOptions(int8=True))
    assert (bundle / "model.int8.onnx").is_file()


def test_a_check_that_fails_stops_every_rank_and_is_reported_once(tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    procs = _launch(["train", str(recipe)], cwd=tmp_path)
    (_, err0), (_, err1) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert err0.count("error: ") == 1 and "already exists" in err0 and "Traceback" not in err0
    assert "error" not in err1 and "Traceback" not in err1
    assert list((tmp_path / "runs" / "tiny").iterdir()) == []


def test_threads_per_rank_share_the_cores_among_the_ranks_of_a_machine():
    from edgecraft.train.distributed import Group, threads_per_rank

    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(Group(world=4, local_world=2), 0) == max(1, cores // 2)
    assert threads_per_rank(Group(world=4, local_world=2), 3) == 3  # train.threads wins
    assert threads_per_rank(Group(), 0) == 0  # one process: the library's default
