"""ImageNet as its publishers ship it, read from any storage URL (``file://``, ``gs://``) without extracting.

ILSVRC-2012 (ImageNet-1k), ``imagenet1k(root)``; ``root`` holds (image-net.org or Kaggle layout):
- ``train/``: one folder per synset (``train/n01440764/n01440764_10026.JPEG``) or one tar per synset
  (``train/n01440764.tar``, as ``ILSVRC2012_img_train.tar`` unpacks); Kaggle's ``ILSVRC/Data/CLS-LOC/train`` too;
- ``val/``: the 50,000 validation images in one flat folder (``ILSVRC2012_val_00000001.JPEG``), labelled from
  Kaggle's ``LOC_val_solution.csv`` or from the devkit (``ILSVRC2012_devkit_t12/data/`` with
  ``ILSVRC2012_validation_ground_truth.txt`` and ``meta.mat``);
- optionally ``real.json`` (ImageNet ReaL, Beyer et al. 2020): a list whose i-th entry holds the ReaL labels of
  ``ILSVRC2012_val_{i+1:08d}.JPEG``. They are attached by that file name and stored with each sample (``.json``
  member, key ``real``), so evaluation never depends on the order of the shards.
Classes are the synset ids in sorted order (the index every ImageNet label file uses). Splits, as in the ViT paper:
``train`` = the official train set less ``minival``, a stratified 1% of it; ``test`` = the official validation set.

ImageNet-21k (fall 2011 release), ``imagenet21k(root)``: ``root`` holds one tar per synset (``n00004475.tar``); the
tars are streamed member by member (``tarfile`` over the storage client), never unpacked. All of it is ``train``,
except a stratified 1% ``minival``.

Both sources are part-based (one part per synset), so a conversion never lists 14 M images in one process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.sources import IMAGE_SUFFIXES, Source, SourceError, SourcePart, SourceSample

MINIVAL_FRACTION = 0.01


def as_url(path_or_url: str) -> str:
    """A storage URL for ``--input``: URLs pass through, local paths become ``file://`` URLs."""
    if "://" in path_or_url:
        return storage.check_url(path_or_url, field="--input")
    return "file://" + posixpath.abspath(path_or_url)


def _is_dir(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.isdir(path)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _key(file_name: str) -> str:
    # "n01440764_10026.JPEG" -> "n01440764_10026" (keys may not contain '.' or '/').
    return _KEY_UNSAFE.sub("_", posixpath.basename(file_name).split(".", 1)[0])


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES


def held_out(keys: list[str], fraction: float, seed: int) -> set[str]:
    """The ``round(fraction * n)`` keys (at least one when n >= 2) ranked first by a seeded hash of the key:
    a class-by-class (stratified) holdout that each part computes alone, whatever order its files come in."""
    if len(keys) < 2:
        return set()
    count = max(1, round(fraction * len(keys)))
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return set(ranked[:count])


# ---------------------------------------------------------------------------------------------------------------
# A synset's images: a folder or a tar


@dataclass
class SynsetImages:
    """The images of one synset, in a folder or a tar at ``url``; ``names()`` lists them in stored order."""

    url: str
    is_tar: bool

    def names(self) -> list[str]:
        if not self.is_tar:
            # One listing, names taken from its paths: building a checked URL per file (storage.listdir) cost
            # ~3 us per image, 5% of a conversion's CPU time.
            fs, base = storage.filesystem(self.url)
            return sorted(_name(p) for p in fs.ls(base, detail=False) if _is_image(p))
        # Headers only: tarfile seeks over the image data (small range reads on gs://).
        with storage.open_read(self.url, small_reads=True) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            return [m.name for m in tar.getmembers() if m.isfile() and _is_image(m.name)]

    def read(
        self, keep: Callable[[str], bool], *, sparse: bool = False, names: list[str] | None = None
    ) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """(file name, loader) of the images ``keep`` accepts, in stored order. A tar is read in one forward pass;
        ``sparse`` when ``keep`` takes few of them (minival): small reads, seeking over the rest. ``names``: the
        folder's listing when the caller already has it."""
        if not self.is_tar:
            fs, base = storage.filesystem(self.url)  # once per folder: the per-file cost is the read alone
            for name in self.names() if names is None else names:
                if keep(name):
                    path = posixpath.join(base, name)
                    yield name, lambda path=path: fs.cat_file(path)
            return
        with (
            storage.open_read(self.url, streaming=not sparse, small_reads=sparse) as f,
            tarfile.open(fileobj=f, mode="r:") as tar,
        ):
            for member in tar:
                if not (member.isfile() and _is_image(member.name) and keep(member.name)):
                    continue
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                # A streamed tar cannot be read later: the loader hands back bytes already read.
                yield member.name, lambda data=data: data


def synsets_in(url: str) -> dict[str, SynsetImages]:
    """``{wnid: images}`` for the synset folders or ``<wnid>.tar`` files directly under ``url``."""
    found: dict[str, SynsetImages] = {}
    for child in storage.listdir(url):
        name = _name(child)
        if name.endswith(".tar"):
            found[name.removesuffix(".tar")] = SynsetImages(child, is_tar=True)
        elif not name.startswith(".") and _is_dir(child):
            found[name] = SynsetImages(child, is_tar=False)
    if not found:
        raise SourceError(f"{url} holds no synset folders or <wnid>.tar files")
    return dict(sorted(found.items()))


def _synset_parts(
    synsets: dict[str, SynsetImages], fraction: float, seed: int, prefix: str
) -> tuple[list[SourcePart], list[SourcePart]]:
    """(train parts, minival parts): one of each per synset, minival being ``held_out`` of the synset's images."""
    train, minival = [], []
    for label, (wnid, images) in enumerate(synsets.items()):

        def read(held: bool, label: int = label, images: SynsetImages = images) -> Iterator[SourceSample]:
            names = images.names()
            keys = {name: _key(name) for name in names}
            holdout = held_out(list(keys.values()), fraction, seed)
            for name, load in images.read(lambda n: (keys[n] in holdout) == held, sparse=held, names=names):
                yield SourceSample(keys[name], label, load)

        train.append(SourcePart(f"{prefix}{wnid}", lambda read=read: read(False)))
        minival.append(SourcePart(f"{prefix}{wnid}-minival", lambda read=read: read(True)))
    return train, minival


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-1k


def _find(root: str, *candidates: str) -> str | None:
    for relative in candidates:
        url = storage.join(root, relative)
        if storage.exists(url):
            return url
    return None


def _val_labels_from_csv(url: str, wnids: list[str]) -> dict[str, int]:
    index = {w: i for i, w in enumerate(wnids)}
    text = storage.read_bytes(url).decode()
    labels = {}
    for row in csv.DictReader(io.StringIO(text)):
        # "ILSVRC2012_val_00008726", "n02119789 255 142 454 329 n02119789 44 21 322 295": boxes, all one synset
        wnid = row["PredictionString"].split()[0]
        if wnid not in index:
            raise SourceError(f"{url}: {row['ImageId']} is labelled {wnid}, which is not a synset of train/")
        labels[row["ImageId"]] = index[wnid]
    return labels


def _val_labels_from_devkit(data_dir: str, wnids: list[str]) -> dict[str, int]:
    from scipy.io import loadmat  # the devkit's format

    with storage.open_read(storage.join(data_dir, "meta.mat")) as f:
        synsets = loadmat(f, squeeze_me=True)["synsets"]
    # The devkit numbers synsets 1..1000 in its own order; the class index is the synset's place in sorted order.
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    index = {w: i for i, w in enumerate(wnids)}
    lines = storage.read_bytes(storage.join(data_dir, "ILSVRC2012_validation_ground_truth.txt")).decode().split()
    # Line i holds the label of ILSVRC2012_val_{i+1:08d}.JPEG.
    return {f"ILSVRC2012_val_{i + 1:08d}": index[by_id[int(x)]] for i, x in enumerate(lines)}


def _real_labels(url: str) -> dict[str, list[int]]:
    entries = json.loads(storage.read_bytes(url))
    if not isinstance(entries, list):
        raise SourceError(f"{url}: expected ReaL's list of label lists, one per validation image")
    return {f"ILSVRC2012_val_{i + 1:08d}": [int(x) for x in labels] for i, labels in enumerate(entries)}


def imagenet1k(root_text: str, seed: int = 0, minival_fraction: float = MINIVAL_FRACTION) -> Source:
    root = as_url(root_text)
    train_url = _find(root, "train", "ILSVRC/Data/CLS-LOC/train")
    val_url = _find(root, "val", "ILSVRC/Data/CLS-LOC/val")
    if train_url is None or val_url is None:
        raise SourceError(f"{root}: expected train/ and val/ (or Kaggle's ILSVRC/Data/CLS-LOC/{{train,val}})")
    synsets = synsets_in(train_url)
    wnids = list(synsets)
    train, minival = _synset_parts(synsets, minival_fraction, seed, "train-")

    solution = _find(root, "LOC_val_solution.csv")
    devkit = _find(root, "ILSVRC2012_devkit_t12/data", "devkit/data")
    if solution is not None:
        val_labels = _val_labels_from_csv(solution, wnids)
    elif devkit is not None:
        val_labels = _val_labels_from_devkit(devkit, wnids)
    else:
        raise SourceError(
            f"{root}: no validation labels; add LOC_val_solution.csv (Kaggle) or the devkit "
            "(ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt and meta.mat)"
        )
    real_url = _find(root, "real.json")
    real = _real_labels(real_url) if real_url is not None else None

    def read_val() -> Iterator[SourceSample]:
        for name, load in SynsetImages(val_url, is_tar=False).read(lambda n: True):
            key = _key(name)
            if key not in val_labels:
                raise SourceError(f"{val_url}/{name} has no label in the ground truth file")
            extra = {"real": real.get(key, [])} if real is not None else None
            yield SourceSample(key, val_labels[key], load, extra=extra)

    note = (
        f"test = official validation set{' with ReaL labels' if real is not None else ''}; "
        f"minival = stratified {minival_fraction:.0%} of the official train set, held out of train"
    )
    parts = {"train": train, "minival": minival, "test": [SourcePart("val", read_val)]}
    return Source("imagenet1k", wnids, {}, note, parts=parts)


def imagenet21k(root_text: str, seed: int = 0, minival_fraction: float = MINIVAL_FRACTION) -> Source:
    root = as_url(root_text)
    synsets = synsets_in(root)
    train, minival = _synset_parts(synsets, minival_fraction, seed, "")
    note = f"one tar per synset; minival = stratified {minival_fraction:.0%} of each synset, held out of train"
    return Source("imagenet21k", list(synsets), {}, note, parts={"train": train, "minival": minival})
