"""`edgecraft serve` under load: streaming clients on loopback against one server process.

    python benchmarks/serve_load.py BUNDLE [--levels 1,4,16,64] [--rounds 3] [--tokens 200]

One server (`edgecraft serve BUNDLE --threads 1`, default slots and queue) and, in this process,
one asyncio client per concurrency level: C connections, each streaming completions of --tokens
tokens back to back (temperature 0.8, a seed each). Per level: aggregate tokens/s (completion
tokens over the level's wall time), time to first token and per-token latency p50/p95, failed
requests (a status other than 200, or a stream without all its tokens and [DONE]), and the
server's peak RSS at the end. In the same run, rows interleaved round by round: the same
completions through `runtime.generate` in this process (what one stream is compared with), and
the bare engine's batch-16 decode (engine.decode alone: no sampling, text or HTTP), what 16
streams are compared with. The client is raw asyncio HTTP/1.1 (no client library) to leave the
2 cores to the server.

Per-token latency: the gap between a stream's consecutive chunks divided by the tokens the later
chunk carries (a character model: one token per character; a server that fell behind sends
several tokens in one chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import harness

PROMPTS = [
    "The module provides",
    "def main():\n    ",
    "Return a new list of ",
    "If the argument is",
    "class Queue:\n",
    "This function raises",
    "import os\n",
    "Changed in version 3.",
]
TARGETS = (
    "one stream >= 80% of runtime.generate; 16 streams >= 70% of the bare engine's batch-16 decode; "
    "TTFT p95 at 16 < 50 ms; no failures at 64"
)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Client:
    """One keep-alive connection streaming completions; records what each request saw."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def __aenter__(self) -> "Client":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()

    async def complete(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        self.writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        start = time.perf_counter()
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:  # an error body
            await self.reader.readexactly(int(headers["content-length"]))
            return {"ok": False, "status": status}
        arrivals: list[tuple[float, int]] = []  # (time, tokens) per chunk with text
        tokens, done, buffer = None, False, b""
        while True:  # chunked transfer encoding; each chunk holds one or more SSE events
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                await self.reader.readline()
                break
            chunk = (await self.reader.readexactly(size + 2))[:-2]
            now = time.perf_counter()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                payload = event[len(b"data: "):]
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                for choice in obj["choices"]:
                    if choice["text"]:
                        arrivals.append((now, len(choice["text"])))
        ok = status == 200 and done and tokens == body["max_tokens"]
        return {"ok": ok, "status": status, "start": start, "arrivals": arrivals, "tokens": tokens or 0}


async def level(host: str, port: int, concurrency: int, requests_each: int, tokens: int) -> dict:
    """`concurrency` connections, each `requests_each` streamed completions back to back."""
    async def one(c: int) -> list[dict]:
        out = []
        async with Client(host, port) as client:
            for r in range(requests_each):
                body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8,
                        "seed": c * 1000 + r, "stream": True, "stream_options": {"include_usage": True}}
                try:
                    out.append(await client.complete(body))
                except (OSError, ValueError, asyncio.IncompleteReadError) as err:
                    out.append({"ok": False, "status": repr(err)})
                    return out
        return out

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(one(c) for c in range(concurrency))) for r in rs]
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    ttft = [r["arrivals"][0][0] - r["start"] for r in good if r["arrivals"]]
    per_token = []
    for r in good:
        for (t0, _), (t1, n) in zip(r["arrivals"], r["arrivals"][1:]):
            per_token += [(t1 - t0) / n] * n
    tokens = sum(r["tokens"] for r in good)
    return {
        "tokens_per_s": tokens / wall, "tokens": tokens, "ttft": ttft, "per_token": per_token,
        "failed": len(results) - len(good), "requests": len(results),
    }


def start_server(bundle: Path, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecraft", "serve", str(bundle), "--port", "0", "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"http://([\d.]+):(\d+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1), int(match.group(2))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--levels", type=harness.int_list, default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra `edgecraft serve` flags, e.g. '--slots 32'")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "serve_load")
    args = parser.parse_args()

    from edgecraft.runtime import load

    info = harness.RunInfo("edgecraft serve under load", extra=f"  \nBundle: {args.bundle}; targets: {TARGETS}")
    model = load(args.bundle, threads=1)
    proc, host, port = start_server(args.bundle, args.server_args.split())
    requests_each = {c: max(2, 48 // c) for c in args.levels}  # ~10-50 requests per level

    def generate() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(4):  # no stop strings: every completion has all its tokens
            model.generate(PROMPTS[i], max_new_tokens=args.tokens, temperature=0.8, seed=i)
        n = 4 * args.tokens
        return {"tokens_per_s": n / (time.perf_counter() - start), "cpu_per_token": (time.process_time() - cpu) / n}

    def engine_b16() -> float:
        engine = model.engine
        engine.reset(16)
        prompts = [model.encode(PROMPTS[i % len(PROMPTS)]) for i in range(16)]
        ids = np.zeros((16, max(map(len, prompts))), dtype=np.int64)  # (16, S) right-padded
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        engine.prefill(ids, np.array([len(p) for p in prompts]))
        step = np.zeros(16, dtype=np.int64)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.tokens):
            step[:] = engine.decode(step).argmax(axis=-1)
        n = 16 * args.tokens
        return {"tokens_per_s": n / (time.perf_counter() - start), "cpu_per_token": (time.process_time() - cpu) / n}

    def serve(c: int) -> dict:
        server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
        out = asyncio.run(level(host, port, c, requests_each[c], args.tokens))
        tokens = out.pop("tokens")
        out["cpu_per_token"] = (cpu_seconds(proc.pid) - server_cpu) / max(tokens, 1)
        out["client_cpu_per_token"] = (time.process_time() - client_cpu) / max(tokens, 1)
        return out

    rows = {"runtime.generate": generate, "engine batch 16": engine_b16}
    for c in args.levels:
        rows[f"serve c={c}"] = lambda c=c: serve(c)
    try:
        results = harness.interleave(rows, args.rounds)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    write_report(args, info, results, rss)


def write_report(args, info, results: dict, rss: float) -> None:
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    gen, b16 = results["runtime.generate"], results["engine batch 16"]
    gen_tps, b16_tps = med(gen, "tokens_per_s"), med(b16, "tokens_per_s")
    gen_cpu, b16_cpu = med(gen, "cpu_per_token"), med(b16, "cpu_per_token")
    us = lambda v: f"{v * 1e6:.0f} µs"  # noqa: E731
    ms = lambda v: f"{v * 1000:.2f} ms"  # noqa: E731
    lines = [
        f"In-process references, interleaved with the server rows (median of {args.rounds} rounds): "
        f"`runtime.generate` {gen_tps:,.0f} tokens/s ({us(gen_cpu)} CPU per token); bare engine batch-16 "
        f"decode {b16_tps:,.0f} tokens/s ({us(b16_cpu)} CPU per token). Server peak RSS {rss:.0f} MB.",
        "",
        "Wall-clock figures depend on what else the machine runs; CPU per token (the server process's "
        "user + system time over the tokens it streamed, all its threads) does much less, so the "
        "last columns compare the server's CPU with the reference's: the share of the server's CPU "
        "that the decoding itself needs.",
        "",
        "| streams | requests | failed | tokens/s | vs reference | TTFT p50 | TTFT p95 | per-token p50 | per-token p95 "
        "| server CPU/token | reference CPU / server CPU | client CPU/token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    data = {"runtime_generate": gen, "engine_b16": b16, "server_peak_rss_mb": rss, "levels": {}}
    for name, runs in results.items():
        if not name.startswith("serve"):
            continue
        c = int(name.split("=")[1])
        tps, cpu = med(runs, "tokens_per_s"), med(runs, "cpu_per_token")
        ttft = [x for r in runs for x in r["ttft"]]
        per_token = [x for r in runs for x in r["per_token"]]
        failed, requests = sum(r["failed"] for r in runs), sum(r["requests"] for r in runs)
        references = {1: (gen_tps, gen_cpu, "generate"), 16: (b16_tps, b16_cpu, "engine b16")}
        ref_tps, ref_cpu, ref = references.get(c, (0, 0, ""))
        lines.append(
            f"| {c} | {requests} | {failed} | {tps:,.0f} | {f'{tps / ref_tps:.0%} of {ref}' if ref else ''} "
            f"| {ms(percentile(ttft, 50))} | {ms(percentile(ttft, 95))} | {ms(percentile(per_token, 50))} "
            f"| {ms(percentile(per_token, 95))} | {us(cpu)} | {f'{ref_cpu / cpu:.0%}' if ref else ''} "
            f"| {us(med(runs, 'client_cpu_per_token'))} |"
        )
        data["levels"][c] = {
            "tokens_per_s": [r["tokens_per_s"] for r in runs], "cpu_per_token": [r["cpu_per_token"] for r in runs],
            "failed": failed, "requests": requests, "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "per_token_p50": percentile(per_token, 50), "per_token_p95": percentile(per_token, 95),
        }
    body = "\n".join(lines)
    print(body)
    info.write(args.out, body + "\n", data)


if __name__ == "__main__":
    main()
