"""What a data URL names -- its shard URLs and manifest, several ``::``-joined sources read as one set -- and the
pre-flight check that every engine and loader relies on before any cluster work starts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from pipeline import storage
from pipeline.data import shards as shardlib
from pipeline.data.config import DataConfig, DataError, DataInfo, split_sources


def resolve(url: str) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs and the manifest (None for a brace pattern); several ``::``-joined sources are read as one."""
    parts = split_sources(url)
    sources = [_resolve_one(part) for part in parts]
    if len(sources) == 1:
        return sources[0]
    urls = [u for source_urls, _ in sources for u in source_urls]
    manifests = [manifest for _, manifest in sources]
    if any(m is None for m in manifests):
        return urls, None  # a brace pattern among them: nothing is known about the whole
    first = manifests[0]
    for part, m in zip(parts[1:], manifests[1:], strict=True):
        if m["num_classes"] != first["num_classes"] or m.get("class_names") != first.get("class_names"):
            raise DataError(
                f"{part} has other classes ({m['num_classes']}: {m.get('class_names')}) than "
                f"{parts[0]} ({first['num_classes']}: {first.get('class_names')}); only splits of "
                "one dataset can be read as one"
            )
    counts = [m.get("class_counts") for m in manifests]
    merged = {
        **first,
        "shard_urls": urls,
        "shard_samples": [n for m in manifests for n in m["shard_samples"]],
        "shard_bytes": [n for m in manifests for n in m["shard_bytes"]],
        "num_samples": sum(m["num_samples"] for m in manifests),
        "class_counts": [sum(c) for c in zip(*counts, strict=True)] if all(counts) else None,
    }
    return urls, merged


def _resolve_one(url: str) -> tuple[list[str], dict[str, Any] | None]:
    try:
        if shardlib.is_manifest_url(url):
            manifest = shardlib.read_manifest(url)
            return manifest["shard_urls"], manifest
        return shardlib.expand_urls(url), None
    except storage.UnsupportedURLError as exc:
        raise DataError(str(exc)) from exc


def _check_shards_exist(urls: list[str], field_name: str, sizes: list[int | None] | None = None) -> None:
    """Every shard exists, is non-empty and has the size its manifest records (``sizes``, None where unknown);
    one listing per directory rather than one request per shard."""
    expected = dict(zip(urls, sizes or [None] * len(urls), strict=True))
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(url.rsplit("/", 1)[0], []).append(url)
    problems = []
    for directory, members in by_dir.items():
        fs, path = storage.filesystem(directory)
        fs.invalidate_cache(path)  # a listing cached before the shards were written would hide them
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        listing = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}
        for url in members:
            entry = listing.get(url.rsplit("/", 1)[-1])
            if entry is None:
                problems.append(f"{url} does not exist")
            elif not entry.get("size"):
                problems.append(f"{url} is empty")
            elif expected[url] is not None and entry["size"] != expected[url]:
                # Truncated, or replaced after the manifest was written: its samples are not the manifest's.
                problems.append(f"{url} has {entry['size']} bytes but its manifest records {expected[url]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise DataError(f"{field_name}: {shown}. Check the URL pattern, or (re)write the shards with prepare_data.py")


def require_enough_shards(num_shards: int, world_size: int, workers: int, what: str) -> None:
    streams = world_size * max(1, workers)
    if num_shards < streams:
        raise DataError(
            f"{what} has {num_shards} shards but {world_size} ranks x {max(1, workers)} workers = {streams} readers "
            f"each need at least one shard: write more, smaller shards (prepare_data.py --samples-per-shard), "
            "or lower data.workers"
        )


@contextlib.contextmanager
def _reaching(field_name: str, url: str) -> Iterator[None]:
    """Turn a storage failure (unreachable endpoint, access denied...) into a DataError that names the field."""
    try:
        yield
    except DataError as exc:
        if re.match(rf"{re.escape(field_name)}\b", str(exc)):
            raise
        # e.g. "manifest ... does not exist": say which field pointed there (data.train or data.eval).
        raise DataError(f"{field_name}: {exc}") from None
    except Exception as exc:  # gcsfs, aiohttp and OS errors share no base class; a pre-flight reports them all
        raise DataError(
            f"{field_name}: cannot read {url} ({type(exc).__name__}: {str(exc)[:300]}); check that the storage is "
            "reachable from here and that this job may read it"
        ) from exc


def check_data(cfg: DataConfig, *, world_size: int) -> DataInfo:
    """Pre-flight, before any cluster work: manifests readable, shards present and non-empty, enough shards."""
    if world_size < 1:
        raise DataError(f"world_size must be >= 1, got {world_size}")
    with _reaching("data.train", cfg.train):
        urls, manifest = resolve(cfg.train)
        if not urls:
            raise DataError(f"data.train: {cfg.train!r} names no shards")
        _check_shards_exist(urls, "data.train", manifest["shard_bytes"] if manifest else None)
    require_enough_shards(len(urls), world_size, cfg.workers, f"data.train ({cfg.train})")
    if cfg.eval is not None:
        with _reaching("data.eval", cfg.eval):
            eval_urls, eval_manifest = resolve(cfg.eval)
            if not eval_urls:
                raise DataError(f"data.eval: {cfg.eval!r} names no shards")
            _check_shards_exist(eval_urls, "data.eval", eval_manifest["shard_bytes"] if eval_manifest else None)
    return DataInfo(
        num_shards=len(urls),
        num_samples=manifest["num_samples"] if manifest else None,
        num_classes=manifest["num_classes"] if manifest else None,
        class_names=manifest["class_names"] if manifest else None,
        shard_urls=urls,
        multi_label=bool(manifest and manifest.get("multi_label")),
    )


def training_shards(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, workers: int
) -> tuple[list[str], dict[str, Any] | None]:
    """The shard URLs and manifest a training loader of either engine reads, after checking its arguments and
    that each of its ``world_size`` x ``workers`` readers gets a shard."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    urls, manifest = resolve(cfg.train)
    if not urls:
        raise DataError(f"data.train: {cfg.train!r} names no shards")
    require_enough_shards(len(urls), world_size, workers, f"data.train ({cfg.train})")
    return urls, manifest
