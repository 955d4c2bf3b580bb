"""Starting a real `edgecraft serve` on a free loopback port, and reading its SSE streams."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class Server:
    """`python -m edgecraft serve BUNDLE --port 0 ARGS...` until stop(); `url` is its /v1 root."""

    def __init__(self, bundle: Path, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgecraft", "serve", str(bundle), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()  # "serving NAME at URL/v1 ..." once the model is loaded
        match = re.search(r"(http://\S+)/v1", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {''.join(self.stderr)}")
        self.root = match.group(1)
        self.url = self.root + "/v1"

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stream_events(client: httpx.Client, path: str, body: dict, headers: dict | None = None) -> list:
    """POST with stream=True; the parsed data events, and "[DONE]" as the last one if it came."""
    events = []
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> tuple[str, str | None]:
    """The text and finish_reason of choice 0 of a completions or chat stream."""
    text, finish = [], None
    for event in events[:-1]:
        for choice in event["choices"]:
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def wait_until(predicate, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
