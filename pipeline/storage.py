"""The one module that touches storage: local files, ``gs://`` (gcsfs) and ``memory://`` through fsspec.

Everything else in the pipeline passes URLs around and calls these functions, so retry policy,
emulator endpoints and the "never let a reader see a partial object" rule live in one place.

Rules this module enforces:
- Only ``file://`` (or a bare local path), ``gs://`` and ``memory://`` are accepted. ``pipe:`` and other
  schemes are refused up front: a data URL must never become a shell command.
- Objects are written whole or not at all. gcsfs uploads what was written even when a ``with fs.open(...)``
  block raises, so writers build the object locally (or in memory) first and upload it in one call.
- Directories that hold several objects (checkpoints, exports, shard sets) are complete only when their
  marker ``_COMPLETE.json`` exists; it is written last and checked on load.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Before gcsfs is first imported: otherwise each first access probes the bucket type over gRPC and
# waits about a minute on anything that is not the real GCS.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec

SUPPORTED_SCHEMES = ("file", "gs", "memory")
COMPLETE_MARKER = "_COMPLETE.json"
# Set to the emulator's URL (e.g. http://127.0.0.1:9023) to talk to a local GCS emulator; this is the
# variable the Google client libraries use too.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


class UnsupportedURLError(ValueError):
    """A URL whose scheme the pipeline does not read or write."""


class StorageError(RuntimeError):
    """A storage operation that failed in a way the caller should report, not retry."""


def scheme_of(url: str) -> str:
    # "pipe:" first: a pipe command may itself contain "://" ("pipe:gsutil cat gs://b/x.tar").
    if url.startswith("pipe:"):
        return "pipe"
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def check_url(url: str, *, field: str = "url") -> str:
    """Return ``url`` normalised (bare paths become absolute ``file://`` URLs) or raise a clear error."""
    if not isinstance(url, str) or not url.strip():
        raise UnsupportedURLError(f"{field}: expected a storage URL (file://, gs:// or memory://), got {url!r}")
    url = url.strip()
    scheme = scheme_of(url)
    if scheme == "pipe":
        raise UnsupportedURLError(
            f"{field}: 'pipe:' URLs run shell commands and are not allowed ({url!r}); "
            "point at the shards themselves, e.g. gs://bucket/train-{000000..000099}.tar"
        )
    if scheme not in SUPPORTED_SCHEMES:
        raise UnsupportedURLError(
            f"{field}: unsupported URL scheme {scheme!r} in {url!r}; use one of "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
            + " (or a local path)"
        )
    if scheme == "file":
        path = url[len("file://") :] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if scheme == "gs":
        bucket = url[len("gs://") :].split("/", 1)[0]
        if not bucket:
            raise UnsupportedURLError(f"{field}: {url!r} names no bucket; expected gs://<bucket>/<path>")
    return url


# Bounded waits on GCS. gcsfs makes up to GCS_ATTEMPTS attempts per request (its fixed policy), sleeping
# 1, 2, 4, 8, 16 s (+ up to 1 s each) between them. Each attempt gives up when the server sends nothing for
# ``request_timeout_s`` (while connecting, or between two reads): a large upload or download that keeps moving is
# never cut, while a bucket that accepts and never answers fails a call within
# GCS_ATTEMPTS * request_timeout_s + GCS_BACKOFF_S. Without it aiohttp waits 300 s per attempt (30 minutes a call).
GCS_ATTEMPTS = 6
GCS_BACKOFF_S = 36.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0
_request_timeout_s = DEFAULT_REQUEST_TIMEOUT_S


def set_request_timeout(seconds: float) -> None:
    """Seconds an attempt of a remote request may go without a byte from the server (``run.storage_timeout_s``)."""
    global _request_timeout_s
    if not seconds > 0:
        raise ValueError(f"storage request timeout must be > 0 seconds, got {seconds!r}")
    _request_timeout_s = float(seconds)


def worst_case_call_s() -> float:
    """How long one call to a hung bucket can wait before it raises, with the current request timeout."""
    return GCS_ATTEMPTS * _request_timeout_s + GCS_BACKOFF_S


def _gcs_filesystem() -> fsspec.AbstractFileSystem:
    import aiohttp

    # No total limit (a checkpoint partition of several GB takes minutes): a limit on silence instead.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=_request_timeout_s, sock_read=_request_timeout_s)
    endpoint = os.environ.get(EMULATOR_ENV)
    if endpoint:
        if not endpoint.startswith("http"):
            endpoint = "http://" + endpoint
        # An emulator has no credentials to check; "anon" also skips the metadata-server lookup.
        return fsspec.filesystem("gcs", endpoint_url=endpoint, token="anon", requests_timeout=timeout)
    return fsspec.filesystem("gcs", requests_timeout=timeout)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it that fsspec expects."""
    url = check_url(url)
    scheme = scheme_of(url)
    if scheme == "file":
        return fsspec.filesystem("file"), url[len("file://") :]
    if scheme == "gs":
        return _gcs_filesystem(), url[len("gs://") :]
    return fsspec.filesystem("memory"), "/" + url[len("memory://") :].lstrip("/")


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """``url`` as Ray Train's ``RunConfig(storage_filesystem, storage_path)`` takes it: a pyarrow filesystem wrapping
    this module's fsspec one (same endpoint, retries and timeouts) and the path inside it; ``(None, local path)``
    for ``file://``, which Ray reads with its own local filesystem."""
    local = local_path(url)
    if local is not None:
        return None, str(local)
    import pyarrow.fs

    fs, path = filesystem(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def to_url(url_like: str, path: str) -> str:
    """Turn a filesystem path returned by fsspec back into a URL with the scheme of ``url_like``."""
    scheme = scheme_of(check_url(url_like))
    if scheme == "file":
        return "file://" + path
    if scheme == "gs":
        return "gs://" + path.lstrip("/")
    return "memory://" + path.lstrip("/")


def join(url: str, *parts: str) -> str:
    url = check_url(url)
    scheme, rest = url.split("://", 1)
    return f"{scheme}://" + posixpath.join(rest, *parts)


def local_path(url: str) -> Path | None:
    """The local path of a ``file://`` URL, or None for remote storage."""
    url = check_url(url)
    return Path(url[len("file://") :]) if scheme_of(url) == "file" else None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """URLs of the direct children of ``url`` (empty when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(to_url(url, p) for p in fs.ls(path, detail=False) if p.rstrip("/") != path.rstrip("/"))


def glob(pattern: str) -> list[str]:
    fs, path = filesystem(pattern)
    return sorted(to_url(pattern, p) for p in fs.glob(path))


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


# Streaming reads of remote objects (tar shards) fetch this much per request. gcsfs's default adaptive cache
# was seen issuing one small range request per read() call: ~400x slower on a sequential tar scan.
STREAM_BLOCK_SIZE = 16 * 2**20
SMALL_READ_BLOCK_SIZE = 64 * 2**10


def open_read(url: str, *, streaming: bool = False, small_reads: bool = False) -> IO[bytes]:
    """Open an object for reading; ``streaming=True`` for one sequential pass (large read-ahead blocks),
    ``small_reads=True`` for a few reads at scattered offsets (an archive's headers): gcsfs would otherwise
    fetch several MiB after each seek."""
    fs, path = filesystem(url)
    if streaming and scheme_of(url) == "gs":
        return fs.open(path, "rb", block_size=STREAM_BLOCK_SIZE, cache_type="readahead")
    if small_reads and scheme_of(url) == "gs":
        return fs.open(path, "rb", block_size=SMALL_READ_BLOCK_SIZE, cache_type="bytes")
    return fs.open(path, "rb")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode())


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: readers see the old object, no object, or all of ``data``."""
    fs, path = filesystem(url)
    if scheme_of(url) == "file":
        _atomic_local_write(Path(path), data)
        return
    fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def put_file(local: str | os.PathLike, url: str) -> None:
    """Upload a finished local file as one object (never a partly written one)."""
    fs, path = filesystem(url)
    if scheme_of(url) == "file":
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        _replace_durably(fd, tmp, dest, lambda f: _copy_into(local, f))
        return
    fs.put_file(os.fspath(local), path)


def get_file(url: str, local: str | os.PathLike) -> None:
    fs, path = filesystem(url)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, os.fspath(local))


def upload_dir(local_dir: str | os.PathLike, url: str) -> list[str]:
    """Upload every file below ``local_dir`` to ``url``; returns the relative paths uploaded."""
    local_dir = Path(local_dir)
    uploaded = []
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        put_file(file, join(url, rel))
        uploaded.append(rel)
    return uploaded


def download_dir(url: str, local_dir: str | os.PathLike) -> list[str]:
    """Download every object below ``url`` into ``local_dir``; returns the relative paths."""
    fs, path = filesystem(url)
    base = path.rstrip("/")
    fetched = []
    for remote in sorted(fs.find(base)):
        rel = remote[len(base) :].lstrip("/")
        get_file(to_url(url, remote), Path(local_dir) / rel)
        fetched.append(rel)
    return fetched


def remove(url: str, *, recursive: bool = True) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def mark_complete(url: str, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker of the directory ``url``; call it after every other object is written."""
    write_json(join(url, COMPLETE_MARKER), info or {})


def read_marker(url: str) -> dict[str, Any] | None:
    """The completion marker of directory ``url``, or None when the directory is incomplete."""
    marker = join(url, COMPLETE_MARKER)
    if not exists(marker):
        return None
    try:
        return read_json(marker)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"completion marker {marker} is unreadable ({exc}); delete that directory") from exc


def is_complete(url: str) -> bool:
    return exists(join(url, COMPLETE_MARKER))


def _atomic_local_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    _replace_durably(fd, tmp, dest, lambda f: f.write(data))


def _copy_into(local: str | os.PathLike, f: IO[bytes]) -> None:
    with open(local, "rb") as src:
        shutil.copyfileobj(src, f, 4 * 2**20)


def _replace_durably(fd: int, tmp: str, dest: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Fill the temp file ``tmp`` (open as ``fd``), make its bytes durable, rename it to ``dest`` and make the
    rename durable; on any failure (a full disk included) remove the temp file and raise.

    Without the two fsyncs a power loss can leave the new name pointing at an empty or partial file, or lose
    the rename, while a completion marker written (and synced) after it survives: the marker would then vouch
    for files that are not there."""
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users of a shared filesystem
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
