"""WebDataset shard sets: naming, the manifest, writing whole shards, and reading samples back with corruption checks.

A shard set is ``<split>-000000.tar, <split>-000001.tar, ...`` plus ``<split>.manifest.json`` in one directory.
Each sample is two tar members sharing a key: ``<key>.jpg`` (the encoded image) and ``<key>.cls`` (the integer
label as ASCII). The tars are plain WebDataset shards: ``webdataset.WebDataset(url)`` reads them too.

The manifest is written after the last shard and is the completion marker of the set: a reader that finds it
knows every shard it lists is complete, with the listed size and hash.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from pipeline import storage
from pipeline.data.config import DataError

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "vitpipe-webdataset/1"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}{MANIFEST_SUFFIX}"


def is_manifest_url(url: str) -> bool:
    return url.endswith(MANIFEST_SUFFIX)


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of a shard set, with ``shard_urls`` added (absolute URLs of its shards, in order)."""
    url = storage.check_url(url, field="manifest")
    if not storage.exists(url):
        raise DataError(
            f"manifest {url} does not exist: the shard set is missing or its conversion did not finish "
            "(the manifest is written last); run jobs/prepare_data.py again"
        )
    try:
        manifest = storage.read_json(url)
    except ValueError as exc:
        raise DataError(f"manifest {url} is not valid JSON ({exc}); rewrite it with jobs/prepare_data.py") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{url} is not a shard-set manifest of format {MANIFEST_FORMAT!r}")
    base = url.rsplit("/", 1)[0]
    manifest["shard_urls"] = [storage.join(base, shard["name"]) for shard in manifest["shards"]]
    return manifest


def expand_urls(pattern: str) -> list[str]:
    """Shard URLs named by a brace pattern (``.../train-{000000..000127}.tar``) or a manifest URL."""
    pattern = storage.check_url(pattern, field="shards")
    if is_manifest_url(pattern):
        return read_manifest(pattern)["shard_urls"]
    return [storage.check_url(url, field="shards") for url in braceexpand.braceexpand(pattern)]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed metadata so that converting the same data twice gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


@dataclass
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes samples into ``<split>-NNNNNN.tar`` shards under ``out_url``, each built locally and uploaded whole.

    A shard is closed when it reaches ``max_bytes`` or ``max_samples``. Shards whose bytes equal those of an
    existing object recorded in ``previous`` (the manifest of an earlier run) are not uploaded again.
    """

    def __init__(
        self,
        out_url: str,
        split: str,
        *,
        max_bytes: int,
        max_samples: int | None = None,
        previous: dict[str, Any] | None = None,
    ) -> None:
        self.out_url = storage.check_url(out_url, field="--out")
        self.split = split
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.records: list[ShardRecord] = []
        self.uploaded = 0
        self.skipped = 0
        self._previous = {s["name"]: s for s in (previous or {}).get("shards", [])}
        self._tmpdir = tempfile.TemporaryDirectory(prefix="shards-")
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0
        self._keys: set[str] = set()

    def write(self, key: str, image: bytes, label: int) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits names at the dot)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        assert self._tar is not None and self._path is not None
        for ext, data in ((IMAGE_EXT, image), (LABEL_EXT, str(int(label)).encode())):
            self._tar.addfile(*_tar_member(f"{key}.{ext}", data))
        self._count += 1
        # The tar's size on disk so far (headers + padded data); close before the limit would be passed.
        if self._tar.offset >= self.max_bytes or (self.max_samples and self._count >= self.max_samples):
            self._close_shard()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.records))
        self._path = Path(self._tmpdir.name) / name
        # Kept open across write() calls and closed in _close_shard(), so no context manager here.
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._count = 0

    def _close_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        data = self._path.read_bytes()
        record = ShardRecord(self._path.name, self._count, len(data), hashlib.sha256(data).hexdigest())
        url = storage.join(self.out_url, record.name)
        before = self._previous.get(record.name)
        if before and before["sha256"] == record.sha256 and storage.exists(url) and storage.size(url) == record.bytes:
            self.skipped += 1
        else:
            # One call with a finished file: a reader never sees a partly uploaded shard.
            storage.put_file(self._path, url)
            self.uploaded += 1
        self._path.unlink()
        self.records.append(record)
        self._tar = None
        self._path = None

    def close(self) -> list[ShardRecord]:
        if self._tar is not None and self._count > 0:
            self._close_shard()
        elif self._tar is not None:
            self._tar.close()
            self._tar = None
        self._tmpdir.cleanup()
        return self.records


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class RawSample:
    """One sample as stored: the key, the encoded image and the label, or why it is unusable."""

    key: str
    image: bytes | None = None
    label: int | None = None
    error: str | None = None


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything before the first dot of the file name.
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _finish(key: str, members: dict[str, bytes], duplicate: bool) -> RawSample:
    if duplicate:
        return RawSample(key, error="duplicate key (already seen in this shard)")
    image = members.get(IMAGE_EXT) or members.get("jpeg") or members.get("png")
    if image is None:
        return RawSample(key, error=f"no image member (.jpg/.jpeg/.png) among {sorted(members)}")
    raw_label = members.get(LABEL_EXT)
    if raw_label is None:
        return RawSample(key, error="missing label (.cls)")
    try:
        label = int(raw_label.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return RawSample(key, error=f"label is not an integer: {raw_label[:20]!r}")
    if label < 0:
        return RawSample(key, error=f"negative label {label}")
    return RawSample(key, image=image, label=label)


class _EndCheckedTarInfo(tarfile.TarInfo):
    """Notes on the archive whether iteration stopped at a real end-of-archive block.

    ``tarfile`` ends iteration silently when the data stops at (or inside) a member header after the first one,
    or when such a header is garbage: a shard cut at a member boundary would otherwise lose its remaining
    samples without a single error. Only an all-zero block is a real end.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.vitpipe_end_of_archive = True  # type: ignore[attr-defined]
            raise


def iter_shard(url: str) -> Iterator[RawSample]:
    """Samples of one tar shard in stored order; broken ones come back with ``error`` set, never raised.

    A truncated or otherwise unreadable tar ends the shard with one error sample (carrying the key of the sample
    being read, whose members may be incomplete), also when the cut falls exactly between two members. Storage
    failures are not data errors: a missing shard raises ``DataError``, any other failure to read (after the
    storage client's retries) ``storage.StorageError``. Members other than the image and the label (e.g.
    ``.json`` metadata) are ignored. Nothing is unpickled.
    """
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    duplicate = False
    try:
        with (
            storage.open_read(url, streaming=True) as f,
            tarfile.open(fileobj=f, mode="r|", tarinfo=_EndCheckedTarInfo) as tar,
        ):
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _split_name(info.name)
                if member_key != key:
                    if key is not None:
                        yield _finish(key, members, duplicate)
                    duplicate = member_key in seen
                    seen.add(member_key)
                    key, members = member_key, {}
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                if ext in members:
                    duplicate = True
                members[ext] = data
            if not getattr(tar, "vitpipe_end_of_archive", False):
                raise tarfile.ReadError("archive ends without its end-of-archive block (truncated or damaged)")
    except (tarfile.TarError, EOFError) as exc:
        yield RawSample(key or "<tar>", error=f"unreadable tar ({type(exc).__name__}: {exc})")
        return
    except FileNotFoundError as exc:
        raise DataError(f"shard {url} does not exist (any more): {exc}") from exc
    except Exception as exc:
        # The storage failed (outage past the client's retries, access denied...), not the data: counting this
        # as one bad sample would quietly drop the rest of the shard. Fail instead; a restart resumes exactly.
        raise storage.StorageError(
            f"reading shard {url} failed ({type(exc).__name__}: {str(exc)[:300]}); no sample of it was skipped"
        ) from exc
    if key is not None:
        yield _finish(key, members, duplicate)
