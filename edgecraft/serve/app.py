"""The HTTP side: OpenAI-shaped routes over the scheduler, the API key, errors, health and metrics.

Every failure a client can cause is an `APIError` in the OpenAI shape with a 4xx status (or 503
while loading, busy or shutting down): the handlers below turn FastAPI's own errors (unknown
route, wrong method) into that shape too, so a client library always gets an error it can read.
Bodies are read and validated here (size limit, strict JSON) before anything is queued.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from edgecraft.runtime import Model
from edgecraft.serve.chat import ChatTemplate
from edgecraft.serve.metrics import Metrics
from edgecraft.serve.respond import Choice, Reply
from edgecraft.serve.scheduler import Event, Job, Scheduler, Sink
from edgecraft.serve.schemas import APIError, ChatRequest, CompletionRequest, parse

MAX_BODY = 1 << 20  # bytes; a prompt is at most the model's context, so 1 MiB is generous
COMPLETION_MAX_TOKENS = 16  # the OpenAI default when a completion request names none
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


@dataclass
class Settings:
    name: str  # the model id clients send
    slots: int
    max_queue: int
    max_tokens_limit: int
    api_key: str | None
    template: ChatTemplate
    load: Callable[[], Model]  # runs in a worker thread while /health says 503
    bundle: Path | None = None  # served under /bundle/ (the page of `export --web` at /bundle/web/)


@dataclass
class State:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    model: Model | None = None
    scheduler: Scheduler | None = None
    load_error: BaseException | None = None
    params: dict = field(default_factory=dict)  # SamplingParams -> one shared instance (sampled together)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(settings: Settings, on_ready: Callable[[State], None] = lambda s: None) -> FastAPI:
    """The ASGI app; the model loads in the background after start-up, then `on_ready(state)`."""
    state = State(settings)

    async def load() -> None:
        try:
            state.model = await asyncio.to_thread(settings.load)
        except BaseException as err:  # reported by on_ready, which stops the server
            state.load_error = err
        else:
            state.scheduler = Scheduler(
                state.model, settings.slots, settings.max_queue, state.metrics, asyncio.get_running_loop()
            )
            state.scheduler.thread.start()
        on_ready(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="edgecraft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edgecraft = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(APIError(err.status_code, message, kind=kind))

    def check_key(request: Request) -> None:
        key = settings.api_key
        if key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")

    def ready(request: Request) -> Scheduler:
        """The key check, then the scheduler (503 while the model loads)."""
        check_key(request)
        if state.scheduler is None:
            raise APIError(503, "the model is loading", kind="server_error", headers={"Retry-After": "1"})
        return state.scheduler

    @app.get("/bundle/{name:path}")
    async def bundle_file(name: str, request: Request) -> Response:
        """The bundle's files, for the page `export --web` wrote (web/index.html loads the bundle
        from its parent folder). Behind the API key like every route but /health; the
        cross-origin isolation headers let the page use WebAssembly threads."""
        check_key(request)
        root = settings.bundle.resolve() if settings.bundle is not None else None
        path = (root / name).resolve() if root is not None else None
        if path is not None and path.is_dir():
            path = path / "index.html"
        if path is None or root not in path.parents or not path.is_file():
            raise APIError(404, f"GET /bundle/{name}: no such file in the bundle", kind="not_found_error")
        return FileResponse(path, headers=ISOLATION_HEADERS)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        ready(request)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        ready(request)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        ready(request)
        if model_id != settings.name:
            raise APIError(404, f"model {model_id!r} does not exist; this server has {settings.name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(state))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        scheduler = ready(request)
        req = parse(CompletionRequest, await _body(request))
        model = state.model
        _check_model(req.model, settings.name)
        max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 needs echo (score the prompt only)", param="max_tokens")
        if req.best_of not in (None, req.n or 1):
            raise APIError(400, "best_of: only equal to n is supported", param="best_of")
        sink, choices, jobs = Sink(), [], []
        for prompt in req.prompts():
            for j in range(req.n or 1):
                seq = _sequence(state, prompt, max(1, max_tokens), req, j)
                choices.append(Choice(len(choices), seq.prompt_length, counts_prompt=j == 0,
                                      echo=_prompt_text(model, prompt) if req.echo else ""))
                jobs.append(Job(len(jobs), seq, sink, logprobs=req.logprobs,
                                score_prompt=bool(req.echo) and req.logprobs is not None, generate=max_tokens > 0))
        reply = Reply("completions", settings.name, choices, logprobs=req.logprobs is not None,
                      include_usage=req.include_usage)
        return await _run(state, scheduler, "completions", jobs, sink, reply, bool(req.stream), request.receive)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        scheduler = ready(request)
        req = parse(ChatRequest, await _body(request))
        _check_model(req.model, settings.name)
        template = settings.template
        prompt = template.render([(m.role, m.text) for m in req.messages])
        max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens_limit
        top = (req.top_logprobs or 0) if req.logprobs else None
        sink, choices, jobs = Sink(), [], []
        for j in range(req.n or 1):
            seq = _sequence(state, prompt, max_tokens, req, j, extra_stops=list(template.stop), keep_tail=True)
            choices.append(Choice(j, seq.prompt_length, counts_prompt=j == 0))
            jobs.append(Job(j, seq, sink, logprobs=top))
        reply = Reply("chat", settings.name, choices, logprobs=top is not None, template=template.name,
                      include_usage=req.include_usage)
        return await _run(state, scheduler, "chat", jobs, sink, reply, bool(req.stream), request.receive)

    return app


def _model_card(state: State) -> dict[str, Any]:
    model = state.model
    return {
        "id": state.settings.name, "object": "model", "created": int(time.time()), "owned_by": "edgecraft",
        "context_length": model.block_size, "max_model_len": model.block_size,  # llama.cpp's and vLLM's names
        "vocab_size": model.vocab_size,
    }


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"model {name!r} does not exist; this server has {served!r}", param="model",
                       code="model_not_found")


async def _body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"the body is {declared} bytes; the limit is {MAX_BODY}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the body is over the {MAX_BODY}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _prompt_text(model: Model, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else model.decode(prompt)


def _sequence(state: State, prompt, max_tokens: int, req, choice: int, extra_stops: list[str] | None = None,
              keep_tail: bool = False):
    """A sequence for one choice: options checked (400 naming the option), limits applied; choice
    j of a seeded request gets seed + j, so n > 1 gives n different texts, each reproducible.
    A completion prompt longer than the context is refused (evaluation tools must not score a
    silently shortened text); a chat (keep_tail) keeps its newest context-length tokens."""
    settings, model = state.settings, state.model
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens")
    if isinstance(prompt, list) and any(not 0 <= t < model.vocab_size for t in prompt):
        raise APIError(400, f"prompt: token ids must be in 0..{model.vocab_size - 1}", param="prompt")
    try:
        seq = model.sequence(
            prompt, max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty or 1.0,
            stop=(req.stop or []) + (extra_stops or []), seed=None if req.seed is None else req.seed + choice,
        )
    except ValueError as err:
        raise APIError(400, str(err)) from None
    if seq.prompt_length > model.block_size and not keep_tail:
        raise APIError(400, f"prompt: {seq.prompt_length} tokens; the model's context is {model.block_size}",
                       param="prompt", code="context_length_exceeded")
    if len(state.params) > 1024:  # bounded, whatever options clients send
        state.params.clear()
    seq.params = state.params.setdefault(seq.params, seq.params)  # equal options share one object: sampled together
    return seq


async def _run(state: State, scheduler: Scheduler, endpoint: str, jobs: list[Job], sink: Sink, reply: Reply,
               stream: bool, receive) -> Response:
    """Queue the jobs and answer: the whole body, or an SSE stream once the first tokens are in
    (so a request refused while it waited still gets its status code). A client that goes away,
    waiting or not, cancels its jobs: they leave the batch before the next decode step."""
    settings = state.settings
    if len(jobs) > settings.slots + settings.max_queue:  # would never fit: not worth a retry
        raise APIError(400, f"n x prompts = {len(jobs)} sequences; this server holds {settings.slots} running "
                       f"and {settings.max_queue} waiting", param="n")
    scheduler.submit(jobs)
    watcher = asyncio.create_task(_disconnect(receive, sink))
    try:
        events = await _events(sink, watcher)
        for event in events:
            if event.error is not None:
                state.metrics.requests.labels(endpoint, str(event.error.status)).inc()
                return error_response(event.error)
        changed = reply.take(events)
        if stream:
            response, watcher = EventStream(state, scheduler, endpoint, jobs, sink, reply, changed, watcher), None
            return response
        while not reply.done:
            reply.take(await _events(sink, watcher))
        state.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(reply.body())
    except ClientGone:
        state.metrics.requests.labels(endpoint, "499").inc()  # nginx's code for "the client closed the connection"
        return Response(status_code=499)
    finally:
        if watcher is not None:  # the stream, when there is one, owns it now
            watcher.cancel()
            if not reply.done:
                scheduler.cancel(jobs)


async def _disconnect(receive, sink: Sink) -> None:
    """Returns when the client closes the connection (the body was read already, so the next
    message is the disconnect), waking whoever waits on `sink`."""
    while (await receive())["type"] != "http.disconnect":
        pass
    sink.put([Event(-1)])


async def _events(sink: Sink, watcher: asyncio.Task) -> list[Event]:
    """The next round of a request's events; ClientGone once its client has left."""
    events = [e for e in await sink.get() if e.index >= 0]
    if watcher.done():
        raise ClientGone()
    return events


class ClientGone(Exception):
    """The client closed the connection; nobody is left to answer."""


class EventStream(Response):
    """Server-sent events from a request's sink."""

    def __init__(self, state: State, scheduler: Scheduler, endpoint: str, jobs: list[Job], sink: Sink,
                 reply: Reply, changed: list[int], watcher: asyncio.Task) -> None:
        # not Response.__init__: it would declare a Content-Length for an empty body
        self.status_code, self.background = 200, None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies such as nginx must pass each event on at once
        ]
        self.state, self.scheduler, self.endpoint = state, scheduler, endpoint
        self.jobs, self.sink, self.reply, self.changed, self.watcher = jobs, sink, reply, changed, watcher

    async def __call__(self, scope, receive, send) -> None:
        reply = self.reply
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            changed = self.changed
            while True:
                await send({"type": "http.response.body", "body": reply.chunks(changed), "more_body": not reply.done})
                if reply.done:
                    break
                changed = reply.take(await _events(self.sink, self.watcher))
        except ClientGone:
            pass
        finally:
            self.watcher.cancel()
            if not reply.done:
                self.scheduler.cancel(self.jobs)
        status = "200" if reply.done else "499"  # 499: the client closed the connection (nginx's code)
        self.state.metrics.requests.labels(self.endpoint, status).inc()
