"""Atomic file writes, shared by everything in the package that writes a file.

A file is written to a temporary name in the destination folder, flushed to disk and only
then moved over the destination with ``os.replace``: a reader, an interruption or a crash
never leaves half a file, and an error leaves the previous file untouched.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name beside ``path`` for the caller to write.

    When the block ends normally the file gets ordinary permissions (``mkstemp`` creates it
    0600), is synced to disk and replaces ``path``; when the block raises, the temporary
    file is removed and ``path`` is left as it was. ``suffix`` matters to writers that infer
    the format from the name (``.png``, ``.npz``).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, data: Union[str, bytes]) -> pathlib.Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return pathlib.Path(path)
