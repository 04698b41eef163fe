"""Fashion-MNIST from sources tried in order, verified by the MD5 of the decompressed content.

Debian's ``dataset-fashion-mnist`` recompressed the files, so the ``.gz`` checksums differ from the
official ones while the decompressed content is identical: we verify content, not wrappers.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageclf.errors import InvalidInput, StageError
from imageclf.io import write_bytes

log = logging.getLogger(__name__)

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class RemoteFile:
    """One file of the dataset: its name (without .gz) and the MD5 of its raw content."""

    name: str
    md5: str


FILES: tuple[RemoteFile, ...] = (
    RemoteFile("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    RemoteFile("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
    RemoteFile("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
    RemoteFile("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
)


class DownloadError(StageError):
    """No source gave a verified copy of a file (the sources in params.yaml, not a bug)."""


class _SourceFailed(Exception):
    pass


def _read_source(source: str, filename: str, timeout: float) -> bytes:
    """Read ``filename`` from a folder, a file:// URL or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{filename}"
        try:
            with urllib.request.urlopen(
                url, timeout=timeout
            ) as resp:  # the URL is from params.yaml
                return resp.read()
        except Exception as exc:  # network errors come in many types; all mean "try the next one"
            raise _SourceFailed(f"{url}: {type(exc).__name__}: {exc}") from exc
    folder = Path(source.removeprefix("file://"))
    path = folder / filename
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _SourceFailed(f"{path}: {exc.strerror or exc}") from exc


def _fetch_one(source: str, file: RemoteFile, timeout: float) -> bytes:
    """Return the verified raw content of ``file`` from ``source`` (gzipped or not)."""
    problems = []
    for candidate in (f"{file.name}.gz", file.name):
        try:
            blob = _read_source(source, candidate, timeout)
        except _SourceFailed as exc:
            problems.append(str(exc))
            continue
        if candidate.endswith(".gz"):
            try:
                blob = gzip.decompress(blob)
            except (OSError, EOFError, zlib.error) as exc:
                raise _SourceFailed(f"{candidate} is not a valid gzip file ({exc})") from exc
        digest = hashlib.md5(blob).hexdigest()  # a checksum, not security
        if digest != file.md5:
            raise _SourceFailed(
                f"{candidate} has the wrong content (MD5 {digest}, expected {file.md5})"
            )
        return blob
    raise _SourceFailed("; ".join(problems))


def fetch(
    dest: Path,
    sources: list[str],
    files: tuple[RemoteFile, ...] = FILES,
    timeout: float = 30.0,
) -> dict[str, str]:
    """Put a verified copy of every file in ``dest``; return which source gave each.

    Files already in ``dest`` with the right checksum are kept. Nothing is written unless every file
    was obtained, so a failure leaves earlier good data in place.
    """
    if not sources:
        raise DownloadError("No data sources are configured: set data.sources in params.yaml.")
    obtained: dict[str, tuple[str, bytes | None]] = {}
    failures: list[str] = []
    for file in files:
        local = dest / file.name
        if local.is_file() and hashlib.md5(local.read_bytes()).hexdigest() == file.md5:
            obtained[file.name] = ("cached", None)
            continue
        tried = []
        for source in sources:
            try:
                obtained[file.name] = (source, _fetch_one(source, file, timeout))
                log.info("%s: verified from %s", file.name, source)
                break
            except _SourceFailed as exc:
                log.warning("%s: source %s failed: %s", file.name, source, exc)
                tried.append(f"{source} ({exc})")
        else:
            failures.append(f"{file.name}: tried " + "; ".join(tried))
    if failures:
        raise DownloadError(
            "Could not get a verified copy of the dataset. "
            + " | ".join(failures)
            + ". Fix: install the Debian package (apt-get install dataset-fashion-mnist), or put "
            "a reachable mirror or folder holding the files in params.yaml data.sources."
        )
    for name, (_, blob) in obtained.items():
        if blob is not None:
            write_bytes(dest / name, blob)
    return {name: source for name, (source, _) in obtained.items()}


def parse_idx(blob: bytes, expected_ndim: int, name: str = "IDX file") -> np.ndarray:
    """Decode an IDX (unsigned byte) array, checking the header against the payload size."""
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise InvalidInput(f"{name} is not an unsigned-byte IDX file (bad magic number).")
    ndim = blob[3]
    if ndim != expected_ndim:
        raise InvalidInput(f"{name} has {ndim} dimensions, expected {expected_ndim}.")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(blob) - header != int(np.prod(shape)):
        raise InvalidInput(
            f"{name} is truncated: header says {shape}, payload is {len(blob) - header} bytes."
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8 and labels (N,) int64 of ``train`` or ``test``."""
    prefix = "train" if split == "train" else "t10k"
    images = parse_idx((folder / f"{prefix}-images-idx3-ubyte").read_bytes(), 3, f"{prefix} images")
    labels = parse_idx((folder / f"{prefix}-labels-idx1-ubyte").read_bytes(), 1, f"{prefix} labels")
    if len(images) != len(labels):
        raise InvalidInput(f"{split}: {len(images)} images but {len(labels)} labels.")
    return images[..., None].copy(), labels.astype(np.int64)
