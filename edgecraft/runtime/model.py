"""The embeddable model: a verified bundle, its tokenizer and a decode loop over the ONNX engine.

    model = load("export/shakespeare")
    model.generate("ROMEO:", max_new_tokens=80, temperature=0.8, top_k=40, seed=1)

Conventions an app can rely on:
- Text goes through the bundle's tokenizer; characters it does not know become its unknown token
  ("<unk>" for character tokenizers) rather than an error. Byte-level BPE knows every character.
- An empty prompt starts from the tokenizer's newline token (the usual start of a document in a
  text corpus), or token 0 if newline is not one token; that start token is not part of the output.
- Past the context length (block_size) generation goes on: when a sequence's cache is full the
  engine is reset and re-filled with the last block_size // 2 tokens, so the re-fill costs one
  prefill every block_size // 2 tokens rather than one per token. A prompt longer than block_size
  keeps its last block_size tokens.
- A Model holds one engine with one KV cache: use it from one thread at a time, and finish (or
  drop) a stream before the next call on the same Model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from edgecraft.runtime.bundle import TOKENIZER, BundleError, model_file, read_manifest, verify_files
from edgecraft.runtime.sampling import SamplingParams, sample
from edgecraft.runtime.text import TextStream


@dataclass(frozen=True)
class Score:
    """How well the model predicts a text: mean negative log-likelihood in nats per predicted token
    (every token after the first), its exponential (perplexity) and how many tokens were predicted."""

    nll: float
    perplexity: float
    n_tokens: int


def _options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
    repetition_penalty: float, stop: list[str] | str | None,
) -> tuple[SamplingParams, list[str]]:
    """Validate the generation options up front (ValueError naming the option); a single stop
    string is accepted as a list of one."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    return SamplingParams(temperature, top_k, top_p, repetition_penalty), stops


class Model:
    """Generation, streaming, batches and scoring over one engine. Build it with `load()`."""

    def __init__(self, engine, tokenizer: Tokenizer, manifest: dict) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.config: dict = manifest["config"]
        self.block_size: int = engine.block_size
        self.vocab_size: int = engine.vocab_size
        newline = tokenizer.encode("\n", add_special_tokens=False).ids
        self.start_id = newline[0] if len(newline) == 1 else 0

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the start token for an empty text (see the module docstring)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids or [self.start_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---------------------------------------------------------------- the decode loop

    def _prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Reset the engine and fill it with `rows` (right-padded); logits (B, V) after each row's last token."""
        lengths = np.array([len(r) for r in rows], dtype=np.int64)  # (B,)
        ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)  # (B, S)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        self.engine.reset(len(rows))
        logits = self.engine.prefill(ids, lengths)  # (B, S, V)
        return logits[np.arange(len(rows)), lengths - 1]  # (B, V)

    def _tokens(
        self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int, seed: int | None
    ) -> Iterator[np.ndarray]:
        """Yield each step's next tokens (B,) for all rows, up to max_new_tokens steps.

        The caller decides when a row is done and stops iterating when all are; finished rows keep
        decoding (one batch, fixed shape) but their tokens are ignored. Each row sees exactly the
        context it would see alone, so a batch gives each prompt the same greedy text as generate().
        A row whose window is full slides on its own: its cache is re-filled with its last `keep`
        tokens but the newest, which the batched decode step then appends like every other row's.
        """
        block, keep = self.block_size, max(1, self.block_size // 2)
        B = len(prompts)
        rng = random.Random(seed)
        rows = [p[-block:] for p in prompts]
        logits = self._prefill(rows)  # (B, V)
        longest = max(len(r) for r in rows)  # the fullest row's cache; a plain int, see below
        history: list[np.ndarray] = []  # each step's tokens (B,)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = np.zeros((B, self.vocab_size), dtype=bool)  # (B, V)
            for b, p in enumerate(prompts):
                seen[b, p] = True
        fast = params.greedy and seen is None
        batch = np.arange(B)
        # Per step, numpy runs cold after the graph (Engine.decode's docstring): the loop keeps to
        # plain ints and list appends and touches the arrays only when a window is full.
        for step in range(max_new_tokens):
            tokens = logits.argmax(axis=-1) if fast else sample(logits, rng, params, seen)  # (B,)
            history.append(tokens)
            if seen is not None:
                seen[batch, tokens] = True
            yield tokens
            if step + 1 == max_new_tokens:
                return
            if longest == block:  # these rows keep their last `keep` tokens; the decode adds the newest
                full = np.flatnonzero(self.engine.lengths == block)
                generated = np.stack(history, axis=1)  # (B, step + 1)
                self._refill(full, [(prompts[b] + generated[b].tolist())[-keep:-1] for b in full])
                longest = int(self.engine.lengths.max())
            logits = self.engine.decode(tokens)  # (B, V)
            longest += 1

    def _refill(self, rows: np.ndarray, contexts: list[list[int]]) -> None:
        """Empty the caches of `rows` (indices into the batch) and fill them with `contexts`; the
        other rows sit the call out with their caches untouched."""
        lengths = np.zeros(len(self.engine.lengths), dtype=np.int64)  # (B,)
        lengths[rows] = [len(c) for c in contexts]
        ids = np.zeros((len(lengths), max(1, int(lengths.max()))), dtype=np.int64)  # (B, S)
        for b, context in zip(rows, contexts):
            ids[b, : len(context)] = context
        self.engine.lengths[rows] = 0
        if lengths.any():
            self.engine.prefill(ids, lengths)

    # ---------------------------------------------------------------- public API

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> str:
        """The continuation of `prompt` (without the prompt), ending before the first stop string."""
        params, stops = _options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop)
        if stops:
            return "".join(self._stream(self.encode(prompt), params, max_new_tokens, stops, seed))
        ids = [int(t[0]) for t in self._tokens([self.encode(prompt)], params, max_new_tokens, seed)]
        return self.decode(ids)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like generate(), as text pieces while they are produced; the pieces join to generate()'s
        text. A piece never holds a broken character nor text that may turn out to start a stop string."""
        params, stops = _options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop)
        return self._stream(self.encode(prompt), params, max_new_tokens, stops, seed)

    def _stream(
        self, ids: list[int], params: SamplingParams, max_new_tokens: int, stops: list[str], seed: int | None
    ) -> Iterator[str]:
        text = TextStream(self.tokenizer, stops)
        for tokens in self._tokens([ids], params, max_new_tokens, seed):
            piece = text.push(int(tokens[0]))
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    def generate_batch(
        self,
        prompts: list[str],
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """generate() for many prompts in one batched decode loop; one RNG draws for all rows, so
        with sampling a row's text differs from generate() alone, while greedy text is the same."""
        if not prompts:
            return []
        params, stops = _options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop)
        B = len(prompts)
        rows = [self.encode(p) for p in prompts]
        if not stops:
            steps = np.stack(list(self._tokens(rows, params, max_new_tokens, seed)))  # (N, B)
            return [self.decode(steps[:, b].tolist()) for b in range(B)]
        streams = [TextStream(self.tokenizer, stops) for _ in range(B)]
        texts: list[list[str]] = [[] for _ in range(B)]
        active = set(range(B))
        for tokens in self._tokens(rows, params, max_new_tokens, seed):
            for b in list(active):
                texts[b].append(streams[b].push(int(tokens[b])))
                if streams[b].stopped:
                    active.discard(b)
            if not active:
                break
        for b in active:  # rows that ran to max_new_tokens
            texts[b].append(streams[b].finish())
        return ["".join(t) for t in texts]

    def score(self, text: str) -> Score:
        """Mean negative log-likelihood (nats/token) and perplexity of `text`. A text longer than
        block_size is scored in windows that advance by block_size // 2, each token predicted once
        with at least block_size // 2 tokens of context (all of them near the start)."""
        ids = np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        if len(ids) < 2:
            raise ValueError(f"score needs a text of at least 2 tokens, got {len(ids)}")
        block, stride = self.block_size, max(1, self.block_size // 2)
        total, pos = 0.0, 1  # pos: the next token to predict
        while pos < len(ids):
            end = min(len(ids), block if pos == 1 else pos + stride)
            begin = max(0, end - block)
            self.engine.reset(1)
            logits = self.engine.prefill(ids[None, begin:end]).astype(np.float64)[0]  # (S, V)
            rows = logits[pos - 1 - begin : end - 1 - begin]  # (n, V) predicting ids[pos:end]
            peak = rows.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(rows - peak).sum(axis=-1)) + peak[:, 0]  # (n,)
            total += float((log_z - rows[np.arange(len(rows)), ids[pos:end]]).sum())
            pos = end
        n = len(ids) - 1
        return Score(nll=total / n, perplexity=math.exp(total / n), n_tokens=n)


def load(path: str | Path, int8: bool = False, threads: int = 0, device: str = "cpu", verify: bool = True) -> Model:
    """Open bundle `path`: check its format and (with verify) every file's sha256, then build the
    engine. int8 picks model.int8.onnx; threads 0 uses the bundle's recommended count."""
    from edgecraft.runtime.engine import Engine

    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    onnx_path = model_file(path, manifest, int8)
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"{path / TOKENIZER}: damaged tokenizer ({err})") from None
    vocab = manifest["config"].get("vocab_size")
    if vocab is not None and tokenizer.get_vocab_size() > vocab:
        raise BundleError(
            f"{path / TOKENIZER}: {tokenizer.get_vocab_size()} tokens but the model has {vocab}; re-export the run"
        )
    if not threads:
        threads = int(manifest.get("runtime", {}).get("threads", 0))
    return Model(Engine(onnx_path, manifest, threads=threads, device=device), tokenizer, manifest)
