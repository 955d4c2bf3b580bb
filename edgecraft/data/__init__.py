"""Data: corpora, tokenizers (char and byte-level BPE), the token cache on disk, and batches.

    corpus.py     what data.source names, read as one exact text; is it long enough
    tokenizer.py  char and BPE tokenizers, tokenizer.json files, token dtypes
    cache.py      prepare(): the corpus tokenized once, cached as a flat array, split train/val
    batches.py    training batches (a pure function of seed, step, micro-step, global row), eval batches
"""

from edgecraft.data.batches import eval_batches, get_batch, val_blocks
from edgecraft.data.cache import PreparedData, default_cache_dir, prepare
from edgecraft.data.corpus import check_source, read_text, text_files
from edgecraft.data.tokenizer import load_tokenizer, make_char_tokenizer, token_dtype

__all__ = [
    "PreparedData", "check_source", "default_cache_dir", "eval_batches", "get_batch", "load_tokenizer",
    "make_char_tokenizer", "prepare", "read_text", "text_files", "token_dtype", "val_blocks",
]
