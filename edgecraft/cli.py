"""The `edgecraft` command: parse, call, print. Heavy imports happen inside each command.

`generate`, `bench` and `info` on a bundle never import torch, so a deployed CLI starts fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from edgecraft.errors import UserError

app = typer.Typer(
    help="Train tiny language models and ship them to the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Work with recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def friendly(fn: Callable) -> Callable:
    """Turn a UserError (or a bundle the runtime refuses, wherever it surfaces) into one line on
    stderr and its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if str(err):  # empty: a DDP rank whose failure rank 0 (or another rank) reports
                typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except ValueError as err:
            # a BundleError exists only once the runtime is imported: no import here, so every
            # command's start-up stays as light as the command itself
            bundle = sys.modules.get("edgecraft.runtime.bundle")
            if bundle is None or not isinstance(err, bundle.BundleError):
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def is_bundle(path: Path) -> bool:
    return (path / "edgecraft.json").is_file()


def _print_version(value: bool) -> None:
    if value:
        import edgecraft

        typer.echo(f"edgecraft {edgecraft.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def read_prompt(path: Path) -> str:
    """The prompt in a UTF-8 file, or on stdin for `-`, exactly as written."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as err:
        raise UserError(f"--prompt-file {path}: cannot read it ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"--prompt-file {path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


@app.command()
@friendly
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file.")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a recipe key: section.key=value (repeatable); with --resume, train.max_steps only."),
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option(help="Continue RUN_DIR from its newest checkpoint.")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path("runs"),
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Validate a recipe, prepare its data and train, writing runs/NAME/."""
    from edgecraft.train import is_main_process, resume_run, train_recipe

    if resume is not None:
        if recipe is not None:
            raise UserError("--resume takes the run directory only; the recipe is read from it")
        run_dir = resume_run(resume, set_ or [])  # --set train.max_steps=N extends the run
    elif recipe is None:
        raise UserError("give a recipe file (edgecraft train recipes/quickstart.toml) or --resume RUN_DIR")
    else:
        from edgecraft.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        run_dir = train_recipe(loaded, runs_dir=runs_dir, force=force, origin=str(recipe))
    if is_main_process():  # under torchrun, rank 0 speaks for every process
        typer.echo(f"run written to {run_dir}")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema."""
    from edgecraft.recipe import json_schema

    typer.echo(json_schema())


@app.command()
@friendly
def generate(
    path: Annotated[Path, typer.Argument(help="A bundle (export/NAME) or a run directory (runs/NAME).")],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")] = "",
    prompt_file: Annotated[
        Optional[Path], typer.Option(help="Read the prompt from FILE, UTF-8, exactly as written (- = stdin).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("-n", "--max-new-tokens", min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1)] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Same seed, same text.")] = None,
    stream: Annotated[bool, typer.Option(help="Print text as it is generated.")] = False,
    int8: Annotated[bool, typer.Option(help="Use the bundle's int8 model.")] = False,
    int4: Annotated[bool, typer.Option(help="Use the bundle's int4 model.")] = False,
    threads: Annotated[int, typer.Option(min=0, help="0 = the runtime's measured default.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda (tinygrad: CPU, CUDA, METAL, GPU, WEBGPU).")] = "cpu",
    backend: Annotated[str, typer.Option(help="Bundles: onnxruntime | tinygrad.")] = "onnxruntime",
) -> None:
    """Continue a prompt: from a bundle (onnxruntime or tinygrad) or a run (PyTorch), through the
    same decode loop and sampling."""
    if prompt_file is not None:
        if prompt:
            raise UserError("give the prompt as an argument or with --prompt-file, not both")
        prompt = read_prompt(prompt_file)
    if not path.exists():
        raise UserError(f"{path}: no such bundle or run directory")
    if int8 and int4:
        raise UserError("--int8 and --int4: choose one model")
    quant = "int4" if int4 else ("int8" if int8 else None)
    if is_bundle(path):
        from edgecraft.runtime import BundleError, load

        try:  # bundle problems and onnxruntime/tinygrad load errors each say what is wrong
            model = load(path, threads=threads, device=device, backend=backend, quant=quant)
        except (BundleError, ValueError, RuntimeError) as err:
            raise UserError(str(err)) from None
    else:
        if quant:
            raise UserError(
                f"--{quant}: {path} is a run (float weights); export it with --{quant} and generate from the bundle"
            )
        if backend != "onnxruntime":
            raise UserError(f"--backend {backend}: runs generate with PyTorch; export the run to use {backend}")
        from edgecraft.torch_engine import load_run_model

        model = load_run_model(path, device=device, threads=threads)
    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed,
    )
    try:
        if not stream:
            typer.echo(prompt + model.generate(prompt, **options))
            return
        pieces = model.stream(prompt, **options)  # checks the options now, generates lazily
    except ValueError as err:
        raise UserError(str(err)) from None
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/NAME).")],
    out: Annotated[Optional[Path], typer.Option(help="Bundle directory (default export/NAME).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    int8: Annotated[bool, typer.Option(help="Also write model.int8.onnx.")] = False,
    int8_only: Annotated[bool, typer.Option(help="Write int8 instead of fp32 (with --int8).")] = False,
    int4: Annotated[bool, typer.Option(help="Also write model.int4.onnx (4-bit block-wise weights).")] = False,
    block_size: Annotated[
        Optional[int], typer.Option(help="int4: weights per scale, 16|32|64|128 (default: the QAT run's, or 32).")
    ] = None,
    calibrate: Annotated[
        int, typer.Option(min=0, help="Static post-training quantization from N validation batches.")
    ] = 0,
    keep_float: Annotated[
        Optional[list[str]],
        typer.Option(help="Leave in float: embeddings, head, first, last (repeatable)."),
    ] = None,
    max_loss_increase: Annotated[
        Optional[float], typer.Option(help="Fail (exit 3) if int8/int4 loses more than PCT % val loss.")
    ] = None,
    text: Annotated[
        Optional[Path], typer.Option(help="Text file for the checks (default: the run's validation split).")
    ] = None,
    web: Annotated[
        bool, typer.Option(help="Add web/: a static page and ES module running the bundle with onnxruntime-web.")
    ] = False,
) -> None:
    """Export a run to an ONNX bundle with a KV cache, parity-checked against PyTorch."""
    from edgecraft.export import ExportOptions, export_run

    options = ExportOptions(
        opset=opset, force=force, int8=int8 or int8_only, int8_only=int8_only,
        calibrate=calibrate, keep_float=tuple(keep_float or ()), max_loss_increase=max_loss_increase,
        text=text, int4=int4, block_size=block_size,
    )
    if web:
        from edgecraft.export.web import add_web, vendored_versions

        vendored_versions()  # refuses before the export when onnxruntime-web is missing
    bundle = export_run(run_dir, out, options)
    if web:
        typer.echo(f"web page written to {add_web(bundle)}/index.html (serve {bundle} and open web/)")
    typer.echo(f"bundle written to {bundle}")


@app.command()
@friendly
def info(
    path: Annotated[Path, typer.Argument(help="A run directory or a bundle.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """What a run or bundle holds: config, parameters, sizes, quantization, metrics."""
    if not path.exists():
        raise UserError(f"{path}: no such bundle or run directory")
    if json_out:
        import json

        if is_bundle(path):
            from edgecraft.runtime import BundleError
            from edgecraft.runtime.bundle import read_manifest

            try:
                data = {"kind": "bundle", "path": str(path), **read_manifest(path).to_dict()}
            except BundleError as err:
                raise UserError(str(err)) from None
        else:
            from edgecraft.rundir import run_info

            data = run_info(path)
        typer.echo(json.dumps(data, indent=2))
        return
    if is_bundle(path):
        from edgecraft.runtime import BundleError, describe_bundle

        try:
            typer.echo(describe_bundle(path))
        except BundleError as err:
            raise UserError(str(err)) from None
    else:
        from edgecraft.rundir import describe_run

        typer.echo(describe_run(path))


@app.command()
@friendly
def bench(
    paths: Annotated[list[Path], typer.Argument(help="Bundles and/or run directories.")],
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[str, typer.Option(help="Thread counts, one row each, e.g. 1 or 1,2 (0 = default).")] = "1",
    batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 1,
    prompt_len: Annotated[
        Optional[int], typer.Option(min=1, help="pp P: prompt tokens prefilled (and TTFT) [default: 64, or the context if shorter].")
    ] = None,
    new_tokens: Annotated[
        Optional[int], typer.Option(min=1, help="tg N: tokens decoded one step at a time [default: 200, or what the context allows].")
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Measured repetitions per row.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured repetitions before them.")] = 1,
    text: Annotated[Optional[Path], typer.Option(help="Text for perplexity (default: validation split).")] = None,
    ppl_tokens: Annotated[int, typer.Option(min=0, help="Score at most N tokens of it (0 = all).")] = 16384,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write results as CSV.")] = None,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write a markdown table.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG chart (needs edgecraft[bench]).")] = None,
    backend: Annotated[
        str, typer.Option(help="Bundle rows on onnxruntime and/or tinygrad, e.g. onnxruntime,tinygrad.")
    ] = "onnxruntime",
) -> None:
    """Measure load time, prefill/decode tokens/s, latency, memory, size and perplexity.

    Each row (path x precision x thread count) runs in a process of its own, one after the other.
    """
    from edgecraft.bench import BenchOptions, run_bench

    try:
        thread_list = [int(t) for t in threads.split(",")]
    except ValueError:
        raise UserError(f"--threads {threads!r}: expected integers like 1 or 1,2") from None
    options = BenchOptions(
        device=device, threads=thread_list, batch=batch, prompt_len=prompt_len,
        new_tokens=new_tokens, runs=runs, text=text, warmup=warmup, ppl_tokens=ppl_tokens,
        backends=[b.strip() for b in backend.split(",")],
    )
    run_bench(paths, options, json_out=json_out, csv_out=csv_out, markdown_out=markdown_out, plot=plot)


@app.command()
@friendly
def serve(
    bundle: Annotated[Path, typer.Argument(help="A bundle (export/NAME).")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="0 = any free port (the printed URL says which).")] = 8000,
    int8: Annotated[bool, typer.Option(help="Use the bundle's int8 model.")] = False,
    int4: Annotated[bool, typer.Option(help="Use the bundle's int4 model.")] = False,
    threads: Annotated[int, typer.Option(min=0, help="onnxruntime threads (0 = the bundle's default).")] = 0,
    slots: Annotated[int, typer.Option(min=1, help="Sequences decoded together in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Sequences waiting for a slot; past it, 503.")] = 64,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="EDGECRAFT_API_KEY", help="Require Authorization: Bearer KEY.")
    ] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from a file.")] = None,
    chat_template: Annotated[
        Optional[Path], typer.Option(help="Chat template JSON (default: the bundle's chat_template.json, else plain).")
    ] = None,
) -> None:
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health,
    /metrics) with continuous batching, and the bundle's files under /bundle/ (its web page, when
    exported with --web, at /bundle/web/); needs the serve extra (FastAPI, uvicorn, prometheus-client)."""
    if int8 and int4:
        raise UserError("give --int8 or --int4, not both")
    quant = "int8" if int8 else "int4" if int4 else None
    if not is_bundle(bundle):
        raise UserError(f"{bundle}: not a bundle (no edgecraft.json); export a run first")
    if api_key is not None and api_key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--api-key-file {api_key_file}: cannot read it ({err})") from None
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty")
    from edgecraft.runtime import BundleError
    from edgecraft.runtime.bundle import model_file, read_manifest

    try:
        manifest = read_manifest(bundle)
        model_file(bundle, manifest, quant=quant)  # a missing model is refused before the port is bound
    except BundleError as err:
        raise UserError(str(err)) from None
    try:
        from edgecraft.serve import ServeOptions, choose_template, serve as run_server
    except ImportError as err:
        raise UserError(f"edgecraft serve needs the serve extra ({err.name} is missing): pip install 'edgecraft[serve]'") from None
    options = ServeOptions(
        host=host, port=port, quant=quant, threads=threads, slots=slots, max_queue=max_queue,
        max_tokens_limit=max_tokens_limit, api_key=api_key,
    )
    run_server(bundle, manifest.name, choose_template(bundle, chat_template), options)


if __name__ == "__main__":
    app()
