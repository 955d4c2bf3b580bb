"""Data-parallel training under torchrun (torch.distributed DDP): gloo on CPU, NCCL on CUDA.

torchrun starts one process per rank with RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE set.
Without them a run is a group of one and every collective here returns its input unchanged, so a
single process runs the same code. Every rank calls the collectives in the same order; only rank 0
writes files or prints. A loop this plain is what Ray Train or Accelerate can wrap: a process
group that already exists is used as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from edgecraft.errors import UserError
from edgecraft.train.interrupt import INTERRUPTED

# How long a rank waits in a collective for the others. A dead process on the same machine shows
# at once (its connections close); this catches a hung one, or a machine lost without a word. It
# must outlast what rank 0 does alone between steps: samples and checkpoint writes.
TIMEOUT = timedelta(minutes=10)
LOST = 1  # exit code when the other processes are gone
# How long a rank stopped by Ctrl-C waits for the others to reach the group's end (rank 0 writes
# the last checkpoint meanwhile) before it leaves anyway.
LEAVE_TIMEOUT = timedelta(minutes=2)


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device -> this rank's torch device (cuda:LOCAL_RANK); asking for a missing CUDA
    device is the user's to fix."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError('train.device: "cuda" asked for, but PyTorch sees no CUDA device (use "auto" or "cpu")')
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device(name)
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA devices; "
            "start at most that many processes per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Group]:
    """The group this process trains in: joined (and left after) when torchrun started it."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank)
    if world == 1:
        yield Group(device=device)
        return
    import torch.distributed as dist

    group = Group(rank, local_rank, world, _env_int("LOCAL_WORLD_SIZE", 1), device)
    if dist.is_initialized():  # a launcher's own group: use it, leave it to its owner
        yield group
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"rank {rank}: cannot join the {backend} process group ({_reason(err)})", LOST) from None
    try:
        yield group
    except UserError as err:
        if err.exit_code == INTERRUPTED:
            _leave_together(backend)
        raise
    else:
        _leave_together(backend)
    finally:
        dist.destroy_process_group()


def _leave_together(backend: str) -> None:
    """After the last step or Ctrl-C, wait until every rank is done (rank 0 writes the last
    checkpoint and the model) before tearing the group down. A rank that left while rank 0 still
    wrote aborted at exit now and then ("terminate called without an active exception"): rank 1 of
    tests/test_ddp.py's Ctrl-C test in about 8 runs, and of its resume test once in a clean-clone
    CI run (at 52971f2); leaving together closes that window. Every rank stops at the same step, so
    all of them come here; one that died meanwhile only ends the wait early."""
    import torch.distributed as dist

    try:
        if backend == "gloo":
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
        else:
            dist.barrier()
    except RuntimeError:  # a peer gone: nothing left to wait for
        pass


def is_main_process() -> bool:
    """Rank 0 of torchrun's processes, or a process on its own: the one that prints."""
    return _env_int("RANK", 0) == 0


def threads_per_rank(group: Group, asked: int) -> int:
    """train.threads, else (0) the cores this process may use shared among the ranks on this
    machine; 0 for a lone process keeps the library's default."""
    if asked or group.local_world == 1:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // group.local_world)


def wrap(group: Group, model: torch.nn.Module) -> torch.nn.Module:
    """The module the training step calls: DDP (gradients averaged over ranks) or the model itself."""
    if group.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [group.device.index] if group.device.type == "cuda" else None
    # the model's only buffers are constant rope tables: no need to broadcast them every step
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def no_sync(forward: torch.nn.Module, last_micro: bool):
    """Accumulating micro-batches skip DDP's gradient all-reduce; the last one does it for all."""
    if last_micro or not hasattr(forward, "no_sync"):
        return contextlib.nullcontext()
    return forward.no_sync()


# ---------------------------------------------------------------------------- collectives


def all_sum(group: Group, values: torch.Tensor) -> torch.Tensor:
    """`values` summed over ranks, in place (it must live on group.device)."""
    if group.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def end_step(group: Group, loss: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
    """One all-reduce per step: the step's loss averaged over ranks, and whether any rank was
    signalled, so every rank leaves the loop after the same step."""
    if group.world == 1:
        return loss, stop
    packed = torch.stack((loss.float(), torch.tensor(float(stop), device=loss.device)))  # (2,)
    all_sum(group, packed)
    return packed[0] / group.world, bool(packed[1].item() > 0)


def gather(group: Group, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, on the CPU."""
    if group.world == 1:
        return [tensor]
    import torch.distributed as dist

    local = tensor.to(group.device)
    out = [torch.empty_like(local) for _ in range(group.world)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def average_ranges(group: Group, qat) -> None:
    """Static QAT ranges, observed by each rank on its own rows, averaged over ranks and written
    back on every rank: the saved ranges are one answer, and a resumed run continues from it."""
    if group.world == 1 or qat is None or not qat.ranges:
        return
    names = sorted(qat.ranges)
    packed = torch.stack([qat.ranges[n] for n in names]).to(group.device)  # (layers, 2): lo, hi
    all_sum(group, packed)
    qat.load_state_dict({f"{n}.act_range": r for n, r in zip(names, (packed / group.world).cpu())})


def check_same(group: Group, value: int, what: str) -> None:
    """Stop every rank when they disagree on `value` (a hash of what each one read)."""
    if group.world == 1:
        return
    import torch.distributed as dist

    bounds = torch.tensor([value, -value], dtype=torch.int64, device=group.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0] != -bounds[1]:
        raise UserError(f"{what} differs between the training processes" if group.main else "")


@contextlib.contextmanager
def together(group: Group) -> Iterator[None]:
    """Work that may fail on some ranks (checks, files, data): if a UserError stops any of them,
    every rank stops. The first failing rank reports its error; the others exit with its code
    without a word, so the failure is reported once."""
    error: UserError | None = None
    try:
        yield
    except UserError as err:
        if group.world == 1:
            raise
        error = err
    if group.world == 1:
        return
    codes = torch.zeros(group.world, dtype=torch.int64, device=group.device)  # (world,)
    if error is not None:
        codes[group.rank] = max(1, error.exit_code)
    all_sum(group, codes)
    failed = codes.nonzero().flatten().tolist()
    if not failed:
        return
    if group.rank == failed[0]:
        assert error is not None
        raise UserError(str(error) if group.main else f"rank {group.rank}: {error}", error.exit_code) from None
    raise UserError("", int(codes[failed[0]]))


def _reason(err: BaseException) -> str:
    """The first sentence of a gloo/NCCL message, without its source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    return text.split(". ")[0].rstrip(".")


def _is_lost_peer(err: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "NCCL", "Connection"))


@contextlib.contextmanager
def peers_kept(group: Group, resume_hint: str) -> Iterator[None]:
    """A collective that fails because a rank died or hung (the TIMEOUT) becomes one clear line."""
    try:
        yield
    except RuntimeError as err:
        if group.world == 1 or not _is_lost_peer(err):
            raise
        raise UserError(
            f"rank {group.rank}: lost the other training processes ({_reason(err)}); if one died, "
            f"its own output says why. {resume_hint}",
            LOST,
        ) from None
