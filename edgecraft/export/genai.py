"""The bundle's genai_config.json: onnxruntime-genai's bring-your-own-model description of model.onnx.

genai drives the same graph edgecraft's runtime does. Its decoder has no `seqlens_k` input, but
at batch 1 it keeps two int32 counters for models that take them: `past_sequence_length` (-1,
then + each chunk's length: tokens cached minus one) and `current_sequence_length` (tokens
cached). Those are exactly GroupQueryAttention's `seqlens_k` and `total_sequence_length`, so the
config maps them onto our inputs, which the graph declares without a rank (genai's counters are
shaped (1, 1) and (1,)). genai shares one KV buffer between past and present
(`past_present_share_buffer`), like the engine. Limits: batch 1, and generation stops at
block_size tokens (genai does not slide the window).

genai's own tokenizer (onnxruntime-extensions) reads a byte-level BPE tokenizer.json exactly and
needs a tokenizer_config.json beside it; it misreads a character tokenizer (spaces, newlines and
unknown characters become -1), so character bundles get no tokenizer_config.json and apps
encode with `tokenizers` and hand genai the ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from edgecraft.config import GPTConfig
from edgecraft.runtime.bundle import FP32_MODEL, INT8_MODEL
from edgecraft.runtime.onnx_engine import DEFAULT_THREADS

GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_CONFIG = "tokenizer_config.json"


def genai_config(cfg: GPTConfig, tokenizer: Tokenizer, model_file: str, threads: int) -> dict:
    """genai_config.json for a bundle whose graph is `model_file`."""
    # genai needs an end-of-sequence id inside the vocabulary, and edgecraft's models have none:
    # the token of a NUL character, which text never holds (the unknown token of a character
    # tokenizer, byte 0 of a byte-level one), so genai never stops before max_length. Its pad id
    # marks where a prompt ends: one past the vocabulary can never occur in a prompt.
    eos = tokenizer.encode("\x00", add_special_tokens=False).ids[0]
    return {
        "model": {
            "type": "llama",  # genai's plain decoder-only state; nothing llama-specific is used
            "context_length": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "eos_token_id": [eos],
            "pad_token_id": cfg.vocab_size,
            "decoder": {
                "filename": model_file,
                "session_options": {
                    "log_id": "edgecraft",
                    "provider_options": [],
                    "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1,
                    "graph_optimization_level": "ORT_ENABLE_BASIC",  # fused at export
                },
                "hidden_size": cfg.d_model,
                "head_size": cfg.cache_head_size,  # the graph's (padded) heads
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads,
                "num_hidden_layers": cfg.n_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "position_ids": "position_ids",  # fed only if the graph has it
                    "past_sequence_length": "seqlens_k",
                    "current_sequence_length": "total_sequence_length",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": cfg.block_size,
            "past_present_share_buffer": True,
            "do_sample": False,
            "num_beams": 1,
        },
    }


def genai_tokenizer_config(kind: str, block_size: int) -> dict | None:
    """tokenizer_config.json for genai's tokenizer; None for a character tokenizer (see above)."""
    if kind != "bpe":
        return None
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}


def write_genai_files(cfg: GPTConfig, tokenizer: Tokenizer, tokenizer_kind: str, root: Path) -> None:
    """genai_config.json (and, for BPE, tokenizer_config.json) beside the bundle's graph in `root`."""
    model_file = FP32_MODEL if (root / FP32_MODEL).is_file() else INT8_MODEL
    config = genai_config(cfg, tokenizer, model_file, DEFAULT_THREADS)
    (root / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = genai_tokenizer_config(tokenizer_kind, cfg.block_size)
    if tokenizer_config is not None:
        (root / GENAI_TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
