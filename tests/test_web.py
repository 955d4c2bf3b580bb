"""`edgecraft export --web`: the page and ES module in a real headless Chromium, held to the Python runtime.

Debian's `chromium` package (its binary in /usr/lib/chromium, which Playwright drives; the
`chromium` on PATH is a shell wrapper) and the npm packages copied by `npm ci --prefix web`;
.ci/run installs both. Pages are served by `python -m http.server` from the bundle folder, as a
user would. Screenshots land in pytest's temporary folder (printed with -s).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_recipe

from edgecraft.export.web import VENDOR, _fit_nbits_blocks, webgpu_graph

CHROMIUM = Path("/usr/lib/chromium/chromium")
SWIFTSHADER_WEBGPU = [  # a software WebGPU adapter for a headless browser without a GPU
    "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader",
    "--use-vulkan=swiftshader", "--enable-features=Vulkan",
]
NEW_TOKENS = 120  # past the tiny model's context of 16: the sliding window re-fills seven times

playwright = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed (the dev extra)")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM}: apt-get install chromium (.ci/run does)"),
    pytest.mark.skipif(not (VENDOR / "versions.json").is_file(), reason="no onnxruntime-web: npm ci --prefix web (.ci/run does)"),
]


@pytest.fixture(scope="module")
def bundles(trained_run, tmp_path_factory) -> dict[str, Path]:
    """Char and BPE bundles with fp32, int8 and web/: the char one through the CLI's --web."""
    from typer.testing import CliRunner

    from edgecraft.cli import app
    from edgecraft.export import ExportOptions, export_run
    from edgecraft.export.web import add_web
    from edgecraft.recipe import load_recipe
    from edgecraft.train import train_recipe

    root = tmp_path_factory.mktemp("web")
    result = CliRunner().invoke(app, ["export", str(trained_run), "--int8", "--web", "--out", str(root / "char")])
    assert result.exit_code == 0, result.output
    recipe = write_tiny_recipe(root / "bpe-run")
    recipe.write_text(recipe.read_text().replace("[data]\n", '[data]\ntokenizer = "bpe"\nvocab_size = 300\n'))
    run = train_recipe(load_recipe(recipe), runs_dir=root / "runs")
    bpe = export_run(run, root / "bpe", ExportOptions(int8=True))
    add_web(bpe)
    return {"char": root / "char", "bpe": bpe}


class Server:
    """`python -m http.server` serving a folder on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(bundles):
    running = {kind: Server(folder) for kind, folder in bundles.items()}
    yield {kind: server.url for kind, server in running.items()}
    for server in running.values():
        server.close()


@pytest.fixture(scope="module")
def pw():
    with playwright.sync_playwright() as p:  # one per module: Playwright's sync API does not nest
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"test_web screenshots: {folder}")  # shown with -s
    return folder


def open_page(browser, url: str, console: list[str] | None = None):
    page = browser.new_page()
    page.on("console", lambda m: console.append(m.text) if console is not None else None)
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready], #status[data-state=error]", timeout=120_000)
    assert page.get_attribute("#status", "data-state") == "ready", page.text_content("#status")
    return page


def generate(page, prompt: str, **fields: str) -> str:
    """Type the prompt and the option fields (#max-new-tokens, #temperature, ...), click Generate,
    wait for the end: the generated text as the page shows it."""
    page.fill("#prompt", prompt)
    for field, value in fields.items():
        page.fill(f"#{field.replace('_', '-')}", value)
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=120_000)
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")
    return page.text_content("#generated")


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_page_greedy_equals_python(kind, precision, bundles, servers, browser, shots):
    from edgecraft.runtime import load

    prompt = "The cat" if kind == "char" else "The dog sat on"
    expected = load(bundles[kind], int8=precision == "int8").generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0)
    page = open_page(browser, f"{servers[kind]}web/index.html?model={precision}&backend=wasm")
    about = page.text_content("#about")
    files = "web/model.wasm.int8.onnx (decode steps: web/model.wasm.int8.1row.onnx)" if precision == "int8" else "web/model.wasm.onnx"
    assert f"{files} on WebAssembly" in about  # the Python engine's int8 decode steps run the 1row graph too
    text = generate(page, prompt, max_new_tokens=str(NEW_TOKENS), temperature="0")
    page.screenshot(path=str(shots / f"{kind}-{precision}.png"))
    assert text == expected
    assert "tokens/s" in page.text_content("#status")
    page.close()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_page_sampling_equals_python(kind, bundles, servers, browser):
    """temperature, top-k, top-p, repetition penalty and a seed: the page draws Python's random
    numbers (its Mersenne Twister), so it picks the same tokens; a stop string ends the text."""
    from edgecraft.runtime import load

    model = load(bundles[kind])
    options = dict(max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3, seed=11)
    free = model.generate("A", **options)
    stop = free[40:43]  # a stop string the text reaches
    expected = model.generate("A", **options, stop=[stop])
    assert len(expected) < len(free)
    page = open_page(browser, f"{servers[kind]}web/index.html?backend=wasm")
    fields = {k: str(v) for k, v in options.items()}
    assert generate(page, "A", **fields) == free
    assert generate(page, "A", **fields, stop=stop.replace("\n", "\\n")) == expected
    page.close()


def test_module_on_its_own(bundles, servers, browser):
    """The README's example: load() + stream() from another page; the pieces join to generate()'s
    text; bad options are refused, named; a damaged model file is refused, named, by its sha256."""
    from edgecraft.runtime import load

    page = browser.new_page()
    page.goto(f"{servers['bpe']}web/vendor/versions.json")  # any page of the same origin
    pieces = page.evaluate("""async () => {
        const { load } = await import("/web/edgecraft.js");
        const model = await load("/", { backend: "wasm" });
        const pieces = [];
        for await (const piece of model.stream("The cat", { maxNewTokens: 60, temperature: 0 })) pieces.push(piece);
        return pieces;
    }""")
    assert len(pieces) > 1
    assert "".join(pieces) == load(bundles["bpe"]).generate("The cat", max_new_tokens=60, temperature=0)
    refusals = page.evaluate("""async () => {
        const { load } = await import("/web/edgecraft.js");
        const refusal = async (f) => { try { await f(); return ""; } catch (err) { return err.message; } };
        const model = await load("/", { backend: "wasm" });
        return [
            await refusal(() => model.generate("The", { temperature: -1 })),
            await refusal(() => model.generate("The", { top_k: 5 })),
            await refusal(() => load("/", { backend: "wasm", threads: 2 })),
        ];
    }""")
    assert refusals[0] == "temperature must be >= 0 (0 = greedy), got -1"  # the Python runtime's words
    assert refusals[1].startswith("unknown option top_k; expected one of maxNewTokens")
    assert refusals[2].startswith("threads: 2 WebAssembly threads need a cross-origin isolated page")
    damaged = bundles["bpe"].parent / "bpe-damaged"
    shutil.copytree(bundles["bpe"], damaged)
    data = bytearray((damaged / "web/model.wasm.onnx").read_bytes())
    data[-1] ^= 1
    (damaged / "web/model.wasm.onnx").write_bytes(bytes(data))
    server = Server(damaged)
    try:
        page.goto(f"{server.url}web/vendor/versions.json")
        error = page.evaluate("""async () => {
            const { load } = await import("/web/edgecraft.js");
            try { await load("/", { backend: "wasm" }); return ""; } catch (err) { return err.message; }
        }""")
    finally:
        server.close()
    assert error.startswith("web/model.wasm.onnx: damaged (sha256")
    page.close()


def test_webgpu_under_swiftshader(bundles, servers, pw, shots):
    """Where the browser has WebGPU the page picks it by itself and runs the WebGPU graph, every
    node on the GPU (correctness only: SwiftShader is a CPU pretending)."""
    from edgecraft.runtime import load

    expected = load(bundles["char"]).generate("The cat", max_new_tokens=8, temperature=0)
    console: list[str] = []
    chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", *SWIFTSHADER_WEBGPU])
    try:
        page = open_page(chromium, f"{servers['char']}web/index.html", console)
        assert "web/model.webgpu.onnx on WebGPU" in page.text_content("#about")
        text = generate(page, "The cat", max_new_tokens="8", temperature="0")
        page.screenshot(path=str(shots / "char-webgpu.png"))
    finally:
        chromium.close()
    assert text == expected
    assert not [line for line in console if "not assigned to the preferred execution providers" in line]


def test_manifest_web_section(bundles):
    from edgecraft.runtime.bundle import read_manifest, sha256_file

    manifest = read_manifest(bundles["char"])
    web = manifest.web
    assert web["format"] == "edgecraft-web/1" and web["page"] == "web/index.html"
    assert web["graphs"] == {
        "wasm": {"fp32": "web/model.wasm.onnx", "int8": "web/model.wasm.int8.onnx", "int8_decode": "web/model.wasm.int8.1row.onnx"},
        "webgpu": {"fp32": "web/model.webgpu.onnx", "int8": "web/model.webgpu.int8.onnx"},
    }
    assert json.loads((VENDOR / "versions.json").read_text()) == web["packages"]
    for name, entry in web["files"].items():
        assert sha256_file(bundles["char"] / name) == entry["sha256"], name
    names = set(web["files"])
    assert {"web/edgecraft.js", "web/vendor/ort.wasm.min.js", "web/vendor/ort-wasm-simd-threaded.wasm"} <= names
    assert not any(name.endswith(".mjs") for name in names)  # Python's http.server sends .mjs as non-JavaScript


def test_browser_graphs_compute_the_same(bundles, tmp_path):
    """The WebAssembly graph (one cache tensor in, the positions written out) gives the same logits,
    and so does a MatMulNBits block split for onnxruntime-web;
    the Add chains change nothing; MatMulNBits computes x @ (q * scale) in float, so the int8
    WebGPU graph equals the int8 weights with unquantized activations (the WASM graph quantizes them)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    K, N = 40, 24  # K not a multiple of MatMulNBits' block of 32: a padded block
    q = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    scale = rng.uniform(0.01, 0.02, size=N).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "", "b"], ["y"], name="mm", domain="com.microsoft")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "mm.onnx"))
    ops = webgpu_graph(tmp_path / "mm.onnx", tmp_path / "mm.webgpu.onnx")
    assert ops == {"MatMulNBits": 1, "Add": 1}
    x = rng.normal(size=(3, K)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "mm.webgpu.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ (q.astype(np.float32) * scale) + bias, rtol=1e-5, atol=1e-5)

    # a MatMulNBits block of 512 (the int8 one-row graph at K = 512) -> blocks of 256 for onnxruntime-web
    K = 512
    stored = rng.integers(0, 256, size=(N, 1, K), dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], name="mm", domain="com.microsoft",
                          K=K, N=N, bits=8, block_size=K, accuracy_level=4)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(stored, "q"), numpy_helper.from_array(scale, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nbits.onnx"))
    refit = onnx.load(str(tmp_path / "nbits.onnx"))
    _fit_nbits_blocks(refit.graph)
    assert [a.i for a in refit.graph.node[0].attribute if a.name == "block_size"] == [256]
    onnx.save(refit, str(tmp_path / "nbits.256.onnx"))
    x = rng.normal(size=(1, K)).astype(np.float32)
    ys = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
          for f in ("nbits.onnx", "nbits.256.onnx")]
    assert np.array_equal(ys[0], ys[1])

    feeds = {"input_ids": np.array([[3, 4, 5]]), "position_ids": np.array([[2, 3, 4]]),
             "seqlens_k": np.array([[4]], dtype=np.int32), "total_sequence_length": np.array([5], dtype=np.int32)}
    outputs = {}
    cache = np.random.default_rng(1).normal(size=(4, 4, 2, 8)).astype(np.float32)  # (2 * layers, heads, 2 cached positions, head size)
    for name in ("model.onnx", "web/model.webgpu.onnx", "web/model.wasm.onnx"):
        session = ort.InferenceSession(str(bundles["char"] / name), providers=["CPUExecutionProvider"])
        past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
        kv = {"past_key_values": cache} if past == ["past_key_values"] else {n: cache[k : k + 1] for k, n in enumerate(past)}
        outputs[name] = dict(zip([o.name for o in session.get_outputs()], session.run(None, {**feeds, **kv})))
    bundle, webgpu, wasm = outputs.values()
    assert np.array_equal(bundle["logits"], webgpu["logits"]) and np.array_equal(bundle["logits"], wasm["logits"])
    new = [bundle[f"present.{i}.{kv}"][:, :, 2:5] for i in range(2) for kv in ("key", "value")]  # the 3 positions written
    assert np.array_equal(np.concatenate(new), wasm["new_key_values"])


def test_edgecraft_serve_serves_the_page(bundles, browser):
    """`edgecraft serve` hands out the bundle's files under /bundle/ (with the cross-origin
    isolation headers), so the page runs from the same server as the API."""
    from serve_helpers import Server as EdgecraftServer

    from edgecraft.runtime import load

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    server = EdgecraftServer(bundles["char"])
    try:
        with urllib.request.urlopen(f"{server.root}/bundle/web/") as response:
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        page = open_page(browser, f"{server.root}/bundle/web/index.html?model=fp32&backend=wasm")
        expected = load(bundles["char"]).generate("The cat", max_new_tokens=40, temperature=0)
        assert generate(page, "The cat", max_new_tokens="40", temperature="0") == expected
        page.close()
    finally:
        assert server.stop() == 0
