"""Atomic writes: a reader (or a crash) never sees a half-written output.

Every output goes to a temporary file in the destination folder and is renamed into place, so a
failed stage leaves the previous good output untouched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_path(dest: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest: Path | str, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text(dest: Path | str, text: str) -> Path:
    return write_bytes(dest, text.encode())


def write_json(dest: Path | str, obj: Any) -> Path:
    """Write ``obj`` as pretty JSON (NaN is refused: JSON readers such as DVC's choke on it)."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def archive_bytes(save: Callable[[BinaryIO], None]) -> bytes:
    """The bytes ``save`` (``torch.save``, ``torch.jit.save``) writes to an in-memory buffer.

    Given a path, torch names the zip's top folder after the file, and atomic writes use a
    random temporary name, so the same model saved twice got two hashes; a buffer always gets
    the folder ``archive`` (torch fixes the entries' timestamps itself)."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def write_with(dest: Path | str, writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)``, then move the result onto ``dest`` (torch.save, savefig)."""
    with atomic_path(dest, suffix=suffix) as tmp:
        writer(tmp)
    return Path(dest)


@contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in whole when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    old = dest.with_name(f".{dest.name}.old")
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())
