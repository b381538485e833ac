"""Convert an image dataset into WebDataset shards + manifest on file:// or gs:// storage (memory:// for tests).

    python jobs/prepare_data.py --source digits --out file:///tmp/data/digits --classes 0-4 --split train
    python jobs/prepare_data.py --source cifar10 --input ~/cifar-10-batches-py --out gs://bucket/cifar10 --split all
    python jobs/prepare_data.py --source imagenet --input gs://bucket/raw/ILSVRC2012 --out gs://bucket/imagenet \\
        --split all --address auto
    python jobs/prepare_data.py --source parquet --input gs://bucket/hf/vtab-dtd --out gs://bucket/vtab1k/dtd \\
        --vtab1k --split all
    python jobs/prepare_data.py --source webdataset --input 'gs://bucket/in1k-wds/train-{0000..1023}.tar' \\
        --split train --class-names classes.txt

How each source is converted:
  imagenet, imagenet21k, parquet (and any source with --vtab1k): --input is any local path or URL (gs:// too);
    the conversion runs as Ray tasks, one per group of --parts-per-task parts (synsets, row groups), on a local
    Ray with --num-cpus CPUs by default, or on the cluster at --address (or the one `ray job submit` runs it in).
    Each finished shard is durable: rerunning the same command after an interruption redoes only the unfinished
    shards. --local runs the tasks in this process instead; a memory:// --out always does (Ray's workers cannot
    see this process's memory).
  digits, lfw, cifar10, cifar100, pets, flowers102, imagefolder: small enough to convert in this process, where
    --classes / --per-class select from them.
  webdataset: shards that already exist ({jpg, cls} or {jpg, json}) are indexed in place: the manifest is written
    beside them (no --out), labels from .cls or from the .json field --label-field.
Writes ``<split>-*.tar`` and ``<split>.manifest.json`` (written last; it marks the set complete). Exit status 2 on
bad input, before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.convert import ALL_SOURCES, convert
from pipeline.data.prepare import PrepareOptions, parse_size
from pipeline.data.sources import SPLITS, SourceError


def parse_args(argv: list[str] | None = None) -> PrepareOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=ALL_SOURCES)
    parser.add_argument(
        "--input",
        help="the dataset as its publisher ships it: a folder (local path, file:// or gs://), or for webdataset "
        "a folder, one .tar or a brace pattern of shards (not for digits/lfw)",
    )
    parser.add_argument("--out", help="output directory URL: file://, gs:// or memory:// (not for webdataset)")
    parser.add_argument("--split", default="train", choices=[*SPLITS, "all"])
    parser.add_argument(
        "--shard-size",
        default="256MB",
        type=parse_size,
        help="close a shard once its samples hold this many bytes (e.g. 256MB)",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, help="also cap each shard at this many samples (large sources: 1000)"
    )
    parser.add_argument("--classes", help="small sources: keep class indices '0-4' or '5,6,7' (relabelled 0..k-1)")
    parser.add_argument("--per-class", type=int, help="small sources: keep at most N samples per class")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/minival/test split and order")
    parser.add_argument("--image-column", default="image", help="parquet: the image column (struct or bytes)")
    parser.add_argument("--label-column", default="label", help="parquet: the label column (int or list of ints)")
    parser.add_argument("--label-field", default="label", help="webdataset {jpg, json}: the .json field of the label")
    parser.add_argument("--class-names", help="parquet, webdataset: a text file (path or URL), one class name per line")
    parser.add_argument(
        "--vtab1k", action="store_true", help="VTAB-1k: 800 train / 200 minival from the official train split"
    )
    parser.add_argument("--parts-per-task", type=int, default=16, help="large sources: parts (synsets...) per task")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)")
    parser.add_argument("--local", action="store_true", help="large sources: convert in this process, without Ray")
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
        image_column=args.image_column,
        label_column=args.label_column,
        label_field=args.label_field,
        class_names=args.class_names,
        vtab1k=args.vtab1k,
        parts_per_task=args.parts_per_task,
        address=args.address,
        num_cpus=args.num_cpus,
        local=args.local,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_args(argv)
        manifests = convert(opts)
    except (SourceError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        where = opts.out or "beside the shards"
        print(
            f"{split}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
            f"{manifest['num_classes']} classes -> {where}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
