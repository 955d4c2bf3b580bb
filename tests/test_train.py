"""The training loop: schedule, a real short training run, exact resume, run-directory rules."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_recipe
from edgecraft.errors import UserError
from edgecraft.recipe import TrainConfig, load_recipe
from edgecraft.train import lr_at, resume_run, train_recipe


def test_lr_schedule_warmup_peak_cosine_min():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(4, cfg) == pytest.approx(1e-3 * 5 / 11)
    assert lr_at(9, cfg) < lr_at(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    mid = 10 + (110 - 1 - 10) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(5.5e-4, rel=2e-2)  # halfway down the cosine
    assert lr_at(109, cfg) == pytest.approx(1e-4)  # min_lr at the last step
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_schedule_without_warmup_and_with_grad_accum():
    cfg = TrainConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, max_steps=5, grad_accum=4)
    # counted in optimizer steps: grad_accum does not change the curve
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx(
        [2e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )
    assert lr_at(0, cfg) == pytest.approx(2e-3)


def _events(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_short_training_run_lowers_the_loss_and_writes_the_run_directory(trained_run):
    run = trained_run
    for name in ("recipe.toml", "tokenizer.json", "model.safetensors", "metrics.jsonl", "samples.txt"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # keep_checkpoints = 2 of the three written (10, 20, 30)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    train, evals = _events(run, "train"), _events(run, "eval")
    assert [e["step"] for e in train] == [5, 10, 15, 20, 25, 30]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert evals[-1]["loss"] < math.log(len(vocab)) - 1.0  # well below a uniform guess
    assert all(e["tokens_per_s"] > 0 and e["grad_norm"] > 0 for e in train)
    assert (run / "samples.txt").read_text().count("===== step") == 3
    assert load_recipe(run / "recipe.toml").train.max_steps == 30
    steps, tags = _tb_scalars(run, "val/loss")
    assert steps == [10, 20, 30]
    assert {"train/loss", "val/loss", "lr", "tokens_per_s", "grad_norm"} <= set(tags["scalars"])
    assert tags["tensors"] == ["samples/text_summary"]


def test_eval_is_the_exact_loss_over_every_validation_block(tmp_path):
    """With eval_batches covering the split, the logged val loss is the split's per-token loss
    over all its non-overlapping blocks, computed here independently from the final weights."""
    from edgecraft import data
    from edgecraft.checkpoint import load_model

    recipe = load_recipe(write_tiny_recipe(tmp_path), ["train.max_steps=4", "train.eval_batches=1000"])
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    val = torch.from_numpy(data.prepare(recipe.data, 16).val.astype("int64"))
    n = (len(val) - 1) // 16
    x, y = val[: n * 16].view(n, 16), val[1 : n * 16 + 1].view(n, 16)
    model = load_model(run / "model.safetensors").eval()
    with torch.no_grad():
        logits = model(x)[0]  # (n, 16, V)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert n % 8 != 0  # the last batch is short, so it must be weighed by its rows
    assert _events(run, "eval")[-1]["loss"] == pytest.approx(expected, rel=1e-5)


def test_grad_accum_counts_optimizer_steps(tmp_path):
    recipe = load_recipe(
        write_tiny_recipe(tmp_path),
        ["train.grad_accum=3", "train.max_steps=6", "train.log_every=1", "train.warmup_steps=2"],
    )
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    train = _events(run, "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert [e["lr"] for e in train] == pytest.approx([lr_at(s, recipe.train) for s in range(6)])
    state = json.loads((run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["tokens_seen"] == 6 * 3 * 8 * 16


def _weights(path):
    return load_file(str(path))


def _tb_scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)], events.Tags()


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Straight run vs. a run resumed from its step-10 checkpoint (dropout on, so the RNG matters)."""
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["model.dropout=0.1", "train.max_steps=20"])
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    straight = _weights(run / "model.safetensors")
    straight_opt = _weights(run / "checkpoints" / "step-000020" / "optimizer.safetensors")

    # pretend the process died after step 10: no final weights, no step-20 checkpoint, and a
    # half-written checkpoint directory left behind
    (run / "model.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000020")
    (run / "checkpoints" / ".tmp-step-000015").mkdir()
    (run / "checkpoints" / ".tmp-step-000015" / "model.safetensors").write_bytes(b"partial")

    # TensorBoard orders event files by name (start second, host, pid, writer counter); a real
    # resume starts seconds later, but a tiny run can finish within the second it began, and
    # then writer counters 9 and 10 sort as strings. Start the resume in a later second.
    time.sleep(1.1)
    assert resume_run(run) == run
    resumed = _weights(run / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    resumed_opt = _weights(run / "checkpoints" / "step-000020" / "optimizer.safetensors")
    for name in straight_opt:
        assert torch.equal(straight_opt[name], resumed_opt[name]), name
    assert not (run / "checkpoints" / ".tmp-step-000015").exists()
    # metrics read as one run: no step logged twice
    steps = [e["step"] for e in _events(run, "train")]
    assert steps == sorted(set(steps)) == [5, 10, 15, 20]
    # TensorBoard: the resumed process appends a second event file to the same log directory
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
    assert _tb_scalars(run, "train/loss")[0] == [5, 10, 15, 20]


def test_ema_run_saves_the_average_and_resumes_bit_identical(tmp_path):
    """train.ema: model.safetensors is the average (not the checkpoint's training weights), its
    loss is the logged one, and a resume restores the average exactly."""
    from edgecraft import data
    from edgecraft.checkpoint import load_model

    recipe = load_recipe(write_tiny_recipe(tmp_path), ["train.ema=0.9", "train.max_steps=20", "train.eval_batches=1000"])
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    final = _weights(run / "model.safetensors")
    trained = _weights(run / "checkpoints" / "step-000020" / "model.safetensors")
    assert final.keys() == trained.keys()
    assert not torch.equal(final["blocks.0.mlp.fc.weight"], trained["blocks.0.mlp.fc.weight"])
    ema = load_file(str(run / "checkpoints" / "step-000020" / "state.safetensors"))
    assert torch.equal(ema["ema/blocks.0.mlp.fc.weight"], final["blocks.0.mlp.fc.weight"])
    val = torch.from_numpy(data.prepare(recipe.data, 16).val.astype("int64"))
    n = (len(val) - 1) // 16
    with torch.no_grad():
        _, loss, _ = load_model(run / "model.safetensors").eval()(val[: n * 16].view(n, 16), val[1 : n * 16 + 1].view(n, 16))
    assert _events(run, "eval")[-1]["loss"] == pytest.approx(loss.item(), rel=1e-5)

    (run / "model.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000020")
    time.sleep(1.1)  # TensorBoard event files sort by their start second (see the test above)
    resume_run(run)
    resumed = _weights(run / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_existing_run_directory_needs_force(tmp_path, trained_run):
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["train.max_steps=2"])
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        train_recipe(recipe, runs_dir=runs)
    assert [p.name for p in (runs / "tiny").iterdir()] == ["keep.txt"]
    run = train_recipe(recipe, runs_dir=runs, force=True)
    assert not (run / "keep.txt").exists() and (run / "model.safetensors").is_file()


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    run = train_recipe(load_recipe(write_tiny_recipe(tmp_path), ["train.max_steps=3"]), runs_dir=tmp_path / "r")
    before = (run / "model.safetensors").read_bytes()
    resume_run(run)
    assert (run / "model.safetensors").read_bytes() == before


def test_resume_needs_a_checkpoint(tmp_path):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copy(write_tiny_recipe(tmp_path), run / "recipe.toml")
    with pytest.raises(UserError, match="no complete checkpoint"):
        resume_run(run)
    with pytest.raises(UserError, match="no such run directory"):
        resume_run(tmp_path / "nowhere")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_a_user_error(tmp_path):
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["train.device=cuda"])
    with pytest.raises(UserError, match="train.device"):
        train_recipe(recipe, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_qat_run_attaches_at_start_step_and_resumes_exactly(tmp_path):
    recipe = load_recipe(
        write_tiny_recipe(tmp_path, extra='\n[quant]\nqat = true\nstart_step = 10\nscheme = "static"\n'),
        ["train.max_steps=20"],
    )
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    straight = _weights(run / "model.safetensors")
    ranges = _weights(run / "quant.safetensors")
    assert "blocks.0.attn.qkv.act_range" in ranges
    ckpt = json.loads((run / "checkpoints" / "step-000010" / "state.json").read_text())
    assert ckpt["qat_attached"] is False  # attached when step 10 begins, after this checkpoint
    (run / "model.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000020")
    resume_run(run)
    resumed = _weights(run / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.equal(ranges[k], v) for k, v in _weights(run / "quant.safetensors").items())


def test_resume_refuses_a_changed_corpus(tmp_path):
    recipe_path = write_tiny_recipe(tmp_path)
    run = train_recipe(load_recipe(recipe_path, ["train.max_steps=20"]), runs_dir=tmp_path / "runs")
    (run / "model.safetensors").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus.read_text()[::-1])  # same characters, different text
    with pytest.raises(UserError, match="not the one this run was trained on"):
        resume_run(run)


def test_bfloat16_autocast_trains_float32_weights(tmp_path):
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["train.dtype=bfloat16", "train.max_steps=20"])
    run = train_recipe(recipe, runs_dir=tmp_path / "runs")
    train = _events(run, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert all(t.dtype == torch.float32 for t in _weights(run / "model.safetensors").values())


def test_run_files_get_the_permissions_of_any_new_file(trained_run, tiny_bundle):
    """safetensors writes owner-only files and bundles are assembled in an owner-only temporary
    folder; what edgecraft publishes must be readable as the umask allows (0644/0755 under 022)."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    published = [trained_run / "model.safetensors", *trained_run.glob("checkpoints/*/*"), tiny_bundle,
                 *tiny_bundle.iterdir()]
    for path in published:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
