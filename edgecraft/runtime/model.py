"""The embeddable model: a tokenizer and the one decode loop over any engine.

    model = load("export/shakespeare")
    model.generate("ROMEO:", max_new_tokens=80, temperature=0.8, top_k=40, seed=1)

`Model` is the one place where tokenizing, sampling, stop strings, repetition penalty, streaming
and the sliding window live (through `runtime/batch.py`); a bundle's onnxruntime engine, a run's
PyTorch engine and the tinygrad engine all sit under it, so every option behaves the same.

Conventions an app can rely on:
- Text goes through the bundle's tokenizer; characters it does not know become its unknown token
  ("<unk>" for character tokenizers) rather than an error. Byte-level BPE knows every character.
- An empty prompt starts from the tokenizer's newline token (the usual start of a document in a
  text corpus), or token 0 if newline is not one token; that start token is not part of the output.
- Past the context length (block_size) generation goes on, re-filling a window of the last
  block_size // 2 tokens (runtime/batch.py). A prompt longer than block_size keeps its last
  block_size tokens.
- The same seed gives the same text, in a batch or alone.
- A Model holds one engine with one KV cache: use it from one thread at a time, and finish (or
  drop) a stream before the next call on the same Model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from edgecraft.runtime.batch import Batch, Sequence
from edgecraft.runtime.bundle import (
    INT8_MODEL, INT8_SINGLE_ROW_MODEL, TOKENIZER, BundleError, Manifest, model_file, read_manifest, verify_files,
)
from edgecraft.runtime.engine import Engine
from edgecraft.runtime.sampling import SamplingParams
from edgecraft.runtime.text import TextStream

BACKENDS = ("onnxruntime", "tinygrad")


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
    for s in stops:  # text never holds a lone surrogate, so such a stop string could never match
        if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
            raise ValueError(_not_text(s).replace("the prompt", f"the stop string {s!r}"))
    return SamplingParams(temperature, top_k, top_p, repetition_penalty), stops


def _not_text(text: str) -> str:
    """Why `text` is not UTF-8: bytes that were not (argv and stdin carry them as surrogate
    escapes, U+DC80..U+DCFF) or a lone surrogate."""
    i = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
    if i is None:
        return "the prompt is not text the tokenizer can read; give it as UTF-8"
    code = ord(text[i])
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    return f"the prompt is not UTF-8 text ({what} at character {i}); give it as UTF-8"


class Model:
    """Generation, streaming, batches and scoring over one engine. Build it with `load()` (a
    bundle) or `edgecraft.torch_engine.load_run_model` (a run directory)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, manifest: Manifest | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.block_size: int = engine.block_size
        self.vocab_size: int = engine.vocab_size
        newline = tokenizer.encode("\n", add_special_tokens=False).ids
        self.start_id = newline[0] if len(newline) == 1 else 0

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the start token for an empty text (see the module docstring).
        ValueError for anything but a str (bytes that are not text, say)."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be text (str), got {type(text).__name__}")
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids or [self.start_id]
        except TypeError:  # tokenizers' answer to a str it cannot pass on as UTF-8
            raise ValueError(_not_text(text)) from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def sequence(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | str | None = None,
        seed: int | None = None,
        stream: bool = True,
    ) -> Sequence:
        """One generation's state, options checked (ValueError naming the option): what the
        server schedules into a shared `Batch`. With `stream`, each step's text is `seq.piece`."""
        params, stops = _options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop)
        if isinstance(prompt, (str, bytes, bytearray)):  # bytes: encode's ValueError, not token ids
            ids = self.encode(prompt)
        else:
            ids = list(prompt) or [self.start_id]
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        text = TextStream(self.tokenizer, stops) if stream or stops else None
        return Sequence(ids, params, max_new_tokens, self.vocab_size, seed, text)

    # ---------------------------------------------------------------- public API

    def generate(self, prompt: str | list[int], max_new_tokens: int = 200, **options: Any) -> str:
        """The continuation of `prompt` (without the prompt), ending before the first stop string.
        `options` are `sequence()`'s: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stop, seed."""
        seq = self.sequence(prompt, max_new_tokens, **options, stream=False)
        batch = Batch(self.engine, 1)
        batch.join([seq])
        while batch.active:
            batch.step()
        return self._text(seq)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 200, **options: Any) -> Iterator[str]:
        """Like generate(), as text pieces while they are produced; the pieces join to generate()'s
        text. A piece never holds a broken character nor text that may turn out to start a stop
        string. Options are checked now; tokens are generated as the iterator is read."""
        return self._pieces(self.sequence(prompt, max_new_tokens, **options))

    def _pieces(self, seq: Sequence) -> Iterator[str]:
        batch = Batch(self.engine, 1)
        batch.join([seq])
        if seq.piece:
            yield seq.piece
        while batch.active:
            batch.step()
            if seq.piece:
                yield seq.piece

    def _text(self, seq: Sequence) -> str:
        return self.decode(seq.generated) if seq.text is None else "".join(seq.pieces)

    def generate_batch(self, prompts: list[str], max_new_tokens: int = 200, **options: Any) -> list[str]:
        """generate() for many prompts in one batched decode loop; each row has its own RNG from
        `seed`, so every row's text equals generate() of its prompt alone."""
        if not prompts:
            return []
        seqs = [self.sequence(p, max_new_tokens, **options, stream=False) for p in prompts]
        for seq in seqs:  # one options object: the batch samples rows that share it together
            seq.params = seqs[0].params
        batch = Batch(self.engine, len(seqs))
        batch.join(seqs)
        while batch.active:
            batch.step()
        return [self._text(seq) for seq in seqs]

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


def load(
    path: str | Path,
    int8: bool = False,
    threads: int = 0,
    device: str = "cpu",
    verify: bool = True,
    backend: str = "onnxruntime",
    quant: str | None = None,
) -> Model:
    """Open bundle `path`: check its format and (with verify) every file's sha256, then build the
    engine. quant "fp32" / "int8" / "int4" picks model.onnx / model.int8.onnx / model.int4.onnx
    (int8=True is quant="int8"; neither: fp32, or what the bundle holds); threads 0 uses the
    bundle's recommended count; backend "tinygrad" runs the same graph's weights on tinygrad (the
    `tinygrad` extra), `device` then naming a tinygrad device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    onnx_path = model_file(path, manifest, int8, quant)
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"{path / TOKENIZER}: damaged tokenizer ({err})") from None
    if tokenizer.get_vocab_size() > manifest.config.vocab_size:
        raise BundleError(
            f"{path / TOKENIZER}: {tokenizer.get_vocab_size()} tokens but the model has "
            f"{manifest.config.vocab_size}; re-export the run"
        )
    if backend == "tinygrad":
        from edgecraft.runtime.tinygrad.engine import TinygradEngine

        engine: Engine = TinygradEngine(onnx_path, manifest.config, device=device)
    else:
        from edgecraft.runtime.onnx_engine import OnnxEngine

        single = path / INT8_SINGLE_ROW_MODEL  # the int8 bundle's graph for one-row decode steps
        engine = OnnxEngine(
            onnx_path, manifest.config, threads=threads or manifest.runtime.threads, device=device,
            single_row_path=single if onnx_path.name == INT8_MODEL and single.name in manifest.files else None,
        )
    return Model(engine, tokenizer, manifest)
