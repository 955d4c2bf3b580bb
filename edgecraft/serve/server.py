"""`edgecraft serve`: bind, start uvicorn, load the model in the background, stop cleanly on SIGTERM.

The socket is bound here before anything else, so a busy port is one clear error line and
`--port 0` picks a free port (the printed URL says which). The model loads after the server
listens, so a load balancer sees /health 503 until it is ready. SIGTERM (or Ctrl-C) stops
admitting, lets in-flight requests finish for a couple of seconds, ends the rest cleanly, and the
process exits 0 without a traceback.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from edgecraft.errors import UserError
from edgecraft.runtime import load
from edgecraft.serve.app import Settings, State, create_app
from edgecraft.serve.chat import ChatTemplate
from edgecraft.serve.scheduler import DRAIN_SECONDS


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    quant: str | None = None  # "int8" | "int4" | None (fp32, or what the bundle holds)
    threads: int = 0
    slots: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 1024
    api_key: str | None = None


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the scheduler first and exiting 0 afterwards (uvicorn
    re-raises the signal once it has shut down, which would end the process with the signal's status)."""

    state: State | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.state is not None and self.state.scheduler is not None:
            self.state.scheduler.drain()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(bundle: Path, name: str, template: ChatTemplate, options: ServeOptions) -> None:
    """Run the server until SIGTERM/SIGINT; UserError for a port that cannot be bound or a model
    that fails to load."""
    try:
        sock = socket.create_server((options.host, options.port), family=_family(options.host), reuse_port=False)
    except OSError as err:
        raise UserError(f"cannot listen on {options.host}:{options.port} ({err.strerror or err})") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def on_ready(state: State) -> None:
        if state.load_error is not None:
            server.should_exit = True
            return
        print(f"serving {name} at {url}/v1 (slots {options.slots}, context {state.model.block_size})", flush=True)

    settings = Settings(
        name=name, slots=options.slots, max_queue=options.max_queue, max_tokens_limit=options.max_tokens_limit,
        api_key=options.api_key, template=template, bundle=bundle,
        load=lambda: load(bundle, quant=options.quant, threads=options.threads),
    )
    app = create_app(settings, on_ready)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(DRAIN_SECONDS) + 3,
        timeout_keep_alive=30, lifespan="on",
    )
    server = _Server(config)
    server.state = app.state.edgecraft
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    print(f"loading {bundle} ...", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    error = server.state.load_error
    if error is not None:
        raise UserError(str(error)) from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
