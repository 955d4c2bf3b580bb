"""Turning a growing list of token ids into text pieces that are safe to show as they arrive.

Two problems, one class each:
- a character can span several byte-level BPE tokens ("中" is three bytes, often three tokens), so
  decoding token by token would print broken characters (U+FFFD); `IncrementalDecoder` emits text
  only once it no longer ends in an incomplete character;
- a stop string can arrive split over several pieces, so `StopFilter` holds back any tail that
  could still become one, and cuts the text just before the first stop string found.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Token ids in, complete text pieces out; the pieces join to `tokenizer.decode(all ids)`.

    It decodes a short window of recent ids (not the whole list) and emits the new suffix once the
    window's text grew and does not end in U+FFFD (an incomplete multi-byte character). The window
    starts one emitted chunk back so tokenizers whose decoding depends on the previous token (a
    leading space, a byte sequence) see that context.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this index have been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as in decode())."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class StopFilter:
    """Text pieces in, text pieces out, ending just before the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""  # a tail that is a prefix of some stop string: not safe to emit yet
        self.stopped = False

    def push(self, piece: str) -> str:
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[: min(hits)]
        keep = self._possible_stop_start(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        held, self.held = self.held, ""
        return held

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Token ids in, showable text out, ending before the first stop string: the two above, chained."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stopper = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        return self.stopper.stopped

    def push(self, token: int) -> str:
        return self.stopper.push(self.decoder.push(token))

    def finish(self) -> str:
        """The rest, once generation ended without a stop string (or with one inside the rest)."""
        tail = self.stopper.push(self.decoder.finish())
        return tail if self.stopper.stopped else tail + self.stopper.finish()
