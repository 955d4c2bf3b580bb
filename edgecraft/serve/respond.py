"""Scheduler events -> OpenAI response bodies and server-sent-event chunks.

A `Choice` collects what its job produced; `Reply` knows the endpoint's shapes (text completion or
chat completion) and turns a round of events into at most one chunk per choice, so a reader that
fell behind sends one chunk for several tokens instead of one each.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from edgecraft.serve.scheduler import Alternatives, Event

Score = tuple[str, "float | None", "Alternatives | None"]  # token text, log-probability, top-N


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    counts_prompt: bool = True  # n > 1: a prompt's tokens are counted once, on its first choice
    echo: str = ""  # the prompt's text, when echoed
    scores: list[Score] = field(default_factory=list)  # the echoed prompt's, then each token's
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    # how much of the above the stream has sent
    sent_pieces: int = 0
    sent_scores: int = 0
    offset: int = 0  # characters sent (text_offset of the next token)

    def add(self, event: Event) -> None:
        if event.prompt is not None:
            self.scores[:0] = event.prompt
        self.pieces.append(event.piece)
        if event.token is not None:
            self.tokens += 1
            if event.logprob is not None:
                self.scores.append((event.text, event.logprob, event.top))
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        elif event.error is not None:  # refused after others of its request started (shutting down)
            self.finish_reason = "abort"


_encode_str = json.encoder.encode_basestring  # a str as a JSON string, non-ASCII kept: what dumps() writes


def dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sse(body: dict) -> bytes:
    return b"data: " + dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Reply:
    """One request's id, shapes and choices; `endpoint` is "completions" or "chat"."""

    def __init__(
        self, endpoint: str, model: str, choices: list[Choice], logprobs: bool,
        template: str | None = None, include_usage: bool = False,
    ) -> None:
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.choices = choices
        self.logprobs = logprobs
        self.template = template  # chat: the template that rendered the messages (an extension field)
        self.include_usage = include_usage
        self.opened = False
        self._chunk_head: bytes | None = None

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def take(self, events: list[Event]) -> list[int]:
        """Fold a round of events into the choices; the indices that changed, in order."""
        changed: list[int] = []
        for event in events:
            self.choices[event.index].add(event)
            if event.index not in changed:
                changed.append(event.index)
        return changed

    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices if c.counts_prompt)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, obj: str) -> dict:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.template is not None:
            head["chat_template"] = self.template
        return head

    # ------------------------------------------------------------------ whole responses

    def body(self) -> dict:
        body = self._head(self.object)
        body["choices"] = [self._final(c) for c in self.choices]
        body["usage"] = self.usage()
        return body

    def _final(self, c: Choice) -> dict:
        text = "".join(c.pieces)
        if self.chat:
            return {
                "index": c.index, "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(c.scores) if self.logprobs else None, "finish_reason": c.finish_reason,
            }
        return {
            "text": c.echo + text, "index": c.index,
            "logprobs": _completion_logprobs(c.scores, 0) if self.logprobs else None, "finish_reason": c.finish_reason,
        }

    # ------------------------------------------------------------------ streams

    def chunks(self, changed: list[int]) -> bytes:
        """SSE bytes for the choices that changed in the last round; after the last, usage (when
        asked for) and [DONE]."""
        out = []
        if not self.opened and self.chat:  # OpenAI's streams open each choice with the role
            out += [self._chunk(c, {"role": "assistant", "content": ""}, [], None) for c in self.choices]
        self.opened = True
        for i in changed:
            c = self.choices[i]
            text = "".join(c.pieces[c.sent_pieces :])
            if c.sent_pieces == 0 and c.echo:
                text = c.echo + text
            scores = c.scores[c.sent_scores :]
            c.sent_pieces, c.sent_scores = len(c.pieces), len(c.scores)
            if text or scores or c.finish_reason is not None:
                content = ({"content": text} if text else {}) if self.chat else text
                # the stream's last chunk counts the tokens too (as llama.cpp's does), unless a
                # usage chunk of OpenAI's shape follows
                usage = self.usage() if self.done and i == changed[-1] and not self.include_usage else None
                out.append(self._chunk(c, content, scores, c.finish_reason, usage))
            c.offset += len(text)
        if self.done:
            if self.include_usage:
                tail = self._head(self.chunk_object)
                tail["choices"] = []
                tail["usage"] = self.usage()
                out.append(sse(tail))
            out.append(DONE)
        return b"".join(out)

    def _chunk(
        self, c: Choice, content, scores: list[Score], finish_reason: str | None, usage: dict | None = None
    ) -> bytes:
        if self._chunk_head is None:  # the part every chunk repeats, serialised once
            self._chunk_head = b"data: " + dumps(self._head(self.chunk_object))[:-1] + b',"choices":['
        if not self.chat and not self.logprobs and finish_reason is None:  # most chunks: text only
            text = _encode_str(content).encode()
            tail = b',"index":%d,"logprobs":null,"finish_reason":null}]}\n\n' % c.index
            return self._chunk_head + b'{"text":' + text + tail
        if self.chat:
            logprobs = _chat_logprobs(scores) if self.logprobs and scores else None
            choice = {"index": c.index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            logprobs = _completion_logprobs(scores, c.offset) if self.logprobs else None
            choice = {"text": content, "index": c.index, "logprobs": logprobs, "finish_reason": finish_reason}
        tail = b',"usage":' + dumps(usage) + b"}\n\n" if usage else b"}\n\n"
        return self._chunk_head + dumps(choice) + b"]" + tail


def _completion_logprobs(scores: list[Score], offset: int) -> dict:
    """The completions shape: parallel lists; text_offset counts characters into the choice's text."""
    offsets = []
    for text, _, _ in scores:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [text for text, _, _ in scores],
        "token_logprobs": [lp for _, lp, _ in scores],
        "top_logprobs": [None if top is None else dict(top) for _, _, top in scores],
        "text_offset": offsets,
    }


def _chat_logprobs(scores: list[Score]) -> dict:
    def entry(text: str, lp: float | None) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top or []]} for t, lp, top in scores]}
