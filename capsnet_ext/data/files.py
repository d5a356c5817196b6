"""Where dataset files live, and how they are verified, downloaded and written.

Search order (``data_roots``): the ``data_dir`` argument, the folder named by ``$CAPSNET_DATA``,
then the user cache ``($XDG_CACHE_HOME or ~/.cache)/capsnet_ext/data``. Downloads go to the
user cache. Every write goes to a temporary file in the destination folder first and is moved
into place with ``os.replace`` only once complete and verified, so no reader ever sees half a
file and a failed download or a checksum mismatch leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import threading
import urllib.error
import urllib.request
from typing import Callable, Iterable, List, Optional, Sequence, Union

from .._atomic import atomic_path, atomic_write

DATA_ENV = "CAPSNET_DATA"

PathLike = Union[str, os.PathLike]


class DataNotFoundError(FileNotFoundError):
    """A dataset file is in none of the searched folders and could not be downloaded."""


class CorruptDataError(ValueError):
    """A dataset file exists but is damaged: wrong checksum, truncated or malformed."""


def user_cache_dir() -> pathlib.Path:
    """``($XDG_CACHE_HOME or ~/.cache)/capsnet_ext/data``: where downloads and generated caches go."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "capsnet_ext" / "data"


def data_roots(data_dir: Optional[PathLike] = None) -> List[pathlib.Path]:
    """Folders searched for dataset files, in order: ``data_dir``, ``$CAPSNET_DATA``, user cache.

    Each root holds one sub-folder per dataset (``mnist/``, ``fashion-mnist/``, ``cifar10/``,
    ...). Duplicates are dropped; folders that do not exist are still listed (so error messages
    can say where files were looked for).
    """
    roots: List[pathlib.Path] = []
    candidates = [data_dir, os.environ.get(DATA_ENV) or None, user_cache_dir()]
    for candidate in candidates:
        if candidate is None:
            continue
        path = pathlib.Path(candidate).expanduser()
        if path not in roots:
            roots.append(path)
    return roots


def md5sum(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)   # an integrity check, not a security one
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: PathLike, expected: Optional[str]) -> None:
    """Raise ``CorruptDataError`` naming ``path`` when its MD5 is not ``expected`` (None: no check)."""
    if expected is None:
        return
    actual = md5sum(path)
    if actual != expected:
        size = os.path.getsize(path)
        raise CorruptDataError(
            f"{path}: MD5 {actual} does not match the published {expected} ({size} bytes); the "
            f"file is corrupt or truncated. Nothing was overwritten: delete it, or replace it with "
            f"the original file, and try again.")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    atomic_write(path, data)


def atomic_save(path: PathLike, save: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``save(tmp_path)`` to write a temporary file beside ``path``, then move it into place."""
    with atomic_path(path, suffix=suffix) as tmp:
        save(tmp)


# Indirection so tests can simulate being offline without touching the network.
_urlopen = urllib.request.urlopen


def _copy_with_progress(response, out, name: str, chunk_size: int = 1 << 20) -> None:
    """Stream ``response`` into ``out``; a tqdm bar on a terminal (none in logs or CI)."""
    from tqdm.auto import tqdm
    total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
    with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
              desc=f"downloading {name}", disable=None, leave=False) as bar:
        for chunk in iter(lambda: response.read(chunk_size), b""):
            out.write(chunk)
            bar.update(len(chunk))


def download(urls: Sequence[str], destination: PathLike, md5: Optional[str] = None,
             timeout: float = 60.0) -> pathlib.Path:
    """Download the first of ``urls`` that works to ``destination``, verified and written atomically.

    The file is streamed to a temporary file in the destination folder; only when it is complete
    and its MD5 matches ``md5`` (when given) is it moved to ``destination``. A mirror that fails
    (network error, wrong checksum) is skipped for the next one. Raises ``DataNotFoundError``
    listing every URL and its error when none works.
    """
    destination = pathlib.Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    errors: List[str] = []
    for url in urls:
        try:
            # Only a complete file whose MD5 matches is moved into place.
            with atomic_path(destination, suffix=".part") as tmp:
                with open(tmp, "wb") as out, _urlopen(url, timeout=timeout) as response:
                    _copy_with_progress(response, out, destination.name)
                verify_md5(tmp, md5)
            return destination
        except (urllib.error.URLError, OSError, http.client.HTTPException, CorruptDataError,
                ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise DataNotFoundError("could not download " + destination.name + ":\n  " + "\n  ".join(errors))


def not_found_message(dataset: str, filenames: Iterable[str], searched: Iterable[pathlib.Path],
                      subdir: str, download_note: str, existed: Optional[dict] = None) -> str:
    """The error text for missing files: what was needed, every folder searched, how to fix it.

    ``existed`` maps folders to whether they existed when searched (a failed download may
    have created the cache folder since).
    """
    searched = list(searched)
    existed = existed or {}
    lines = [f"{dataset}: could not find {', '.join(filenames)}.", "Looked in:"]
    lines += [f"  {folder}" + ("" if existed.get(folder, folder.is_dir()) else "  (does not exist)")
              for folder in searched]
    lines.append(download_note)
    lines.append(
        f"To provide the files, put them in a folder named '{subdir}/' inside a data folder and "
        f"pass that data folder as data_dir (--data-dir) or set ${DATA_ENV} to it; files in "
        f"{user_cache_dir() / subdir} are found too.")
    return "\n".join(lines)


def find_file(names: Sequence[str], roots: Sequence[pathlib.Path], subdirs: Sequence[str]):
    """First existing ``root/subdir/name`` (roots outermost, then subdirs, then names), else None.

    Returns ``(path, name)``; also the list of folders searched, for error messages.
    """
    searched: List[pathlib.Path] = []
    for root in roots:
        for subdir in subdirs:
            folder = root / subdir
            searched.append(folder)
            for name in names:
                candidate = folder / name
                if candidate.is_file():
                    return candidate, name, searched
    return None, None, searched


def writable_dir(candidates: Sequence[pathlib.Path]) -> pathlib.Path:
    """First of ``candidates`` that exists (or can be created) and is writable."""
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise PermissionError("none of these folders is writable: " + ", ".join(map(str, candidates)))


def locate_file(dataset: str, filename: str, subdirs: Sequence[str],
                data_dir: Optional[PathLike] = None, download_missing: bool = True,
                mirrors: Sequence[str] = (), md5: Optional[str] = None,
                alternatives: Sequence[str] = (), manual_note: str = "") -> pathlib.Path:
    """Path of a dataset file: found under ``<root>/<subdir>/`` or downloaded to the user cache.

    Args:
        dataset: name used in messages.
        filename: the file to find (and the name downloaded from each mirror).
        subdirs: folder names searched inside every data root (the first is where downloads go).
        alternatives: other acceptable names (e.g. the uncompressed file), searched after it.
        mirrors: base URLs; ``mirror + "/" + filename`` is fetched, verified against ``md5``.
        manual_note: added to the error when the file cannot be found or downloaded.

    Raises ``DataNotFoundError`` naming every folder searched and every mirror tried.
    """
    roots = data_roots(data_dir)
    path, _, searched = find_file((filename, *alternatives), roots, subdirs)
    if path is not None:
        return path
    existed = {folder: folder.is_dir() for folder in searched}
    mirrors = tuple(mirrors)
    if download_missing and mirrors:
        destination = user_cache_dir() / subdirs[0] / filename
        urls = [mirror.rstrip("/") + "/" + filename for mirror in mirrors]
        try:
            return download(urls, destination, md5=md5)
        except DataNotFoundError as exc:
            note = f"Download failed (offline?):\n{exc}"
    elif not download_missing:
        note = "Downloading was switched off (download=False)."
    else:
        note = "No download mirror is configured."
    if manual_note:
        note += "\n" + manual_note
    raise DataNotFoundError(not_found_message(dataset, [filename], searched, subdirs[0], note, existed))


_memory_cache: dict = {}
_memory_lock = threading.Lock()


def cached_in_memory(paths: Sequence[PathLike], options: tuple, load: Callable[[], object]):
    """``load()`` once per process for these files (by path, size, mtime) and ``options``."""
    key = tuple((str(pathlib.Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                for p in paths) + (options,)
    with _memory_lock:
        if key in _memory_cache:
            return _memory_cache[key]
    value = load()
    with _memory_lock:
        _memory_cache[key] = value
    return value


def clear_memory_cache() -> None:
    """Forget every dataset decoded by ``cached_in_memory``."""
    with _memory_lock:
        _memory_cache.clear()
