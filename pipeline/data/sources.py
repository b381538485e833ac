"""Readers for the datasets ``jobs/prepare_data.py`` converts, each from its publisher's on-disk format.

Every source returns the same thing: class names and, for each split (``train``, ``minival``, ``test``), its
samples (key, label, a loader for the image): a list for datasets that fit in memory, or ``parts`` (pieces read
start to end, one conversion task each) for the large ones (``pipeline.data.imagenet``, ``pipeline.data.parquet``).
`split_parts` and `iter_split` read either form. Splits of the sources here:
- no official split (``imagefolder``, ``digits``, ``lfw``): a seeded, stratified 70/10/20 split of everything;
- CIFAR-10/100: official train/test; ``minival`` is a stratified 2% of the official train set, held out of ``train``;
- Oxford-IIIT Pets: official trainval/test; ``minival`` is a stratified 10% of trainval, held out of ``train``;
- Oxford Flowers-102: official trnid/valid/tstid; ``minival`` is the official validation set.
(The held-out fractions follow the ViT paper's transfer setup: 2% for CIFAR, 10% for Pets.)
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "minival", "test")
SOURCES = ("imagefolder", "cifar10", "cifar100", "pets", "flowers102", "digits", "lfw")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
NO_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


class SourceError(ValueError):
    """The input directory is not in the layout the named source expects."""


# An image as the source holds it: encoded bytes (passed through when JPEG) or a uint8 array (H, W[, 3]).
ImageLoader = Callable[[], "bytes | np.ndarray"]


@dataclass
class SourceSample:
    key: str
    label: int
    load: ImageLoader
    # Every class of a multi-label image (``label`` is then the first); None for single-label data.
    labels: tuple[int, ...] | None = None
    # Per-sample metadata stored beside the image in the shard's ``.json`` member (e.g. ImageNet ReaL labels).
    extra: dict[str, Any] | None = None


@dataclass
class SourcePart:
    """A piece of a split read start to end by one conversion task: a class folder, a per-class tar, a Parquet
    row group. ``read`` yields the part's samples in a fixed order; images load lazily, so skipping a sample
    without calling its ``load`` costs (almost) nothing."""

    name: str
    read: Callable[[], Iterator[SourceSample]]
    size: int | None = None  # samples, when known without reading the part (for the progress bar's ETA)


@dataclass
class Source:
    name: str
    class_names: list[str]
    splits: dict[str, list[SourceSample]]
    split_note: str
    # Splits too large to list in memory (ImageNet-21k's 14 M images): read part by part instead of ``splits``.
    parts: dict[str, list[SourcePart]] = field(default_factory=dict)
    multi_label: bool = False

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if s in self.splits or s in self.parts]


def split_parts(source: Source, split: str, part_size: int = 1000) -> list[SourcePart]:
    """The parts of a split; an in-memory split is cut into consecutive parts of ``part_size`` samples."""
    if split in source.parts:
        return source.parts[split]
    if split not in source.splits:
        raise SourceError(f"{source.name} has no {split!r} split; it has {', '.join(source.split_names())}")
    samples = source.splits[split]
    return [
        SourcePart(
            f"{split}-{start:09d}",
            lambda chunk=samples[start : start + part_size]: iter(chunk),
            len(samples[start : start + part_size]),
        )
        for start in range(0, len(samples), part_size)
    ]


def iter_split(source: Source, split: str) -> Iterator[SourceSample]:
    """Every sample of a split, part after part, without listing them all at once."""
    for part in split_parts(source, split):
        yield from part.read()


def _sanitize(text: str) -> str:
    # Keys may not contain '.' or '/' (WebDataset splits member names at the first dot).
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices into len(fractions) parts, class by class, with a seeded shuffle; parts are sorted."""
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions) / np.sum(fractions)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[np.random.default_rng([seed, int(cls)]).permutation(len(idx))]
        cuts = [round(b * len(idx)) for b in bounds]
        start = 0
        for part, end in zip(parts, cuts, strict=True):
            part.extend(idx[start:end].tolist())
            start = end
    return [sorted(p) for p in parts]


def _holdout(samples: list[SourceSample], fraction: float, seed: int) -> tuple[list[SourceSample], list[SourceSample]]:
    keep, held = stratified_split([s.label for s in samples], (1 - fraction, fraction), seed)
    return [samples[i] for i in keep], [samples[i] for i in held]


def _no_official_split(samples: list[SourceSample], seed: int) -> dict[str, list[SourceSample]]:
    parts = stratified_split([s.label for s in samples], NO_SPLIT_FRACTIONS, seed)
    return {name: [samples[i] for i in part] for name, part in zip(SPLITS, parts, strict=True)}


def _need_dir(input_dir: Path | None, source: str) -> Path:
    if input_dir is None:
        raise SourceError(f"--source {source} needs --input <dir>: the dataset's directory as its publisher ships it")
    if not input_dir.is_dir():
        raise SourceError(f"--input {input_dir} is not a directory")
    return input_dir


def _file_loader(path: Path) -> ImageLoader:
    return path.read_bytes


def _array_loader(array: np.ndarray) -> ImageLoader:
    return lambda: array


# ---------------------------------------------------------------------------------------------------------------


def imagefolder(input_dir: Path | None, seed: int) -> Source:
    root = _need_dir(input_dir, "imagefolder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{root} has no class sub-directories (expected {root}/<class>/<image>.jpg)")
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                rel = path.relative_to(root).with_suffix("").as_posix()
                samples.append(SourceSample(_sanitize(rel), label, _file_loader(path)))
    if not samples:
        raise SourceError(f"{root}: no images found below the class directories")
    return Source("imagefolder", classes, _no_official_split(samples, seed), "seeded stratified 70/10/20")


def _unpickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise SourceError(f"missing {path}")
    with open(path, "rb") as f:
        # The publisher's format is a Python 2 pickle; it is trusted input here, never shard data.
        raw = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_samples(batch: dict[str, object], label_key: str, prefix: str) -> list[SourceSample]:
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(x) for x in batch[label_key]]  # type: ignore[attr-defined]
    names = batch.get("filenames")
    samples = []
    for i, (image, label) in enumerate(zip(data, labels, strict=True)):
        stem = names[i].decode() if names is not None else f"{i:06d}"  # type: ignore[index]
        samples.append(SourceSample(_sanitize(f"{prefix}_{Path(stem).stem}"), label, _array_loader(image)))
    return samples


def _cifar_root_and_classes(
    input_dir: Path | None, name: str, archive_dir: str, meta_file: str, names_key: str
) -> tuple[Path, list[str]]:
    """The directory with a CIFAR download's batches (the archive's own folder inside ``input_dir``, or
    ``input_dir`` itself) and the class names from its meta file."""
    root = _need_dir(input_dir, name)
    if (root / archive_dir).is_dir():
        root = root / archive_dir
    meta = _unpickle(root / meta_file)
    return root, [n.decode() if isinstance(n, bytes) else n for n in meta[names_key]]  # type: ignore[attr-defined]


def cifar10(input_dir: Path | None, seed: int) -> Source:
    root, classes = _cifar_root_and_classes(input_dir, "cifar10", "cifar-10-batches-py", "batches.meta", "label_names")
    train = []
    for i in range(1, 6):
        train += _cifar_samples(_unpickle(root / f"data_batch_{i}"), "labels", f"train{i}")
    test = _cifar_samples(_unpickle(root / "test_batch"), "labels", "test")
    train, minival = _holdout(train, 0.02, seed)
    note = "official test; minival = stratified 2% of the official train set, held out of train"
    return Source("cifar10", classes, {"train": train, "minival": minival, "test": test}, note)


def cifar100(input_dir: Path | None, seed: int) -> Source:
    root, classes = _cifar_root_and_classes(input_dir, "cifar100", "cifar-100-python", "meta", "fine_label_names")
    train = _cifar_samples(_unpickle(root / "train"), "fine_labels", "train")
    test = _cifar_samples(_unpickle(root / "test"), "fine_labels", "test")
    train, minival = _holdout(train, 0.02, seed)
    note = "official test (fine labels); minival = stratified 2% of the official train set, held out of train"
    return Source("cifar100", classes, {"train": train, "minival": minival, "test": test}, note)


def _pets_list(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise SourceError(f"missing {path} (Oxford-IIIT Pets annotations/)")
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, class_id, *_ = line.split()
        rows.append((name, int(class_id) - 1))  # CLASS-ID is 1..37
    return rows


def pets(input_dir: Path | None, seed: int) -> Source:
    root = _need_dir(input_dir, "pets")
    everything = _pets_list(root / "annotations" / "list.txt")
    # Class names from the image names: "Abyssinian_100" -> "Abyssinian", "american_bulldog_12" -> "american_bulldog".
    names: dict[int, str] = {}
    for name, label in everything:
        names.setdefault(label, name.rsplit("_", 1)[0])
    classes = [names[i] for i in range(len(names))]

    def load(rows: list[tuple[str, int]]) -> list[SourceSample]:
        out = []
        for name, label in rows:
            path = root / "images" / f"{name}.jpg"
            out.append(SourceSample(_sanitize(name), label, _file_loader(path)))
        return out

    trainval = load(_pets_list(root / "annotations" / "trainval.txt"))
    test = load(_pets_list(root / "annotations" / "test.txt"))
    train, minival = _holdout(trainval, 0.10, seed)
    note = "official test; minival = stratified 10% of the official trainval set, held out of train"
    return Source("pets", classes, {"train": train, "minival": minival, "test": test}, note)


def flowers102(input_dir: Path | None, seed: int) -> Source:
    from scipy.io import loadmat  # MATLAB files are the publisher's format

    root = _need_dir(input_dir, "flowers102")
    for required in ("imagelabels.mat", "setid.mat", "jpg"):
        if not (root / required).exists():
            raise SourceError(f"missing {root / required} (Flowers-102 layout: jpg/, imagelabels.mat, setid.mat)")
    labels = loadmat(root / "imagelabels.mat")["labels"].ravel().astype(int) - 1  # 1..102 in the file
    setid = loadmat(root / "setid.mat")
    num_classes = int(labels.max()) + 1
    # The publisher ships no class names; these are stable placeholders.
    classes = [f"flower_{i + 1:03d}" for i in range(num_classes)]

    def load(ids: np.ndarray) -> list[SourceSample]:
        out = []
        for image_id in sorted(int(i) for i in ids.ravel()):
            path = root / "jpg" / f"image_{image_id:05d}.jpg"
            out.append(SourceSample(f"image_{image_id:05d}", int(labels[image_id - 1]), _file_loader(path)))
        return out

    splits = {"train": load(setid["trnid"]), "minival": load(setid["valid"]), "test": load(setid["tstid"])}
    return Source("flowers102", classes, splits, "official trnid/valid/tstid; minival = the official validation set")


def digits(input_dir: Path | None, seed: int) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    samples = []
    for i, (image, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        # 8x8 with 16 grey levels: scale to 0..255 and upscale 4x (nearest) so that JPEG's 8x8 blocks keep the strokes.
        grey = np.round(image * (255 / 16)).astype(np.uint8)
        big = np.repeat(np.repeat(grey, 4, axis=0), 4, axis=1)
        samples.append(SourceSample(f"digit_{i:04d}", int(label), _array_loader(big)))
    classes = [str(int(t)) for t in bunch.target_names]
    return Source("digits", classes, _no_official_split(samples, seed), "seeded stratified 70/10/20")


def lfw(input_dir: Path | None, seed: int) -> Source:
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) floats in [0, 1]: the first 100 are faces, the next 100 non-faces
    if images.shape != (200, 25, 25):
        raise SourceError(f"unexpected lfw_subset shape {images.shape}; expected (200, 25, 25)")
    samples = []
    for i, image in enumerate(images):
        grey = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        samples.append(SourceSample(f"lfw_{i:03d}", 0 if i < 100 else 1, _array_loader(grey)))
    return Source("lfw", ["face", "non_face"], _no_official_split(samples, seed), "seeded stratified 70/10/20")


READERS: dict[str, Callable[[Path | None, int], Source]] = {
    "imagefolder": imagefolder,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "pets": pets,
    "flowers102": flowers102,
    "digits": digits,
    "lfw": lfw,
}


def load_source(name: str, input_dir: str | Path | None, *, split_seed: int = 0) -> Source:
    if name not in READERS:
        raise SourceError(f"--source {name!r} is not known; use one of {', '.join(SOURCES)}")
    return READERS[name](Path(input_dir) if input_dir is not None else None, split_seed)
