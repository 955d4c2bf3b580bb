"""`edgecraft serve`: an OpenAI-compatible HTTP server over a bundle, with continuous batching.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client); only the serve command imports it.
"""

from edgecraft.serve.chat import choose_template
from edgecraft.serve.server import ServeOptions, serve

__all__ = ["ServeOptions", "choose_template", "serve"]
