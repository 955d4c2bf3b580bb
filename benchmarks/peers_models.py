"""The peers' side of benchmarks/peers.py: GPT-2 built from an edgecraft run, the optimum exports,
and one measured row per process (peers.py runs this file's roles through harness.child).

Runs in whichever Python has transformers and optimum-onnx (--peer-python); edgecraft rows run in
edgecraft's own environment through the same `measure_row`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

import harness

# edgecraft parameter -> GPT-2 parameter (i = layer); Linear weights are transposed for Conv1D
GPT2_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
}
GPT2_BLOCK = {  # suffix after blocks.i. -> (suffix after transformer.h.i., transpose)
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}


# ---------------------------------------------------------------- peers' models (peer python)


def run_weights(run_dir: Path, shape: dict) -> tuple[dict, dict]:
    """The run's model config and weights (torch tensors), refusing a model not of `shape`."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
        weights = {name: f.get_tensor(name) for name in f.keys()}
    if {k: cfg.get(k) for k in shape} != shape:
        raise SystemExit(f"this comparison needs a model of {shape}; {run_dir} has {({k: cfg.get(k) for k in shape})}")
    # tied: save_model stores the shared tensor once, under either name
    weights.setdefault("tok_emb.weight", weights.get("head.weight"))
    return cfg, weights


def load_checked(model, state: dict, allowed_missing: tuple[str, ...]):
    """`model` (eval mode) with `state` loaded; every other parameter missing is an error."""
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith(allowed_missing)]
    if missing or unexpected:
        raise SystemExit(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()


def logit_diff(run_dir: Path, model, probe: list[int]) -> tuple[float, np.ndarray]:
    """Max |logit difference| between edgecraft's PyTorch model of the run and `model` over `probe`
    (refused above 1e-3: same weights, or the comparison is meaningless), and edgecraft's logits (T, V)."""
    import torch

    from edgecraft.checkpoint import load_model

    ids = torch.tensor([probe])
    with torch.no_grad():
        ours = load_model(run_dir / "model.safetensors").eval()(ids)[0][0]  # (T, V)
        diff = float((ours - model(ids).logits[0]).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"{type(model).__name__} built from {run_dir} disagrees with edgecraft: max |logit diff| {diff:.2e}")
    return diff, ours.numpy()


def gpt2_from_run(run_dir: Path):
    """A GPT2LMHeadModel of the run's shape carrying the run's weights (a GPT-2-style recipe only)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg, weights = run_weights(run_dir, {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True,
                                         "tie_embeddings": True})
    config = GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_embd=cfg["d_model"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], n_inner=cfg["d_ff"],
        activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    state = {"lm_head.weight": weights["tok_emb.weight"]}
    for name, tensor in weights.items():
        if name in GPT2_NAMES:
            state[GPT2_NAMES[name]] = tensor
        elif name.startswith("blocks."):
            _, i, suffix = name.split(".", 2)
            target, transpose = GPT2_BLOCK[suffix]
            state[f"transformer.h.{i}.{target}"] = tensor.t() if transpose else tensor
    model = load_checked(GPT2LMHeadModel(config), state, (".attn.bias", "masked_bias"))
    with torch.no_grad():  # the tied head must really be the embedding
        model.lm_head.weight = model.transformer.wte.weight
    return model


def prepare_peers(run_dir: Path, work: Path, probe: list[int]) -> dict:
    """Write work/hf (GPT-2), work/optimum-fp32 and work/optimum-int8; check the GPT-2 against the run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.onnxruntime import ORTModelForCausalLM

    model = gpt2_from_run(run_dir)
    diff, _ = logit_diff(run_dir, model, probe)
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(work / "hf")
    ORTModelForCausalLM.from_pretrained(work / "hf", export=True, use_cache=True).save_pretrained(work / "optimum-fp32")
    shutil.copytree(work / "optimum-fp32", work / "optimum-int8", ignore=shutil.ignore_patterns("*.onnx*"))
    quantize_dynamic(
        work / "optimum-fp32" / "model.onnx", work / "optimum-int8" / "model.onnx",
        weight_type=QuantType.QInt8, per_channel=False,
    )
    return {"max_abs_logit_diff_gpt2_vs_edgecraft": diff}


# ---------------------------------------------------------------- generators (one per row kind)


class EdgecraftGen:
    """Greedy decoding through edgecraft's engine (the bundle's graph)."""

    def __init__(self, bundle: Path, int8: bool, threads: int) -> None:
        from edgecraft.runtime import load

        self.engine = load(bundle, int8=int8, threads=threads).engine

    def generate(self, prompt: np.ndarray, n: int) -> np.ndarray:
        return harness.greedy(self.engine, prompt, n)[0]


class HFGen:
    """`generate()` of a transformers or optimum causal LM, greedy, KV cache on, exactly n tokens."""

    def __init__(self, kind: str, work: Path, threads: int) -> None:
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        if kind == "transformers":
            from transformers import GPT2LMHeadModel

            self.model = GPT2LMHeadModel.from_pretrained(work / "hf").eval()
        else:
            import onnxruntime as ort
            from optimum.onnxruntime import ORTModelForCausalLM

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self.model = ORTModelForCausalLM.from_pretrained(
                work / kind, use_cache=True, use_io_binding=False, session_options=so,
            )

    def generate(self, prompt: np.ndarray, n: int) -> np.ndarray:
        ids = self.torch.from_numpy(prompt)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True, pad_token_id=0,
            )
        return out[:, prompt.shape[1]:].numpy()


def measure_row(spec: dict) -> dict:
    """TTFT and generation speed of one (row, threads) for each batch size: warm-up, then runs."""
    threads = spec["threads"]
    if spec["row"].startswith("edgecraft"):
        gen = EdgecraftGen(Path(spec["bundle"]), spec["row"].endswith("int8"), threads)
    else:
        gen = HFGen(spec["row"], Path(spec["work"]), threads)
    results = {}
    for batch in spec["batches"]:
        ttft_prompt = np.array(spec["prompts"][:batch], dtype=np.int64)[:, : spec["prompt_len"]]
        gen_prompt = np.array(spec["prompts"][:batch], dtype=np.int64)[:, : spec["gen_prompt_len"]]
        ttft, speed, cpu_speed, tokens = [], [], [], None
        for i in range(spec["warmup"] + spec["runs"]):
            t0 = time.perf_counter()
            gen.generate(ttft_prompt, 1)
            t1, c1 = time.perf_counter(), time.process_time()
            out = gen.generate(gen_prompt, spec["new_tokens"])
            t2, c2 = time.perf_counter(), time.process_time()
            if out.shape != (batch, spec["new_tokens"]):
                raise SystemExit(f"{spec['row']}: produced {out.shape}, expected {(batch, spec['new_tokens'])}")
            if i >= spec["warmup"]:
                ttft.append((t1 - t0) * 1e3)
                speed.append(out.size / (t2 - t1))
                cpu_speed.append(out.size / (c2 - c1))
                tokens = out
        results[str(batch)] = {"ttft_ms": ttft, "tok_s": speed, "tok_per_cpu_s": cpu_speed, "tokens": tokens.tolist()}
    return {"row": spec["row"], "threads": threads, "batches": results}


if __name__ == "__main__":
    from edgecraft.bench.system import library_versions

    harness.serve_child({
        "prepare": lambda p: prepare_peers(Path(p["run"]), Path(p["work"]), p["probe"]),
        "row": measure_row,
        "versions": lambda p: library_versions(),
    })
