"""`surgery demo`'s folder: run again, the demo replaces its own earlier output and never anything else.

A folder is a previous demo's output when it holds only files an upcycle writes (shards, index, config, generation
config, model card) and its model card says `surgery demo` made it from the shipped demo model. Any other non-empty
folder is left untouched: the demo then writes to DST-2, DST-3, ... (the first that is free or its own).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import SurgeryError

SOURCE = Path(__file__).resolve().parent / "demo_model"
RECIPE = {"rules": "mistral-to-mixtral", "num_experts": 4, "experts_per_token": 2}
#: how many sibling names (DST-2 ... DST-N) the demo tries before it gives up
MAX_SIBLINGS = 100
_OUTPUT_FILES = re.compile(
    r"README\.md|config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
)
_RECIPE_BLOCK = re.compile(r"## Recipe\n```json\n(.*?)\n```", re.DOTALL)
_COMMAND_BLOCK = re.compile(r"\nCommand:\n```\n(.*?)\n```", re.DOTALL)


def destination(dst: Path) -> tuple[Path, bool]:
    """Where the demo writes and whether that replaces a previous demo's output: DST when it is absent, empty or
    the demo's own, else the first such DST-i."""
    base = dst if dst.name else dst.resolve()
    for i in range(1, MAX_SIBLINGS + 1):
        candidate = dst if i == 1 else base.with_name(f"{base.name}-{i}")
        if not os.path.lexists(candidate) or (_real_folder(candidate) and not any(candidate.iterdir())):
            return candidate, False
        if is_demo_output(candidate):
            return candidate, True
    raise SurgeryError(f"{dst} and {base.name}-2 ... {base.name}-{MAX_SIBLINGS} all hold other files, left untouched: "
                       "give the demo another folder (surgery demo DIR)")


def is_demo_output(folder: Path) -> bool:
    """True when `folder` holds only files an upcycle writes and its model card says `surgery demo` made it."""
    if not _real_folder(folder):
        return False
    entries = list(folder.iterdir())
    if not all(_real_file(e) and _OUTPUT_FILES.fullmatch(e.name) for e in entries):
        return False
    card = folder / "README.md"
    if card not in entries:
        return False
    text = card.read_text(errors="replace")
    recipe, command = _RECIPE_BLOCK.search(text), _COMMAND_BLOCK.search(text)
    if not recipe or not command or not command.group(1).startswith("surgery demo"):
        return False
    try:
        made = json.loads(recipe.group(1))
    except json.JSONDecodeError:
        return False
    return (isinstance(made, dict) and made.get("rules") == RECIPE["rules"]
            and Path(str(made.get("source"))).parts[-2:] == SOURCE.parts[-2:])


def _real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _real_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
