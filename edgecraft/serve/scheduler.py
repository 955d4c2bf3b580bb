"""Continuous batching: one thread owns the engine and its `Batch`; requests join and leave between steps.

The asyncio side (app.py) never touches the engine. It hands jobs (one per choice: prompt x n) to
`Scheduler.submit`, which queues them or refuses past `max_queue`; the scheduler thread loops:

    take cancellations and new jobs (under a lock) -> leave / join (one prefill for all joiners)
    -> one batched decode step over every active sequence -> hand this round's events to the loop

Events reach the loop through an outbox: a round's events for every request at once, with one
`call_soon_threadsafe` wake-up only when the loop has emptied the outbox, and a reader that fell
behind sends several tokens in one chunk, so the loop's cost does not grow with the step rate.
Each sequence keeps its own sampling options and RNG (runtime/batch.py).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edgecraft.runtime import Model
from edgecraft.runtime.batch import Batch, Sequence
from edgecraft.serve.metrics import Metrics
from edgecraft.serve.schemas import APIError

# seconds between the event loop's wake-ups while tokens stream (first tokens and endings go at
# once): a wake-up per token cost a small model's server as much CPU as decoding it, while a chunk
# of a few tokens every few milliseconds is far below what a reader notices
# (benchmarks/results/serve_load.md)
STREAM_INTERVAL = 0.005
DRAIN_SECONDS = 2.0  # after SIGTERM, in-flight sequences get this long to finish before they are ended
Alternatives = list[tuple[str, float]]  # the top-N tokens and their log-probabilities


@dataclass
class Event:
    """What one round did to one job: the text its token released, the token, its log-probability
    and top alternatives (when asked), and whether it finished ("stop" | "length" | "abort")."""

    index: int
    piece: str = ""
    token: int | None = None
    text: str = ""  # the token's own text, when log-probabilities are asked for
    logprob: float | None = None
    top: Alternatives | None = None
    finish_reason: str | None = None
    error: APIError | None = None
    prompt: list[tuple[str, float | None, Alternatives | None]] | None = None  # echo: the prompt's scores


class Sink:
    """One request's inbox on the event loop: events from all its jobs, and a future to wait on."""

    def __init__(self) -> None:
        self.pending: list[Event] = []
        self.waiter: asyncio.Future | None = None

    def put(self, events: list[Event]) -> None:
        self.pending += events
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> list[Event]:
        """Everything that arrived since the last call (waits for at least one event)."""
        while not self.pending:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        events, self.pending = self.pending, []
        return events


class Job:
    """One sequence of a request: choice `index`, the sequence, what to report, where to report it."""

    def __init__(
        self, index: int, seq: Sequence, sink: Sink, logprobs: int | None = None,
        score_prompt: bool = False, generate: bool = True,
    ) -> None:
        self.index = index
        self.seq = seq
        self.sink = sink
        self.logprobs = logprobs  # top-N per generated token (0: the chosen token's only), None: off
        self.score_prompt = score_prompt  # echo with logprobs: the prompt's own log-probabilities
        self.generate = generate  # False for max_tokens=0: score the prompt and finish
        self.arrived = time.perf_counter()
        self.last_token = 0.0
        self.cancelled = False


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """(k, V) logits -> (k, V) float64 log-probabilities."""
    z = rows.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Scheduler:
    """Owns `model.engine` through one `Batch` of `slots` rows; run() is the scheduler thread."""

    def __init__(
        self, model: Model, slots: int, max_queue: int, metrics: Metrics, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.model = model
        self.batch = Batch(model.engine, slots)
        self.max_queue = max_queue
        self.metrics = metrics
        self.loop = loop
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._jobs: dict[int, Job] = {}  # id(seq) -> job, for the sequences in the batch
        self._out: list[tuple[Sink, Event]] = []  # this round's events
        self._outbox: list[tuple[Sink, Event]] = []  # rounds the loop has not taken yet
        self._outbox_lock = threading.Lock()
        self._wake_pending = False  # a _deliver is scheduled on the loop and will take the outbox
        self._last_wake = 0.0
        self._draining_since: float | None = None
        self._stopped = False
        self._gauges = (0, 0)  # (running, waiting) as last published
        self.thread = threading.Thread(target=self._run, name="edgecraft-scheduler", daemon=True)

    # ------------------------------------------------------------------ event-loop side

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs; APIError 503 (Retry-After) past max_queue or while shutting down."""
        with self._lock:
            if self._draining_since is not None:
                raise APIError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "1"})
            if len(self._waiting) + len(jobs) > self.max_queue + self.batch.free:
                raise APIError(
                    503, f"the server is busy: {len(self._waiting)} sequences waiting "
                    f"(--max-queue {self.max_queue}); retry later",
                    kind="server_error", code="queue_full", headers={"Retry-After": "1"},
                )
            self._waiting.extend(jobs)
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: its sequences leave the batch before the next step."""
        with self._lock:
            for job in jobs:
                job.cancelled = True
            self._cancelled += jobs
            self._wake.notify()

    def drain(self) -> None:
        """Stop admitting (SIGTERM); in-flight sequences get DRAIN_SECONDS, then are ended."""
        with self._lock:
            if self._draining_since is None:
                self._draining_since = time.perf_counter()
            self._wake.notify()

    def stop(self) -> None:
        self.drain()
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self.thread.join(timeout=DRAIN_SECONDS + 5)

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        batch = self.batch
        while True:
            with self._lock:
                while self._draining_since is None and not (
                    self._waiting or self._cancelled or batch.active or self._stopped
                ):
                    self._wake.wait()
                cancelled, self._cancelled = self._cancelled, []
                admitted = []
                draining = self._draining_since is not None
                while self._waiting and (draining or len(admitted) < batch.free):
                    admitted.append(self._waiting.popleft())
                waiting = len(self._waiting)
            for job in cancelled:
                if id(job.seq) in self._jobs:
                    self._jobs.pop(id(job.seq))
                    batch.leave(job.seq)
            admitted = [job for job in admitted if not job.cancelled]
            if draining:
                self._refuse(admitted)
                if time.perf_counter() - self._draining_since > DRAIN_SECONDS:
                    self._abort_all()
            elif admitted:
                self._join(admitted)
                self._flush(urgent=True)  # first tokens go out now, not after the next step
            if batch.active:
                self._step()
            if (len(batch.active), waiting) != self._gauges:  # a gauge update takes a lock: only on change
                self._gauges = (len(batch.active), waiting)
                self.metrics.running.set(self._gauges[0])
                self.metrics.waiting.set(waiting)
            self._flush()
            if draining and not batch.active and (self._stopped or not self._waiting):
                if self._stopped:
                    return
                with self._lock:  # idle until stop(): nothing more will be admitted
                    while not self._stopped and not self._waiting:
                        self._wake.wait()

    def _emit(self, job: Job, event: Event) -> None:
        self._out.append((job.sink, event))

    def _flush(self, urgent: bool = False) -> None:
        """Hand this round's events to the loop. The loop is woken (a syscall and a thread switch,
        which cost a small model about as much as a decode step) at most every STREAM_INTERVAL,
        except for first tokens and endings, which go out at once."""
        if self._out:
            out, self._out = self._out, []
            urgent = urgent or any(e.finish_reason is not None or e.error is not None for _, e in out)
            now = time.perf_counter()
            with self._outbox_lock:
                self._outbox += out
                wake = not self._wake_pending and (urgent or now - self._last_wake >= STREAM_INTERVAL)
                if wake:
                    self._wake_pending, self._last_wake = True, now
            if wake:
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the event loop: the rounds so far into their requests' inboxes."""
        with self._outbox_lock:
            out, self._outbox, self._wake_pending = self._outbox, [], False
        by_sink: dict[int, tuple[Sink, list[Event]]] = {}
        for sink, event in out:
            by_sink.setdefault(id(sink), (sink, []))[1].append(event)
        for sink, events in by_sink.values():
            sink.put(events)

    def _refuse(self, jobs: list[Job]) -> None:
        for job in jobs:
            error = APIError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "1"})
            self._emit(job, Event(job.index, error=error))

    def _abort_all(self) -> None:
        for seq in list(self.batch.active):
            job = self._jobs.pop(id(seq))
            self.batch.leave(seq)
            self._emit(job, Event(job.index, finish_reason="abort"))

    def _join(self, jobs: list[Job]) -> None:
        """Score the prompts that asked for it, then prefill every generating job in one call."""
        for job in jobs:
            self.metrics.prompt_tokens.inc(job.seq.prompt_length)
            if job.score_prompt:
                self._emit(job, Event(job.index, prompt=self._score_prompt(job)))
            if not job.generate:
                self._emit(job, Event(job.index, finish_reason="length"))
        joining = [job for job in jobs if job.generate]
        if not joining:
            return
        logits = self.batch.join([job.seq for job in joining])  # (k, V)
        now = time.perf_counter()
        for job in joining:
            self._jobs[id(job.seq)] = job
            self.metrics.ttft.observe(now - job.arrived)
        self._report(joining, logits, now)

    def _score_prompt(self, job: Job) -> list[tuple[str, float | None, Alternatives | None]]:
        """The log-probability of each prompt token given the ones before it (echo + logprobs): a
        prefill of the prompt alone into the next free slot, which is then emptied again."""
        prompt = job.seq.prompt
        slot = len(self.batch.active)
        logits, _ = self.batch.prefill_rows({slot: prompt})  # (slots, S, V)
        rows = log_softmax(logits[slot, : len(prompt) - 1])  # (S-1, V)
        self.model.engine.release(slot)
        decode = self.model.decode
        scores = [(decode([prompt[0]]), None, None)]
        for t in range(1, len(prompt)):
            scores.append((decode([prompt[t]]), float(rows[t - 1, prompt[t]]), _top(rows[t - 1], job.logprobs, decode)))
        return scores

    def _step(self) -> None:
        advanced, logits = self.batch.step()  # (n, V)
        now = time.perf_counter()
        jobs = [self._jobs[id(seq)] for seq in advanced]
        observe = self.metrics.per_token.observe
        for job in jobs:
            observe(now - job.last_token)
        self._report(jobs, logits, now)

    def _report(self, jobs: list[Job], logits: np.ndarray, now: float) -> None:
        """Each job's newest token as an event; row i of `logits` (k, V) produced jobs[i]'s token."""
        out = self._out
        for i, job in enumerate(jobs):
            seq = job.seq
            event = Event(job.index, seq.piece, seq.generated[-1], finish_reason=seq.finish_reason)
            if job.logprobs is not None:
                self._score(event, logits[i], job.logprobs)
            job.last_token = now
            if seq.finish_reason is not None:
                del self._jobs[id(seq)]
            out.append((job.sink, event))
        self.metrics.generated_tokens.inc(len(jobs))

    def _score(self, event: Event, logits: np.ndarray, top: int) -> None:
        """The event's token's log-probability and the `top` most likely tokens, from its row (V,)."""
        row = log_softmax(logits[None])[0]  # (V,)
        decode = self.model.decode
        event.text, event.logprob = decode([event.token]), float(row[event.token])
        event.top = _top(row, top, decode)


def _top(row: np.ndarray, n: int | None, decode) -> Alternatives | None:
    """The n most likely tokens of a log-probability row (V,), most likely first."""
    if not n:
        return None
    idx = np.argpartition(-row, n - 1)[:n] if n < len(row) else np.arange(len(row))
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [(decode([int(t)]), float(row[t])) for t in idx if not math.isinf(row[t])]

