"""The embeddable runtime: load a bundle and generate text with onnxruntime (or tinygrad), no PyTorch.

    from edgecraft.runtime import load
    model = load("export/NAME")          # checks the bundle's format and every file's sha256
    print(model.generate("ROMEO:", max_new_tokens=80, temperature=0.8, top_k=40, seed=1))

Imports only numpy, onnxruntime, tokenizers and the standard library (a test proves it).
"""

from edgecraft.runtime.bundle import BundleError, Manifest
from edgecraft.runtime.describe import describe_bundle
from edgecraft.runtime.model import Model, Score, load
from edgecraft.runtime.sampling import SamplingParams

__all__ = ["BundleError", "Manifest", "Model", "SamplingParams", "Score", "describe_bundle", "load"]
