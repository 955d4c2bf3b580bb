"""The tinygrad engine (the `tinygrad` extra): the same bundle on tinygrad's code generators.

engine.py (devices, slots, jitted calls), graph.py (the graph's initializers, read without the onnx
package), model.py (the decoder in tinygrad Tensors), products.py (its matrix products: fp32,
int8, int4, and the norms before them), replay.py (captured CPU steps as kernel
calls), plan.py (those steps stored in the cache folder for the next process), cache.py (which
kernel cache folder, and one shipped read-only).
Imports tinygrad and numpy, never torch or onnxruntime.
"""
