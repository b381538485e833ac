"""The VTAB-1k split of any source (Zhai et al. 2019): 800 train and 200 validation images drawn from the official
train split, and the official test split as test.

The 1,000 are the official train images whose seeded hash of the key ranks first (the first 800 of them are
``train``, the next 200 ``minival``): one streaming pass that keeps at most 1,000 samples in memory, and the same
draw whatever order the source's parts come in.
"""

from __future__ import annotations

import hashlib
import heapq

from pipeline.data.sources import Source, SourceError, iter_split

VTAB_TRAIN = 800
VTAB_VAL = 200


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"vtab1k:{seed}:{key}".encode()).hexdigest()


def vtab1k(source: Source, seed: int = 0) -> Source:
    if "train" not in source.split_names() or "test" not in source.split_names():
        raise SourceError(f"VTAB-1k needs the official train and test splits; {source.name} has {source.split_names()}")
    # nsmallest keeps only the 1,000 best-ranked samples seen so far while it streams through the split.
    wanted = VTAB_TRAIN + VTAB_VAL
    drawn = heapq.nsmallest(wanted, iter_split(source, "train"), key=lambda s: _rank(seed, s.key))
    if len(drawn) < wanted:
        raise SourceError(f"VTAB-1k draws 1000 training images; {source.name}'s train split has only {len(drawn)}")
    splits = {"train": drawn[:VTAB_TRAIN], "minival": drawn[VTAB_TRAIN:]}
    parts = {"test": source.parts["test"]} if "test" in source.parts else {}
    if not parts:
        splits["test"] = source.splits["test"]
    note = f"VTAB-1k: 800 train / 200 minival drawn (seed {seed}) from the official train split; test = official test"
    return Source(
        f"{source.name}-vtab1k", source.class_names, splits, note, parts=parts, multi_label=source.multi_label
    )
