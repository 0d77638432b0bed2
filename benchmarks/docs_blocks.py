"""Generated blocks inside hand-kept or generated docs: each script owns the block between its markers,
so one script regenerating a page never drops another script's block."""

from __future__ import annotations

import re
from pathlib import Path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of block ``name`` in ``path`` (appended when absent)."""
    start, end = _markers(name)
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def blocks(text: str) -> dict[str, str]:
    """Every marked block in ``text``, by name, markers included."""
    found = re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", text, re.S)
    return {m.group(1): m.group(0) for m in found}


def keep_blocks(path: Path, new_text: str) -> str:
    """``new_text`` with the marked blocks of the current ``path`` carried over (appended)."""
    old = blocks(path.read_text()) if path.exists() else {}
    kept = [block for name, block in old.items() if name not in blocks(new_text)]
    return new_text.rstrip() + ("\n\n" + "\n\n".join(kept) if kept else "") + "\n"
