"""Corrupt input, end to end through the loaders: nothing good is lost, nothing bad slips through uncounted.

One shard set holds every kind of damage a real bucket collects -- an undecodable JPEG, a sample without its
label, a duplicate key, a label the manifest does not know, a tar cut inside a member and a tar cut exactly
between two members -- plus clean shards. It is written once to local files and once to a real GCS JSON API
(the emulator fixture), and read by 2 ranks x 2 DataLoader workers, the way a training job reads it.

The checks are exact: the good keys that come out equal, as a multiset, the good keys that went in; every bad
sample is counted once against the URL of the shard that holds it (and no clean shard is ever blamed); strict
mode stops at the first bad sample; a bad-sample rate above ``data.max_bad_fraction`` stops the run naming the
worst shards; every loop is bounded and every test has a timeout, so a hang fails instead of stalling CI.
(tests/test_data_loader.py covers the single-process, local-file basics of the same policy.)
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import simplejpeg

from pipeline import storage
from pipeline.data import DataConfig, DataError, build_eval_loader, build_train_loader, check_data
from pipeline.data.shards import iter_shard, manifest_name, shard_name
from tests.fixtures.gcs import make_bucket

pytestmark = pytest.mark.reliability

NUM_CLASSES = 4
RANKS = 2
WORKERS = 2  # per rank: 4 streams in all, each reading 2 of the 8 shards per epoch
BATCH = 3
# Every shard starts with at least this many good samples before its first damage. Bad samples are reported with
# the next batch a stream delivers; with shuffle_buffer=0 and BATCH < GOOD_PREFIX, the batch that crosses into
# epoch 1 holds only good samples of epoch 1, so it reports exactly the rest of epoch 0's bad samples.
GOOD_PREFIX = 5
MAX_BATCHES = 400  # a bound on every drain loop: ~25 batches per rank and epoch are expected


def _jpeg(i: int) -> bytes:
    pixels = (np.random.default_rng(i).random((12, 16, 3)) * 255).astype(np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90)


def label_value(label: int) -> int:
    """The grey level of every good sample's image of class ``label``: the loaders must keep image and label
    together, and every batch is checked for it (a shuffle that separated them would show here)."""
    return 30 + 50 * label


def assert_images_carry_their_labels(batch) -> None:
    means = batch.images.float().mean(dim=(1, 2, 3))
    for key, label, mean in zip(batch.keys, batch.labels.tolist(), means.tolist(), strict=True):
        assert abs(mean - label_value(label)) < 8, f"{key}: label {label} but the image is of grey {mean:.1f}"


def _sample(key: str, label: int | bytes | None = None, *, image: bytes | None = None) -> list[tuple[str, bytes]]:
    if image is None and isinstance(label, int) and label < NUM_CLASSES:
        image = simplejpeg.encode_jpeg(np.full((12, 16, 3), label_value(label), np.uint8), quality=90)
    members = [(f"{key}.jpg", image if image is not None else _jpeg(zlib.crc32(key.encode())))]
    if label is not None:
        members.append((f"{key}.cls", label if isinstance(label, bytes) else str(label).encode()))
    return members


def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, int]]:
    """A tar archive and the offset of each member's header (where a cut "between two members" falls)."""
    buf = io.BytesIO()
    offsets = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            offsets[name] = tar.offset
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


def _good(prefix: str, indices: range) -> list[tuple[str, bytes]]:
    return [m for i in indices for m in _sample(f"{prefix}{i:02d}", i % NUM_CLASSES)]


def corrupt_shards() -> tuple[list[bytes], list[int], set[str], dict[int, int]]:
    """(8 shard tars, the samples written into each, the good keys in them, {shard index: bad samples}) -- the
    expected outcome is built here. A cut shard's bad samples are the one being read when the data stops plus
    every sample after it that its manifest records."""
    shards: list[bytes] = []
    good: list[str] = []
    bad: dict[int, int] = {}

    def with_damage(prefix: str, damage: list[tuple[str, bytes]]) -> bytes:
        data, _ = _tar([*_good(prefix, range(0, 6)), *damage, *_good(prefix, range(6, 10))])
        good.extend(f"{prefix}{i:02d}" for i in range(10))
        bad[len(shards)] = 1
        return data

    half_jpeg = _jpeg(7)[: len(_jpeg(7)) // 2]  # a real JPEG header, then the data stops: undecodable
    shards.append(with_damage("a", _sample("abadjpeg", 1, image=half_jpeg)))
    shards.append(with_damage("b", _sample("bnolabel", None)))
    shards.append(with_damage("c", _sample("c03", 2)))  # the second c03 of this shard
    shards.append(with_damage("d", _sample("dbiglabel", NUM_CLASSES + 5)))  # a class the manifest does not have

    # Cut inside the data of e07.jpg: e00..e06 are whole, e07 is bad, e08 and e09 are missing: 3 bad.
    data, offsets = _tar(_good("e", range(10)))
    bad[len(shards)] = 3
    shards.append(data[: offsets["e07.jpg"] + 512 + 100])
    good.extend(f"e{i:02d}" for i in range(7))
    # Cut exactly at the header of f07.jpg: tarfile alone reads this as a shorter, complete archive. f06 (whose
    # members may be incomplete, as far as the reader can know) is bad, f07..f09 are missing: 4 bad; f00..f05 good.
    data, offsets = _tar(_good("f", range(10)))
    bad[len(shards)] = 4
    shards.append(data[: offsets["f07.jpg"]])
    good.extend(f"f{i:02d}" for i in range(6))

    for prefix in "gh":  # clean shards: must never be blamed for anything
        data, _ = _tar(_good(prefix, range(10)))
        shards.append(data)
        good.extend(f"{prefix}{i:02d}" for i in range(10))
    assert len(good) == len(set(good))
    written = [11, 11, 11, 11, 10, 10, 10, 10]  # the damaged shards a-d hold one sample more than the others
    return shards, written, set(good), bad


def samples_in(tar: bytes) -> int:
    """The samples of a whole tar: runs of members sharing a key."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        keys = [name.split(".", 1)[0] for name in archive.getnames()]
    return sum(1 for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key)


def write_shard_set(
    base: str, tars: list[bytes], split: str = "train", samples: list[int] | None = None
) -> tuple[str, list[str]]:
    """Upload the tars and a manifest recording each shard's samples (``samples``, or counted in the whole tars)
    and size; returns the manifest URL and the shard URLs."""
    samples = samples or [samples_in(t) for t in tars]
    urls = []
    for i, data in enumerate(tars):
        url = storage.join(base, shard_name(split, i))
        storage.write_bytes(url, data)
        urls.append(url)
    manifest = storage.join(base, manifest_name(split))
    storage.write_json(
        manifest,
        {
            "format": "vitpipe-webdataset/1",
            "split": split,
            "num_samples": sum(samples),
            "num_classes": NUM_CLASSES,
            "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
            "shards": [
                {"name": shard_name(split, i), "samples": n, "bytes": len(t)}
                for i, (t, n) in enumerate(zip(tars, samples, strict=True))
            ],
        },
    )
    return manifest, urls


@pytest.fixture(scope="module", params=["file", "gs"])
def corrupt_set(request, tmp_path_factory) -> tuple[str, list[str], set[str], dict[str, int]]:
    """(manifest URL, shard URLs, expected good keys, expected {shard URL: bad samples}) on file:// or gs://."""
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        base = make_bucket() + "/corrupt"
    else:
        base = f"file://{tmp_path_factory.mktemp('corrupt')}"
    tars, written, good, bad = corrupt_shards()
    manifest, urls = write_shard_set(base, tars, samples=written)
    return manifest, urls, good, {urls[i]: n for i, n in bad.items()}


def _cfg(train: str, **kw) -> DataConfig:
    defaults = dict(image_size=8, workers=WORKERS, shuffle_buffer=0, seed=11, max_bad_fraction=0.5)
    return DataConfig(train=train, **{**defaults, **kw})


def _epoch0(cfg: DataConfig, rank: int) -> tuple[list[str], Counter, Counter, Counter]:
    """One rank's epoch 0: (good keys, bad counts of epoch 0 by shard, bad counts in all batches, loader stats).

    Drains until every stream has delivered a batch of epoch 1; bounded by MAX_BATCHES.
    """
    loader = build_train_loader(cfg, batch_size=BATCH, rank=rank, world_size=RANKS)
    keys: list[str] = []
    bad_epoch0: Counter = Counter()
    bad_delivered: Counter = Counter()
    done: set[int] = set()
    batches: Iterator = loader.batches()
    for _ in range(MAX_BATCHES):
        batch = next(batches)
        assert_images_carry_their_labels(batch)
        bad_delivered.update(batch.bad_by_shard)
        if batch.stream not in done:
            bad_epoch0.update(batch.bad_by_shard)
            if batch.epochs[-1] >= 1:
                done.add(batch.stream)
        keys += [k for k, e in zip(batch.keys, batch.epochs, strict=True) if e == 0]
        if len(done) == loader.streams:
            return keys, bad_epoch0, bad_delivered, Counter(loader.stats()["bad_by_shard"])
    raise AssertionError(f"rank {rank}: not every stream reached epoch 1 within {MAX_BATCHES} batches")


@pytest.mark.timeout(120)
def test_training_loader_yields_exactly_the_good_samples_and_counts_each_bad_one_against_its_shard(corrupt_set):
    manifest, _, good, bad = corrupt_set
    cfg = _cfg(manifest)
    assert check_data(cfg, world_size=RANKS).num_shards == 8  # the pre-flight check does not open the tars
    keys: Counter = Counter()
    bad_epoch0: Counter = Counter()
    for rank in range(RANKS):
        rank_keys, rank_bad, delivered, stats = _epoch0(cfg, rank)
        keys.update(rank_keys)
        bad_epoch0.update(rank_bad)
        # What the workers reported is what the run's counters hold: nothing lost between processes.
        assert stats == delivered
        assert set(stats) <= set(bad), f"a clean shard was blamed: {set(stats) - set(bad)}"
    assert keys == Counter(good)  # each good sample exactly once in the epoch, across ranks and workers
    assert dict(bad_epoch0) == bad  # each bad sample exactly once, against its own shard URL


@pytest.mark.timeout(120)
def test_evaluation_pass_yields_every_good_sample_once_and_counts_every_bad_one(corrupt_set):
    manifest, _, good, bad = corrupt_set
    keys: Counter = Counter()
    counted: Counter = Counter()
    for rank in range(RANKS):
        loader = build_eval_loader(manifest, image_size=8, batch_size=4, rank=rank, world_size=RANKS, workers=WORKERS)
        for batch in loader.batches():
            assert len(batch.keys) == batch.images.shape[0] > 0
            assert_images_carry_their_labels(batch)
            keys.update(batch.keys)
        counted.update(loader.bad_by_shard)
    assert keys == Counter(good)
    # Includes bad samples after a worker's last full batch (the truncated shards end with theirs).
    assert dict(counted) == bad


@pytest.mark.timeout(60)
def test_strict_mode_stops_at_the_first_bad_sample_and_names_its_shard(corrupt_set):
    manifest, _, _, bad = corrupt_set
    loader = build_train_loader(_cfg(manifest, strict=True), batch_size=BATCH, rank=0, world_size=RANKS)
    batches = loader.batches()
    with pytest.raises(DataError, match=r"\(data\.strict=true\)") as raised:
        for _ in range(MAX_BATCHES):
            next(batches)
    url = re.search(r" in (\S+\.tar): ", str(raised.value)).group(1)
    assert url in bad
    with pytest.raises(DataError, match=r"eval rank 0 worker \d: bad sample \S+ in \S+\.tar: .* \(strict evaluation\)"):
        list(build_eval_loader(manifest, image_size=8, batch_size=4, workers=WORKERS, strict=True).batches())


@pytest.mark.timeout(90)
def test_a_bad_sample_rate_over_the_threshold_stops_the_run_naming_the_worst_shards(gcs_emulator):
    # 240 samples, 24 bad (10%): enough that the default minimum of 200 samples seen applies unchanged.
    tars = []
    for s in range(4):
        members = []
        for i in range(60):
            key = f"s{s}k{i:02d}"
            broken = i % 10 == 9  # 6 per shard, none among the first GOOD_PREFIX
            members += _sample(key, b"cat" if broken else i % NUM_CLASSES)  # "cat" is not an integer label
        tars.append(_tar(members)[0])
    manifest, urls = write_shard_set(make_bucket() + "/tenpercent", tars)

    loader = build_train_loader(_cfg(manifest, max_bad_fraction=0.05), batch_size=8, rank=0, world_size=1)
    batches = loader.batches()
    with pytest.raises(DataError) as raised:
        for _ in range(MAX_BATCHES):
            next(batches)
    message = str(raised.value)
    assert "data.max_bad_fraction=0.05" in message and "Rewrite or drop those shards" in message
    named = re.findall(r"(gs://\S+\.tar) \(\d+\)", message)
    assert named and set(named) <= set(urls)
    seen = int(re.search(r"\d+ of (\d+) samples were bad", message).group(1))
    assert 200 <= seen <= 2 * 240  # judged as soon as enough samples were seen, not epochs later

    # The same data under a looser threshold trains on: the threshold, not the damage, decides.
    loader = build_train_loader(_cfg(manifest, max_bad_fraction=0.2), batch_size=8, rank=0, world_size=1)
    batches = loader.batches()
    for _ in range(80):  # 80 x 8 = 640 good samples, past two epochs of 216
        assert_images_carry_their_labels(next(batches))
    assert loader.stats()["bad_samples"] >= 48


@pytest.mark.timeout(60)
def test_a_shard_deleted_after_the_preflight_check_fails_the_loader_instead_of_hanging(gcs_emulator):
    tars = [_tar(_good(f"v{s}", range(8)))[0] for s in range(4)]
    manifest, urls = write_shard_set(make_bucket() + "/vanishing", tars)
    cfg = _cfg(manifest)
    check_data(cfg, world_size=1)
    storage.remove(urls[2])  # e.g. a lifecycle rule or an operator deleted it while the job was queued
    loader = build_train_loader(cfg, batch_size=BATCH, rank=0, world_size=1)
    batches = loader.batches()
    with pytest.raises(DataError, match=re.escape(urls[2]) + " does not exist"):
        for _ in range(MAX_BATCHES):
            next(batches)


@pytest.mark.parametrize(
    ("cut", "good_keys", "bad_key"),
    [
        ("header of k02.jpg", ["k00"], "k01"),  # the pending sample may be incomplete: it is the bad one
        ("inside the header of k02.jpg", ["k00"], "k01"),
        ("inside the data of k02.jpg", ["k00", "k01"], "k02"),
        ("before the end-of-archive block", ["k00", "k01", "k02"], "k03"),
    ],
)
def test_a_tar_cut_anywhere_reports_one_bad_sample_instead_of_ending_quietly(tmp_path, cut, good_keys, bad_key):
    data, offsets = _tar(_good("k", range(4)))
    end_of_members = offsets["k03.cls"] + 512 + 512  # k03.cls: a header block and one data block ("3")
    at = {
        "header of k02.jpg": offsets["k02.jpg"],
        "inside the header of k02.jpg": offsets["k02.jpg"] + 100,
        "inside the data of k02.jpg": offsets["k02.jpg"] + 512 + 50,
        "before the end-of-archive block": end_of_members,
    }[cut]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:at])
    samples = list(iter_shard(f"file://{path}"))
    assert [s.key for s in samples if s.error is None] == good_keys
    assert [(s.key, "unreadable tar" in (s.error or "")) for s in samples if s.error] == [(bad_key, True)]
    # The whole archive, and one with just one of its two zero blocks, read completely and cleanly.
    for keep in (len(data), end_of_members + 512):
        path.write_bytes(data[:keep])
        assert [(s.key, s.error) for s in iter_shard(f"file://{path}")] == [(f"k{i:02d}", None) for i in range(4)]


def test_a_member_repeated_inside_one_sample_makes_that_sample_a_duplicate(tmp_path):
    members = [*_good("k", range(2)), ("k01.cls", b"2"), *_good("k", range(2, 4))]  # k01.cls twice in a row
    path = tmp_path / "repeated.tar"
    path.write_bytes(_tar(members)[0])
    samples = [(s.key, s.error) for s in iter_shard(f"file://{path}")]
    assert samples == [
        ("k00", None),
        ("k01", "duplicate key (already seen in this shard)"),
        ("k02", None),
        ("k03", None),
    ]
