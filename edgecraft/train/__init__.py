"""Training: a validated recipe in, a run directory out (`train_recipe(recipe) -> run_dir`).

    run.py          train_recipe, resume_run: checks before any work, the run directory, the data
    loop.py         the loop: schedule, accumulation, clipping, evaluation, samples, checkpoints
    state.py        weights, optimizer, RNG, QAT, EMA and batch layout to and from checkpoints
    ema.py          the weight average (train.ema)
    log.py          metrics.jsonl, TensorBoard, samples.txt, the progress bar
    interrupt.py    Ctrl-C and SIGTERM: stop at a step boundary with a checkpoint
    distributed.py  torchrun and DDP: the process group, each rank's device and threads, collectives
    lock.py         one process trains a run at a time
    recover.py      resume from the newest whole checkpoint, extensions, divergence and out-of-memory lines
"""

from edgecraft.train.distributed import is_main_process
from edgecraft.train.loop import lr_at
from edgecraft.train.run import check_recipe, resume_run, train_recipe

__all__ = ["check_recipe", "is_main_process", "lr_at", "resume_run", "train_recipe"]
