"""The one atomic file writer and the one chunked file hash of medseg.

Every file medseg writes under a final name goes through :func:`atomic_path` (or its two shortcuts): the content
is written to a temporary name in the same folder (``.<name>.<random>.partial``) and renamed over the final name
only when it is complete, so a reader, a crash or a ``kill -9`` never leaves a half-written file under a final
name. A temporary left by a killed process starts with ``.`` and ends in ``.partial``; :func:`remove_partials`
clears them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PARTIAL_SUFFIX", "atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_partials",
           "sha256_file", "sha256_path"]

PARTIAL_SUFFIX = ".partial"


def _partial_name(path: Path, keep_suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}{keep_suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, keep_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block ends without error.

    Parameters
    ----------
    path : path
        The final file name. Its folder must exist.
    keep_suffix : str
        Appended to the temporary name, for writers that choose the format from the suffix (``".nii.gz"``).

    Raises
    ------
    OSError
        From the rename. On any error inside the block the temporary file is removed and the error propagates;
        an existing file at ``path`` is left untouched.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_path(folder / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
    ('done', ['a.txt'])
    """
    final = Path(path)
    tmp = _partial_name(final, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    final = Path(path)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return final


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries a killed writer left anywhere under ``folder``; return what was removed."""
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob(".*")):
        if PARTIAL_SUFFIX in p.name and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes`` (memory stays flat for large files).

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder (a DICOM series): the sha256 of the sorted lines
    ``<file sha256>  <relative path>`` of every file under it (hidden files skipped).

    Raises
    ------
    OSError
        If a file cannot be read.
    """
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    lines = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            lines.append(f"{sha256_file(f)}  {rel.as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
