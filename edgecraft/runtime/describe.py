"""`edgecraft info` on a bundle: a human summary of its manifest."""

from __future__ import annotations

from pathlib import Path

from edgecraft.runtime.bundle import read_manifest


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(str, value[:3]))}, … ({len(value)} items)]"
    return str(value)


def _tree(section: dict, indent: str = "  ") -> list[str]:
    """A manifest section as indented `key: value` lines, in the manifest's order."""
    lines = []
    for key, value in section.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_tree(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {_value(value)}")
    return lines


def describe_bundle(path: str | Path) -> str:
    """Format, config, sizes, quantization, export checks and the recommended runtime settings."""
    path = Path(path)
    m = read_manifest(path)
    opsets = ", ".join(f"{domain} {version}" for domain, version in m.onnx.opset.items())
    lines = [
        f"bundle {path}",
        f"  format: {m.format}",
        f"  name: {m.name}",
        f"  created: {m.created}",
        f"  edgecraft_version: {m.edgecraft_version}",
        f"  parameters: {m.parameters:,}",
        f"  tokenizer: {m.tokenizer.kind}, {m.tokenizer.tokens} tokens",
        f"  onnx graph: {m.onnx.nodes} nodes (opsets: {opsets})",
        "config",
        *_tree(m.config.to_dict()),
        "files",
    ]
    for name, entry in m.files.items():
        present = "" if (path / name).is_file() else "  (MISSING)"
        lines.append(f"  {name}: {_size(entry.bytes)}  sha256 {entry.sha256[:12]}…{present}")
    lines += ["quantization", *_tree(m.quantization), "checks", *_tree(m.checks)]
    runtime = {k: v for k, v in m.to_dict()["runtime"].items() if v != ""}
    lines += ["runtime", *_tree(runtime)]
    if m.web is not None:
        lines += ["web", *_tree(m.web)]
    return "\n".join(lines)
