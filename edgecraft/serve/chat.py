"""Chat messages -> one prompt, with a plain template that any small text model can follow.

Tiny models have no special tokens or chat training, so the default template is just a transcript:

    <system text>\\n\\n            (each system or developer message)
    User: <text>\\n
    Assistant: <text>\\n
    Assistant:                    (the model continues from here)

and generation stops at "\\nUser:" so the model does not write the user's next turn. A bundle can
ship its own as `chat_template.json` beside edgecraft.json, and `edgecraft serve --chat-template
FILE` overrides both; the file has the same keys as `PLAIN` below ("{content}" marks the text).
Every chat response names the template it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecraft.errors import UserError
from edgecraft.runtime.bundle import json_object

BUNDLE_TEMPLATE = "chat_template.json"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    user: str
    assistant: str
    generation: str  # appended after the last message: where the reply starts
    stop: tuple[str, ...]  # added to every request's stop strings

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, text) pairs -> the prompt; "developer" is OpenAI's newer name for "system"."""
        parts = {"system": self.system, "developer": self.system, "user": self.user, "assistant": self.assistant}
        return "".join(parts[role].replace("{content}", text) for role, text in messages) + self.generation


PLAIN = ChatTemplate(
    name="plain",
    system="{content}\n\n",
    user="User: {content}\n",
    assistant="Assistant: {content}\n",
    generation="Assistant:",
    stop=("\nUser:",),
)


def load_template(path: Path) -> ChatTemplate:
    """A template file (JSON with PLAIN's keys; "name" defaults to the file name); UserError names
    the key at fault."""
    try:
        data = json_object(path)
    except ValueError as err:
        raise UserError(
            f"{path}: not a readable chat template ({err}); it is a JSON object with keys system, user, "
            "assistant, generation"
        ) from None
    data.setdefault("name", path.stem)
    data.setdefault("stop", [])
    for key in ("name", "system", "user", "assistant", "generation"):
        if not isinstance(data.get(key), str):
            raise UserError(f"{path}: chat template key {key!r} must be a string")
    if not isinstance(data["stop"], list) or not all(isinstance(s, str) and s for s in data["stop"]):
        raise UserError(f"{path}: chat template key 'stop' must be a list of non-empty strings")
    unknown = set(data) - {"name", "system", "user", "assistant", "generation", "stop"}
    if unknown:
        raise UserError(f"{path}: unknown chat template key(s) {', '.join(sorted(unknown))}")
    return ChatTemplate(**{**data, "stop": tuple(data["stop"])})


def choose_template(bundle: Path, override: Path | None) -> ChatTemplate:
    """The flag's template, else the bundle's own, else PLAIN."""
    if override is not None:
        return load_template(override)
    if (bundle / BUNDLE_TEMPLATE).is_file():
        return load_template(bundle / BUNDLE_TEMPLATE)
    return PLAIN
