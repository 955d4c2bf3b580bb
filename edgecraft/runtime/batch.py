"""Sequences sharing one engine: they join between steps, decode together, and leave when done.

`Model.generate`, `stream`, `generate_batch` and the server's scheduler all run this one loop, so
sampling, repetition penalty, stop strings, streaming text and the sliding window behave the same
everywhere. Each sequence owns its sampling options and RNG: the same request with the same seed
gives the same text whatever else shares the batch.

The sliding window: when a slot's cache is full, it is emptied and re-filled with the sequence's
last block_size // 2 tokens but the newest, which the batched decode step then appends, so the
re-fill costs one prefill every block_size // 2 tokens rather than one per token.
"""

from __future__ import annotations

import random
from itertools import groupby

import numpy as np

from edgecraft.runtime.engine import Engine
from edgecraft.runtime.sampling import SamplingParams, sample
from edgecraft.runtime.text import TextStream


class Sequence:
    """One generation: its tokens, sampling options, RNG and (when streaming) its text."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        vocab_size: int,
        seed: int | None = None,
        text: TextStream | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt = list(prompt)
        self.prompt_length = len(prompt)
        self.generated: list[int] = []
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.rng = random.Random(seed)
        self.seen: np.ndarray | None = None  # (V,) tokens in the context, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[prompt] = True
        self.text = text
        self.piece = ""  # the text the last token released (streaming only)
        self.pieces: list[str] = []  # all of it
        self.finish_reason: str | None = None  # "stop" (a stop string) or "length" (max_new_tokens)

    @property
    def context(self) -> list[int]:
        """Prompt and generated tokens."""
        return self.prompt + self.generated

    def tail(self, n: int) -> list[int]:
        """The last n tokens of the context (what a prefill or a window re-fill reads)."""
        generated = self.generated
        if n <= len(generated):
            return generated[len(generated) - n :]
        return self.prompt[max(0, len(self.prompt) - n + len(generated)) :] + generated

    def accept(self, token: int) -> None:
        """Record the next token; update the text and whether the sequence is done."""
        self.generated.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.text is not None:
            self.piece = self.text.push(token)
            if self.text.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
            if self.text is not None:
                self.piece += self.text.finish()
                if self.text.stopped:
                    self.finish_reason = "stop"
        if self.piece:
            self.pieces.append(self.piece)


class Batch:
    """Up to `slots` sequences over one engine; the active ones sit packed in slots 0..n-1."""

    def __init__(self, engine: Engine, slots: int) -> None:
        self.engine = engine
        self.slots = slots
        self.active: list[Sequence] = []
        self._last = np.zeros(slots, dtype=np.int64)  # (slots,) each active sequence's newest token
        self._longest = 0  # the fullest active slot's length: a plain int, checked every step
        engine.reset(slots)

    @property
    def free(self) -> int:
        return self.slots - len(self.active)

    def join(self, seqs: list[Sequence]) -> np.ndarray:
        """Prefill `seqs` into the next free slots and pick each one's first token; logits (k, V)
        after each prompt (valid until the next engine call)."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free slots")
        first = len(self.active)
        rows = {first + i: s.tail(self.engine.block_size) for i, s in enumerate(seqs)}
        logits, lengths = self.prefill_rows(rows)  # (slots, S, V), (slots,)
        k = np.arange(first, first + len(seqs))
        last = logits[k, lengths[k] - 1]  # (k, V)
        self.active += seqs
        self._choose(seqs, last, first)
        self._longest = int(self.engine.lengths[: len(self.active)].max())
        self._drop_finished()
        return last

    def step(self) -> tuple[list[Sequence], np.ndarray]:
        """One batched decode: every active sequence gets its next token. Returns the sequences
        that advanced (row i of the logits (n, V) is theirs; valid until the next engine call);
        the ones that finished have left their slots already."""
        n = len(self.active)
        if not n:
            return [], np.zeros((0, self.engine.vocab_size), dtype=np.float32)
        if self._longest >= self.engine.block_size:
            self._slide()
        logits = self.engine.decode(self._last[:n])  # (n, V)
        self._longest += 1
        advanced = list(self.active)
        self._choose(advanced, logits, 0)
        self._drop_finished()
        return advanced, logits

    def leave(self, seq: Sequence) -> None:
        """Free `seq`'s slot now (finished, stopped or abandoned); the last active sequence moves
        into it so the active slots stay packed."""
        b = self.active.index(seq)
        last = len(self.active) - 1
        self.engine.release(b)
        if b != last:
            self.engine.move(last, b)
            self.active[b] = self.active[last]
            self._last[b] = self._last[last]
        self.active.pop()
        self._longest = int(self.engine.lengths[: len(self.active)].max()) if self.active else 0

    def _choose(self, seqs: list[Sequence], logits: np.ndarray, first: int) -> None:
        """Sample each sequence's next token from its row of `logits` (rows in `seqs` order, slots
        from `first`), with its own options and RNG; rows sharing options are sampled together."""
        if len(seqs) == 1:  # the common case, kept short
            seq = seqs[0]
            if seq.params.greedy and seq.seen is None:
                token = int(logits[0].argmax())
            else:
                seen = None if seq.seen is None else seq.seen[None]
                token = int(sample(logits[:1], seq.rng, seq.params, seen)[0])
            self._last[first] = token
            seq.accept(token)
            return
        order = sorted(range(len(seqs)), key=lambda i: id(seqs[i].params))
        for _, group in groupby(order, key=lambda i: id(seqs[i].params)):
            rows = list(group)
            params = seqs[rows[0]].params
            seen = None if params.repetition_penalty == 1.0 else np.stack([seqs[i].seen for i in rows])
            tokens = sample(logits[rows], [seqs[i].rng for i in rows], params, seen)  # (k,)
            for i, token in zip(rows, tokens.tolist()):
                self._last[first + i] = token
                seqs[i].accept(token)

    def _drop_finished(self) -> None:
        for seq in [s for s in self.active if s.finish_reason is not None]:
            self.leave(seq)

    def _slide(self) -> None:
        """Re-fill every full slot with its sequence's last block_size // 2 tokens but the newest
        (the next decode appends it); the other slots sit the call out with their caches untouched."""
        keep = max(1, self.engine.block_size // 2)
        n = len(self.active)
        full = np.flatnonzero(self.engine.lengths[:n] >= self.engine.block_size)
        for b in full:
            self.engine.release(b)
        contexts = {int(b): self.active[b].tail(keep)[:-1] for b in full}
        if any(contexts.values()):  # a context of 2 or 3 keeps nothing but the newest token
            self.prefill_rows(contexts)
        self._longest = int(self.engine.lengths[:n].max())

    def prefill_rows(self, rows: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prefill each slot's tokens of `rows` (slot -> tokens, right-padded into one call); the
        other slots sit out. Returns the logits (slots, S, V) and the lengths (slots,)."""
        lengths = np.zeros(self.slots, dtype=np.int64)  # (slots,)
        for b, row in rows.items():
            lengths[b] = len(row)
        ids = np.zeros((self.slots, max(1, int(lengths.max()))), dtype=np.int64)  # (slots, S)
        for b, row in rows.items():
            ids[b, : len(row)] = row
        return self.engine.prefill(ids, lengths), lengths
