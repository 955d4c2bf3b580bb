"""Run directory -> bundle: graph building, int8, parity checks, genai config, bundle writing.

`from edgecraft.export import export_run, ExportOptions`. export_run is imported on first use so
that the torch-free modules here (graph, genai, options) can be imported without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgecraft.export.options import ExportOptions

if TYPE_CHECKING:
    from edgecraft.export.writer import export_run

__all__ = ["ExportOptions", "export_run"]


def __getattr__(name: str) -> Any:
    if name == "export_run":
        from edgecraft.export.writer import export_run

        return export_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
