"""WebDataset shard sets: naming, the manifest, writing whole shards, and reading samples back with corruption checks.

A shard set is ``<split>-000000.tar, <split>-000001.tar, ...`` plus ``<split>.manifest.json`` in one directory.
Each sample is two tar members sharing a key: ``<key>.cls`` (the integer label as ASCII) and ``<key>.jpg`` (the
encoded image). The tars are plain WebDataset shards, written with ``webdataset.ShardWriter`` and grouped into
samples on reading with ``webdataset``'s own key grouping: ``webdataset.WebDataset(url)`` reads them too.

The manifest is written after the last shard and is the completion marker of the set: a reader that finds it
knows every shard it lists is complete, with the listed size and hash.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import braceexpand
import webdataset
from webdataset.tariterators import base_plus_ext, group_by_keys

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
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise DataError(f"manifest {url} has no 'shards' list; rewrite it with jobs/prepare_data.py")
    for i, shard in enumerate(entries):
        _check_shard_entry(url, i, shard)
    counted = sum(shard["samples"] for shard in entries)
    if manifest.get("num_samples") != counted:
        raise DataError(
            f"manifest {url}: num_samples is {manifest.get('num_samples')!r} but its shards hold {counted} samples "
            "(the step count is derived from it); rewrite the manifest with jobs/prepare_data.py"
        )
    base = url.rsplit("/", 1)[0]
    manifest["shard_urls"] = [storage.join(base, shard["name"]) for shard in entries]
    # What each shard must hold, checked by the pre-flight (bytes, from the store's listing) and the loaders
    # (samples, as read): a shard that lost samples must not pass for a complete one.
    manifest["shard_samples"] = [shard["samples"] for shard in entries]
    manifest["shard_bytes"] = [shard.get("bytes") for shard in entries]
    return manifest


def _check_shard_entry(url: str, index: int, shard: Any) -> None:
    """A manifest's shard entry names a file in the manifest's own directory and says how many samples it holds."""
    name = shard.get("name") if isinstance(shard, dict) else None
    where = f"manifest {url}: shard entry {index} ({name!r})"
    # A name with a separator, or "..", would resolve outside the shard set: to any file the job can read.
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DataError(
            f"{where} is not a plain file name beside the manifest (no '/', '\\' or '..'); shards must sit in "
            "the manifest's directory: fix the entry or rewrite the manifest with jobs/prepare_data.py"
        )
    samples = shard.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise DataError(
            f"{where} has no valid 'samples' count ({samples!r}); the loaders check every shard against it: "
            "rewrite the manifest with jobs/prepare_data.py"
        )
    size = shard.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise DataError(f"{where} has an invalid 'bytes' size ({size!r}); rewrite the manifest")


def expand_urls(pattern: str) -> list[str]:
    """Shard URLs named by a brace pattern (``.../train-{000000..000127}.tar``) or a manifest URL."""
    pattern = storage.check_url(pattern, field="shards")
    if is_manifest_url(pattern):
        return read_manifest(pattern)["shard_urls"]
    return [storage.check_url(url, field="shards") for url in braceexpand.braceexpand(pattern)]


def parse_label(raw: bytes | None) -> tuple[int | None, str | None]:
    """(label, None) from a ``.cls`` member, or (None, why it is not a label)."""
    if raw is None:
        return None, "missing label (.cls)"
    try:
        label = int(bytes(raw).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"label is not an integer: {bytes(raw)[:20]!r}"
    if label < 0:
        return None, f"negative label {label}"
    return label, None


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes samples into ``<split>-NNNNNN.tar`` shards under ``out_url``, each built locally and uploaded whole.

    ``webdataset.ShardWriter`` fills the shards: one is closed once its samples hold ``max_bytes`` of data or it
    has ``max_samples`` samples. Each closed shard is hashed and uploaded in one call, so a reader never sees a
    partly uploaded shard; one whose bytes equal those of an existing object recorded in ``previous`` (the
    manifest of an earlier run) is not uploaded again.
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
        self.records: list[ShardRecord] = []
        self.uploaded = 0
        self.skipped = 0
        self._previous = {s["name"]: s for s in (previous or {}).get("shards", [])}
        self._tmpdir = tempfile.TemporaryDirectory(prefix="shards-")
        self._file: IO[bytes] | None = None
        self._count = 0  # samples in the shard being written
        self._keys: set[str] = set()
        self._closed = False
        self._shards = webdataset.ShardWriter(
            f"{self._tmpdir.name}/{split}-%06d.tar",
            maxcount=max_samples or sys.maxsize,
            maxsize=max_bytes,
            post=self._finish_shard,
            opener=self._open_local,
            verbose=0,
            # Fixed metadata, so that converting the same data twice gives byte-identical shards.
            mtime=0,
            user="",
            group="",
            mode=0o644,
        )

    def write(self, key: str, image: bytes, label: int) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits names at the dot)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        self._shards.write({"__key__": key, IMAGE_EXT: image, LABEL_EXT: int(label)})
        self._count += 1

    def _open_local(self, path: str) -> IO[bytes]:
        # Kept open across write() calls and closed in _finish_shard(), so no context manager here.
        self._file = open(path, "wb")  # noqa: SIM115
        return self._file

    def _finish_shard(self, path_name: str) -> None:
        assert self._file is not None
        self._file.close()  # webdataset's TarWriter leaves a file it was handed open
        path = Path(path_name)
        count, self._count = self._count, 0
        if count == 0:  # webdataset opens the first shard before any sample arrives
            path.unlink()
            return
        data = path.read_bytes()
        record = ShardRecord(path.name, count, len(data), hashlib.sha256(data).hexdigest())
        url = storage.join(self.out_url, record.name)
        before = self._previous.get(record.name)
        if before and before["sha256"] == record.sha256 and storage.exists(url) and storage.size(url) == record.bytes:
            self.skipped += 1
        else:
            # One call with a finished file: a reader never sees a partly uploaded shard.
            storage.put_file(path, url)
            self.uploaded += 1
        path.unlink()
        self.records.append(record)

    def close(self) -> list[ShardRecord]:
        """Finish and upload the last shard; the records of all shards, in order."""
        self._shards.close()
        self._tmpdir.cleanup()
        self._closed = True
        return self.records

    def discard(self) -> None:
        """Drop the shard being written, without uploading it (the shards before it are complete and stay)."""
        if self._closed:
            return
        self._closed = True
        self._shards.post = None
        self._shards.close()
        if self._file is not None:
            self._file.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:  # an interrupted conversion: its last shard is incomplete
            self.discard()


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class RawSample:
    """One sample as stored: the key, the encoded image and the label, or why it is unusable."""

    key: str
    image: bytes | None = None
    label: int | None = None
    error: str | None = None
    labels: tuple[int, ...] | None = None  # every class of a multi-label sample (``label`` is the first)


DUPLICATE = "duplicate key (already seen in this shard)"


def label_field_of(manifest: dict[str, Any] | None) -> str | None:
    """The ``.json`` field the labels are read from: the one an index-only manifest names (``{jpg, json}`` shards
    as published), ``labels`` for converted multi-label shards; None: ``.cls`` alone."""
    if not manifest:
        return None
    field = (manifest.get("source") or {}).get("label_field")
    return field or ("labels" if manifest.get("multi_label") else None)


def parse_json_label(raw: bytes | None, field: str) -> tuple[int | None, tuple[int, ...] | None, str | None]:
    """(first label, all labels or None for a single one, None) from field ``field`` of a ``.json`` member, or
    (None, None, why it is not a label)."""
    try:
        value = json.loads(bytes(raw)).get(field) if raw is not None else None
    except (ValueError, AttributeError):
        return None, None, f".json member is not a JSON object: {bytes(raw)[:20]!r}"
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None, None, f".json field {field!r} is not a label (a non-negative integer or a list of them)"
    return values[0], (tuple(values) if isinstance(value, list) else None), None


def _raw_sample(sample: dict[str, Any], duplicate: bool, label_field: str | None = None) -> RawSample:
    """A sample as ``group_by_keys`` gives it ({"__key__": ..., "<ext>": bytes}) checked and unpacked."""
    key = sample["__key__"]
    if duplicate:
        return RawSample(key, error=DUPLICATE)
    image = sample.get(IMAGE_EXT) or sample.get("jpeg") or sample.get("png")
    if image is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return RawSample(key, error=f"no image member (.jpg/.jpeg/.png) among {members}")
    if label_field is not None and "json" in sample:
        label, labels, error = parse_json_label(sample["json"], label_field)
        if error is None or LABEL_EXT not in sample:
            return RawSample(key, error=error) if error else RawSample(key, image=image, label=label, labels=labels)
    label, error = parse_label(sample.get(LABEL_EXT))
    if error is not None:
        return RawSample(key, error=error)
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


class _ShardReader:
    """The members of one tar, fed to ``webdataset``'s ``group_by_keys``, and what went wrong on the way."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.grouping: str | None = None  # key of the sample ``group_by_keys`` holds (the last member passed on)
        self.reading: str | None = None  # key of the member being read (its header is parsed)
        self.duplicates: set[str] = set()
        self._split: tuple[str, tuple[str | None, str | None]] = ("", (None, None))

    def split_name(self, name: str) -> tuple[str | None, str | None]:
        """``base_plus_ext``, remembering the last name: ``group_by_keys`` splits each name again right after
        ``members`` did, and the regular expression is a large part of the cost of reading a sample."""
        if self._split[0] != name:
            self._split = (name, base_plus_ext(name))
        return self._split[1]

    def members(self, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
        """The regular members in stored order, as ``tariterators.tar_file_iterator`` yields them; raises
        ``tarfile.ReadError`` where the archive is cut or damaged."""
        # Not tar_file_iterator: it opens the tar itself, so a cut at a member boundary would end it quietly.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndCheckedTarInfo) as tar:
            for info in tar:
                key = self.split_name(info.name)[0]
                if not info.isfile() or key is None:  # a name without an extension is no sample's (webdataset)
                    continue
                self.reading = key
                try:
                    extracted = tar.extractfile(info)
                    data = extracted.read() if extracted is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is truncated")
                except (tarfile.TarError, EOFError):
                    if self.reading != self.grouping:
                        yield {}  # webdataset's end-of-shard marker: the sample before this one is whole
                    raise
                self.grouping = self.reading
                yield {"fname": info.name, "data": data, "__url__": self.url}
            if not getattr(tar, "vitpipe_end_of_archive", False):
                raise tarfile.ReadError("archive ends without its end-of-archive block (truncated or damaged)")

    def on_group_error(self, exc: Exception) -> bool:
        """``group_by_keys``'s handler: a member name repeated within a sample makes that sample a duplicate."""
        if not isinstance(exc, ValueError) or self.grouping is None:
            return False
        self.duplicates.add(self.grouping)
        return True


def iter_shard(url: str, label_field: str | None = None) -> Iterator[RawSample]:
    """Samples of one tar shard in stored order; broken ones come back with ``error`` set, never raised.

    A truncated or otherwise unreadable tar ends the shard with one error sample (carrying the key of the sample
    being read, whose members may be incomplete), also when the cut falls exactly between two members. Storage
    failures are not data errors: a missing or forbidden shard raises ``DataError``, any other failure to read
    (after the storage client's retries) ``storage.StorageError``. Labels come from ``.cls``, or with
    ``label_field`` from that field of the ``.json`` member where a sample has one (`label_field_of` says which
    field a manifest's shards use); other members are ignored. Nothing is unpickled.
    """
    reader = _ShardReader(url)
    seen: set[str] = set()
    try:
        with storage.open_read(url, streaming=True) as f:
            grouped = group_by_keys(reader.members(f), keys=reader.split_name, handler=reader.on_group_error)
            for sample in grouped:
                key = sample["__key__"]
                yield _raw_sample(sample, key in seen or key in reader.duplicates, label_field)
                seen.add(key)
    except (tarfile.TarError, EOFError) as exc:
        yield RawSample(reader.reading or "<tar>", error=f"unreadable tar ({type(exc).__name__}: {exc})")
    except FileNotFoundError as exc:
        raise DataError(f"shard {url} does not exist (any more): {exc}") from exc
    except Exception as exc:
        if isinstance(exc, PermissionError) or str(exc).startswith("Forbidden"):  # gcsfs: OSError("Forbidden: ...")
            # Refused, not failed: no retry or restart changes that (a DataError, see pipeline.pretrain.stops).
            raise DataError(f"shard {url} cannot be read: access denied ({str(exc)[:300]})") from exc
        # The storage failed (outage past the client's retries...), not the data: counting this as one bad sample
        # would quietly drop the rest of the shard. Fail instead; a restart resumes exactly.
        raise storage.StorageError(
            f"reading shard {url} failed ({type(exc).__name__}: {str(exc)[:300]}); no sample of it was skipped"
        ) from exc
