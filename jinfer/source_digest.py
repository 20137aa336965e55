"""A digest of jinfer's own source code, for caches whose entries are only valid for the code that wrote them."""

from __future__ import annotations

import functools
import hashlib
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.cache
def source_digest(*folders: str) -> str:
    """sha256 over the names and bytes of the .py files below `folders` (relative to the project root)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
