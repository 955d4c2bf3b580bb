"""The request bodies of /v1/completions and /v1/chat/completions, and the OpenAI error shape.

Bodies are parsed strictly from JSON (no "5" for 5, no NaN): a wrong type or value is a 400 that
names the field, as the OpenAI API does, never a 500. Fields the OpenAI API has but a tiny local
model cannot honour (penalties, logit_bias, suffix) are accepted only at their neutral values, so
a client is told instead of silently getting something else. top_k and repetition_penalty are
extensions, as in llama.cpp's server.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_LOGPROBS = 20  # top-N alternatives per token: OpenAI allows 5 (completions) and 20 (chat)


class APIError(Exception):
    """An error returned to the client in the OpenAI shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


def _unsupported(why: str):
    """A field validator for an OpenAI field whose feature edgecraft lacks: only its neutral value
    (absent, 0, empty) passes, anything else is a 400 naming the field."""

    def check(cls, value):
        if value:
            raise ValueError(f"not supported ({why})")
        return value

    return check


class _Options(BaseModel):
    """What both endpoints share: sampling, stopping, streaming."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    _neutral_penalty = field_validator("frequency_penalty", "presence_penalty")(
        _unsupported("only 0; use repetition_penalty instead"))
    _no_bias = field_validator("logit_bias")(_unsupported("only empty"))

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("at most 16 non-empty stop strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Options):
    """POST /v1/completions. A prompt is a string, a list of strings, a list of token ids or a list
    of such lists; each prompt gets `n` choices."""

    prompt: Union[str, list[str], list[int], list[list[int]]] = ""
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    _no_suffix = field_validator("suffix")(_unsupported("insertion needs a fill-in-the-middle model"))

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise APIError(400, "prompt: an empty list", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Options):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


_UNION_TAGS = {"str", "int", "list[str]", "list[int]", "list[list[int]]", "list[ContentPart]"}


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; APIError 400 naming the first bad field (or the JSON itself)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        # drop pydantic's union-member tags ("prompt.str") so the path reads as the client wrote it
        loc = [part for part in first["loc"] if not (isinstance(part, str) and part in _UNION_TAGS)]
        where = ".".join(str(part) for part in loc)
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({first['msg']})") from None
        if first["type"] == "model_type" or not where:
            raise APIError(400, "the body must be a JSON object") from None
        value = first.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        raise APIError(400, f"{where}: {first['msg']} (got {shown[:80]})", param=where.split(".")[0]) from None
