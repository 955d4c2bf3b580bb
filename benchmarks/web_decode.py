"""Decode speed in the browser (onnxruntime-web, WebAssembly) beside the Python runtime, one run.

    python benchmarks/web_decode.py [--run runs/NAME | --bundle export/NAME] [--rounds 3] [--tokens 300]
                                    [--warmup 15] [--webgpu] [--out benchmarks/results/web_decode.md]

The model is the 1M-parameter character shape (recipes/char-1m) with random weights, exported
with --int8 and --web, or a trained run (--run) or a bundle exported with --int8 --web (--bundle).
Rows, interleaved round by round (harness.interleave), greedy, a 1-token prompt and --tokens new
tokens (past the context of 256: one sliding-window re-fill):

- browser: Debian's headless Chromium (Playwright), a fresh browser context per measurement
  (nothing cached: the 15 MB WebAssembly runtime is fetched and compiled each time), WebAssembly
  at 1 thread and at every core (threads need a cross-origin isolated page: this script's server
  sends the COOP/COEP headers), fp32 and int8. The first token's time since the navigation
  started (a cold page load: fetch, hash checks, compile, session, prompt, first token), the
  first generation's decode tokens/s, and the decode tokens/s after --warmup seconds of
  generating: V8 starts WebAssembly on baseline-compiled code and swaps in optimized code as its
  background compiler gets to it, which on a busy 2-core machine takes seconds;
- python: edgecraft.runtime.load(bundle, threads=N) in this process, the same tokens.

`--webgpu` adds WebGPU rows under SwiftShader (a CPU emulating a GPU: only the ratio between the
browser's WebGPU graphs and the bundle's own graphs on that provider means anything).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import harness

CHROMIUM = "/usr/lib/chromium/chromium"
SWIFTSHADER_WEBGPU = [
    "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader",
    "--use-vulkan=swiftshader", "--enable-features=Vulkan",
]
PROMPT = "\n"
# The measuring page, served at /bench.html beside the bundle: times are performance.now(), ms
# since the navigation started.
BENCH_PAGE = """<!doctype html><meta charset="utf-8">
<script>  // a failure ends the wait with its message (a module's top-level await reports to "error")
addEventListener("error", (e) => { window.result = { error: String(e.error?.stack ?? e.message) }; });
addEventListener("unhandledrejection", (e) => { window.result = { error: String(e.reason?.stack ?? e.reason) }; });
</script>
<script type="module">
import { load } from "/web/edgecraft.js";
const q = new URLSearchParams(location.search);
const model = await load("/", { backend: q.get("backend"), int8: q.get("model") === "int8", threads: Number(q.get("threads")) });
const options = { maxNewTokens: Number(q.get("tokens")), temperature: 0 };
const loadedMs = performance.now();
let firstMs = 0, text = "";
for await (const piece of model.stream(q.get("prompt"), options)) {
  if (!firstMs) firstMs = performance.now();
  text += piece;
}
const cold = model.stats.tokensPerSecond;
// V8 runs WebAssembly first as compiled by its baseline compiler and swaps in optimized code as
// it is compiled in the background: generate until then, and measure after
const warm = [];
while (performance.now() - firstMs < Number(q.get("warmup")) * 1000) await model.generate(q.get("prompt"), options);
for (let i = 0; i < 3; i++) {
  await model.generate(q.get("prompt"), options);
  warm.push(model.stats.tokensPerSecond);
}
window.result = { loadedMs, firstMs, cold, tokensPerSecond: warm.sort((a, b) => a - b)[1], text,
                  threads: model.threads, file: model.file, isolated: crossOriginIsolated };
</script>"""


class Handler(http.server.SimpleHTTPRequestHandler):
    """The bundle folder plus /bench.html, cross-origin isolated (WebAssembly threads need
    SharedArrayBuffer) and never cached."""

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_GET(self) -> None:
        if self.path.startswith("/bench.html"):
            body = BENCH_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/"


def make_bundle(args: argparse.Namespace, root: Path) -> Path:
    from edgecraft.export import ExportOptions, export_run
    from edgecraft.export.web import add_web

    if args.bundle:
        return args.bundle
    run = args.run or harness.random_run(root)
    bundle = export_run(run, root / "bundle", ExportOptions(int8=True))
    add_web(bundle)
    return bundle


def browser_row(browser, url: str, backend: str, model: str, threads: int, tokens: int, warmup: float) -> dict:
    context = browser.new_context()  # a cold page load: no HTTP cache, no compiled WebAssembly
    page = context.new_page()
    query = urllib.parse.urlencode(dict(backend=backend, model=model, threads=threads, tokens=tokens, prompt=PROMPT, warmup=warmup))
    page.goto(f"{url}bench.html?{query}")
    page.wait_for_function("window.result !== undefined", timeout=300_000)
    result = page.evaluate("window.result")
    context.close()
    if "error" in result:
        raise RuntimeError(f"{backend} {model} {threads} threads: {result['error']}")
    return result


def python_row(bundle: Path, int8: bool, threads: int, tokens: int) -> dict:
    from edgecraft.runtime import load

    model = load(bundle, int8=int8, threads=threads)
    t0 = time.perf_counter()
    pieces = model.stream(PROMPT, max_new_tokens=tokens, temperature=0)
    text = next(pieces)
    t1 = time.perf_counter()
    text += "".join(pieces)
    t2 = time.perf_counter()
    return {"tokensPerSecond": (tokens - 1) / (t2 - t1), "firstMs": (t1 - t0) * 1000, "text": text, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: char-1m's shape, random weights)")
    parser.add_argument("--bundle", type=Path, help="a bundle exported with --int8 --web")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of generating before the warm measurement")
    parser.add_argument("--webgpu", action="store_true", help="add WebGPU rows under SwiftShader")
    parser.add_argument("--out", type=Path, default=harness.REPO / "benchmarks/results/web_decode.md")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    info = harness.RunInfo("In-browser decode speed: onnxruntime-web in Chromium vs the Python runtime")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        bundle = make_bundle(args, Path(tmp))
        url = serve(bundle)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        rows = {}
        for model in ("fp32", "int8"):
            for threads in sorted({1, cores}):
                rows[f"browser wasm {model} {threads}t"] = functools.partial(
                    browser_row, browser, url, "wasm", model, threads, args.tokens, args.warmup)
                rows[f"python {model} {threads}t"] = functools.partial(
                    python_row, bundle, model == "int8", threads, args.tokens)
        if args.webgpu:
            gpu = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", *SWIFTSHADER_WEBGPU])
            bundle_graphs = webgpu_on_bundle_graphs(bundle, Path(tmp))
            plain_url = serve(bundle_graphs)
            for model in ("fp32", "int8"):
                rows[f"browser webgpu {model} (web graph)"] = functools.partial(
                    browser_row, gpu, url, "webgpu", model, 1, args.tokens, args.warmup)
                rows[f"browser webgpu {model} (bundle graph)"] = functools.partial(
                    browser_row, gpu, plain_url, "webgpu", model, 1, args.tokens, args.warmup)
        results = harness.interleave(rows, args.rounds, warmup=0)  # every browser row starts cold anyway
        browser.close()
    body = report(results, args)
    info.write(args.out.with_suffix(""), body, {"results": results})
    print(body)


def webgpu_on_bundle_graphs(bundle: Path, root: Path) -> Path:
    """A copy of `bundle` whose manifest sends WebGPU to the bundle's own graphs (Sum,
    DynamicQuantizeMatMul): the baseline the WebGPU graphs are measured against."""
    import shutil

    copy = root / "bundle-graphs"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "edgecraft.json").read_text())
    manifest["web"]["graphs"]["webgpu"] = dict(manifest["web"]["graphs"]["wasm"])
    (copy / "edgecraft.json").write_text(json.dumps(manifest, indent=2))
    return copy


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    med = lambda name, key: statistics.median(r[key] for r in results[name])  # noqa: E731
    lines = [
        f"Greedy decode of {args.tokens} tokens after a 1-token prompt"
        f"{' (past the context of 256: one sliding-window re-fill)' if args.tokens > 256 else ''}; "
        f"median of {args.rounds} interleaved rounds. Browser rows: a fresh browser "
        "context per measurement; *first token* is since the navigation started (fetching, hash checks, "
        "WebAssembly compile, session, prompt); *first generation* is the decode speed of that page's first "
        f"{args.tokens} tokens (V8 still runs baseline-compiled WebAssembly); *decode* is measured after "
        f"{args.warmup:g} s of generating (the median of 3 generations). Python rows: `edgecraft.runtime` in "
        "this process; its first token is the prompt and first step of a loaded model.",
        "",
        "| row | decode tok/s | per round | vs Python, same threads | first generation tok/s | first token | same text as Python |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results:
        browser = name.startswith("browser")
        tps = med(name, "tokensPerSecond")
        rounds = ", ".join(f"{r['tokensPerSecond']:,.0f}" for r in results[name])
        precision = "int8" if "int8" in name else "fp32"
        py = name.replace("browser wasm", "python") if name.startswith("browser wasm") else f"python {precision} 1t"
        ratio = f"{tps / med(py, 'tokensPerSecond'):.2f}x" if browser and "wasm" in name and py in results else ""
        cold = f"{med(name, 'cold'):,.0f}" if browser else ""
        first = f"{med(name, 'firstMs') / 1000:.2f} s (cold page)" if browser else f"{med(name, 'firstMs'):.1f} ms (warm)"
        same = ""
        if browser and py in results:
            same = "yes" if all(r["text"] == results[py][0]["text"] for r in results[name]) else "no"
        lines.append(f"| {name} | **{tps:,.0f}** | {rounds} | {ratio} | {cold} | {first} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
