"""Where dataset files live, and how they are verified, downloaded and written.

Search order (``data_roots``): the ``data_dir`` argument, the folder named by ``$CAPSNET_DATA``,
then the user cache ``($XDG_CACHE_HOME or ~/.cache)/capsnet_ext/data``. Downloads go to the
user cache. Every write goes to a temporary file in the destination folder first and is moved
into place with ``os.replace`` only once complete and verified, so no reader ever sees half a
file; a failed or interrupted download (network or HTTP error, checksum mismatch, damaged
file, Ctrl-C) removes its partial file and any folder it created. docs/data.md lists the
files, their download locations and how to fetch them by hand.
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
    """A dataset file is in none of the searched folders and could not be downloaded.

    ``attempts``: the ``(url, reason)`` of every download tried (empty when none was).
    """

    attempts: tuple = ()


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

# How a user switches downloading on, for messages (the commands download by default).
DOWNLOAD_HOWTO = ("`capsnet-ext train` and `capsnet-ext eval` download missing files unless given "
                  "--no-download, and so does `capsnet-ext demo` for MNIST; from "
                  "Python, pass download=True to build_datasets")


def _copy_with_progress(response, out, name: str, chunk_size: int = 1 << 20) -> int:
    """Stream ``response`` into ``out``; a tqdm bar on a terminal (none in logs or CI).

    Returns the number of bytes copied; raises ``CorruptDataError`` when the server announced
    a ``Content-Length`` and sent a different number of bytes (a connection cut short).
    """
    from tqdm.auto import tqdm
    headers = getattr(response, "headers", None)
    total = headers.get("Content-Length") if headers is not None else None
    try:
        total = int(total) if total else None
    except ValueError:
        total = None
    copied = 0
    with tqdm(total=total, unit="B", unit_scale=True,
              desc=f"downloading {name}", disable=None, leave=False) as bar:
        for chunk in iter(lambda: response.read(chunk_size), b""):
            out.write(chunk)
            copied += len(chunk)
            bar.update(len(chunk))
    if total is not None and copied != total:
        raise CorruptDataError(f"received {copied} of the {total} bytes announced (the "
                               f"connection was cut short)")
    return copied


def check_gzip(path: PathLike, name: Optional[str] = None, chunk_size: int = 1 << 20) -> None:
    """Raise ``CorruptDataError`` unless ``path`` is a complete, readable gzip file."""
    import gzip
    import zlib
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(chunk_size):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptDataError(f"{name or path}: not a complete gzip file ({exc})") from exc


def _reason(exc: BaseException) -> str:
    """A short, readable reason for a failed download attempt."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _make_folders(folder: pathlib.Path) -> List[pathlib.Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing: List[pathlib.Path] = []
    current = folder
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _remove_empty_folders(missing)
        raise
    return missing


def _remove_empty_folders(folders: Sequence[pathlib.Path]) -> None:
    """``rmdir`` each of ``folders`` (deepest first) while they are empty; never a full one."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty (another process put a file there), or already gone
            break


def download(urls: Sequence[str], destination: PathLike, md5: Optional[str] = None,
             timeout: float = 20.0,
             validate: Optional[Callable[[str, str], None]] = None) -> pathlib.Path:
    """Download the first of ``urls`` that works to ``destination``, verified and written atomically.

    The file is streamed to a temporary file in the destination folder; only when it is complete
    (as many bytes as the server announced), its MD5 matches ``md5`` (when given) and
    ``validate(tmp_path, filename)`` accepts it (by default, for a ``.gz`` file without an MD5,
    that it decompresses) is it moved to ``destination``. A mirror that fails (network error,
    HTTP error, wrong checksum, damaged file) is skipped for the next one. On any failure,
    including an interruption, the partial file is removed and so is every folder this call
    created. Raises ``DataNotFoundError`` listing every URL and why it failed when none works;
    its ``attempts`` attribute holds the ``(url, reason)`` pairs.
    """
    destination = pathlib.Path(destination)
    if validate is None and md5 is None and destination.name.endswith(".gz"):
        validate = lambda path, name: check_gzip(path, name)   # noqa: E731
    attempts: List[tuple] = []
    created: List[pathlib.Path] = []
    try:
        try:
            created = _make_folders(destination.parent)
        except OSError as exc:
            attempts.append(("(none tried)", f"cannot create {destination.parent}: {exc}"))
            urls = ()
        for url in urls:
            try:
                # Only a complete file that passes its checks is moved into place; the
                # temporary file is removed on any error, KeyboardInterrupt included.
                with atomic_path(destination, suffix=".part") as tmp:
                    with open(tmp, "wb") as out, _urlopen(url, timeout=timeout) as response:
                        _copy_with_progress(response, out, destination.name)
                    if md5 is not None:
                        actual = md5sum(tmp)
                        if actual != md5:
                            raise CorruptDataError(
                                f"MD5 {actual} of the {os.path.getsize(tmp)} bytes received does "
                                f"not match the published {md5}")
                    if validate is not None:
                        validate(tmp, destination.name)
                return destination
            except (urllib.error.URLError, OSError, http.client.HTTPException, CorruptDataError,
                    ValueError, EOFError) as exc:
                attempts.append((url, _reason(exc)))
    except BaseException:
        _remove_empty_folders(created)
        raise
    _remove_empty_folders(created)
    error = DataNotFoundError(
        f"could not download {destination.name} into {destination.parent}; tried:\n  "
        + "\n  ".join(f"{url}: {reason}" for url, reason in attempts)
        + "\nNothing was left behind: no partial file"
        + (", and the folders this attempt created were removed." if created else "."))
    error.attempts = attempts
    raise error


def not_found_message(dataset: str, filenames: Iterable[str], searched: Iterable[pathlib.Path],
                      subdir: str, download_note: str, existed: Optional[dict] = None,
                      urls: Sequence[str] = (), manual_note: str = "") -> str:
    """The error text for missing files: what was needed, every folder searched, how to fix it.

    ``existed`` maps folders to whether they existed when searched; ``urls`` are the places
    the files can be downloaded from (listed so they can be fetched by hand); ``manual_note``
    follows them (e.g. how to fetch every file of the dataset).
    """
    searched = list(searched)
    existed = existed or {}
    lines = [f"{dataset}: could not find {', '.join(filenames)}.",
             "Looked in these folders, in this order:"]
    lines += [f"  {folder}" + ("" if existed.get(folder, folder.is_dir()) else "  (does not exist)")
              for folder in searched]
    lines.append(download_note)
    if urls:
        lines.append("It can be downloaded from:")
        lines += [f"  {url}" for url in urls]
    if manual_note:
        lines.append(manual_note)
    lines.append(
        f"To use files you have, put them in a folder named '{subdir}/' inside a data folder and "
        f"pass that data folder with --data-dir (data_dir= from Python) or set ${DATA_ENV} to "
        f"it; files in {user_cache_dir() / subdir} are found too. See docs/data.md.")
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
                alternatives: Sequence[str] = (), manual_note: str = "",
                validate: Optional[Callable[[str, str], None]] = None) -> pathlib.Path:
    """Path of a dataset file: found under ``<root>/<subdir>/`` or downloaded to the user cache.

    Args:
        dataset: name used in messages.
        filename: the file to find (and the name downloaded from each mirror).
        subdirs: folder names searched inside every data root (the first is where downloads go).
        alternatives: other acceptable names (e.g. the uncompressed file), searched after it.
        mirrors: base URLs; ``mirror + "/" + filename`` is fetched, verified against ``md5``.
        manual_note: added to the error when the file cannot be found or downloaded.
        validate: ``validate(tmp_path, filename)`` checks a downloaded file before it is kept
            (see ``download``).

    Raises ``DataNotFoundError`` naming the file, every folder searched (in order), the URLs it
    can be downloaded from and how to download it or point ``$CAPSNET_DATA`` at it; after a
    failed download also every URL tried and why it failed (its ``attempts`` attribute holds
    the ``(url, reason)`` pairs). A failed download leaves no file and no new empty folder.
    """
    roots = data_roots(data_dir)
    path, _, searched = find_file((filename, *alternatives), roots, subdirs)
    if path is not None:
        return path
    existed = {folder: folder.is_dir() for folder in searched}
    mirrors = tuple(mirrors)
    urls = [mirror.rstrip("/") + "/" + filename for mirror in mirrors]
    attempts: list = []
    if download_missing and mirrors:
        destination = user_cache_dir() / subdirs[0] / filename
        try:
            return download(urls, destination, md5=md5, validate=validate)
        except DataNotFoundError as exc:
            attempts = list(getattr(exc, "attempts", []))
            note = f"Downloading it failed (offline, or the mirrors are unreachable): {exc}"
    elif not download_missing:
        note = f"Downloading was switched off for this call. To download it: {DOWNLOAD_HOWTO}."
    else:
        note = "No download mirror is configured for it."
    wanted = filename + (f" (or {', '.join(alternatives)})" if alternatives else "")
    error = DataNotFoundError(not_found_message(dataset, [wanted], searched, subdirs[0], note,
                                                existed, urls=urls, manual_note=manual_note))
    error.attempts = attempts
    raise error


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
