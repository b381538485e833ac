"""Convert an image dataset into WebDataset shards + manifest on file://, gs:// or memory:// storage.

    python jobs/prepare_data.py --source digits --out file:///tmp/data/digits --classes 0-4 --split train
    python jobs/prepare_data.py --source cifar10 --input ~/cifar-10-batches-py --out gs://bucket/cifar10 --split all

Writes ``<split>-NNNNNN.tar`` and ``<split>.manifest.json`` (written last; it marks the set complete).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.prepare import PrepareOptions, parse_size, prepare
from pipeline.data.sources import SOURCES, SPLITS, SourceError


def parse_args(argv: list[str] | None = None) -> PrepareOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", help="the dataset's directory as its publisher ships it (not for digits/lfw)")
    parser.add_argument("--out", required=True, help="output directory URL: file://, gs:// or memory://")
    parser.add_argument("--split", default="train", choices=[*SPLITS, "all"])
    parser.add_argument(
        "--shard-size",
        default="256MB",
        type=parse_size,
        help="close a shard once its samples hold this many bytes (e.g. 256MB)",
    )
    parser.add_argument("--samples-per-shard", type=int, help="also cap each shard at this many samples")
    parser.add_argument("--classes", help="keep these class indices, relabelled 0..k-1: '0-4' or '5,6,7'")
    parser.add_argument("--per-class", type=int, help="keep at most N samples per class (deterministic)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/minival/test split and order")
    args = parser.parse_args(argv)
    return PrepareOptions(
        source=args.source,
        input=args.input,
        out=args.out,
        split=args.split,
        shard_size=args.shard_size,
        samples_per_shard=args.samples_per_shard,
        classes=args.classes,
        per_class=args.per_class,
        split_seed=args.split_seed,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_args(argv)
        manifests = prepare(opts)
    except (SourceError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
            f"{manifest['num_classes']} classes -> {opts.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
