"""A terminal autocomplete: type the start of a line, get a few ways to finish it.

    edgecraft train recipes/quickstart.toml && edgecraft export runs/quickstart
    python examples/autocomplete.py export/quickstart
    > The
      1. The ...        (up to three different endings of the line, as the model writes them)
      2. The ...

An app embedding edgecraft's runtime needs only `pip install edgecraft` (numpy, onnxruntime,
tokenizers; no PyTorch). All suggestions for a line come from one batched decode loop, and each
ends at the end of the line (a stop string). Lines come from stdin, so it also works in a pipe:

    printf 'The \\nA \\n' | python examples/autocomplete.py export/quickstart --seed 1
"""

from __future__ import annotations

import argparse
import sys

from edgecraft.runtime import BundleError, load


def suggestions(model, prefix: str, n: int, max_new_tokens: int, temperature: float, seed: int | None) -> list[str]:
    """Up to n different completions of `prefix`, each to the end of its line, best-effort distinct."""
    texts = model.generate_batch(
        [prefix] * n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=40, stop=["\n"], seed=seed
    )
    return list(dict.fromkeys(prefix + t for t in texts))  # drop duplicates, keep order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="an exported bundle directory (export/quickstart, say)")
    parser.add_argument("-n", "--suggestions", type=int, default=3, help="how many completions per line")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="longest completion, in tokens")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=None, help="same seed, same suggestions")
    args = parser.parse_args(argv)
    if args.suggestions < 1:
        parser.error(f"--suggestions must be >= 1, got {args.suggestions}")
    try:
        model = load(args.bundle)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # bytes that are not UTF-8 arrive as surrogate escapes, which the runtime names in one line
    sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print("type the start of a line and press Enter (Ctrl-D to quit)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        try:
            found = suggestions(model, line.rstrip("\n"), args.suggestions, args.max_new_tokens, args.temperature, args.seed)
        except ValueError as err:  # a bad option value (--temperature -1), a line that is not text
            print(f"error: {err}", file=sys.stderr)
            return 2
        for i, text in enumerate(found, 1):
            print(f"  {i}. {text}")


if __name__ == "__main__":
    sys.exit(main())
