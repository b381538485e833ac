"""Inspect a trained ViT as the paper's section 4.5: embedding filters, position embeddings, attention distance and
attention rollout (Figures 6 and 7), drawn as PNGs from a handful of images of any shard set.

    python jobs/analyze.py --model runs/demo/export --data runs/data/digits-0-4/train.manifest.json \\
        --out runs/demo/analysis [--run-id <MLflow run>]
    python jobs/analyze.py --model gs://<bucket>/ViT-B_16.npz --variant B/16 \\
        --data gs://<bucket>/imagenet/val.manifest.json --out gs://<bucket>/analysis/vit-b16

--model is an export directory written by jobs/pretrain.py, an official JAX .npz or a timm / PyTorch checkpoint
(.pth, .pt, .bin, .safetensors); the last two need --variant. Writes embedding_filters.png,
position_similarity.png, attention_distance.png, attention_rollout.png and analysis.json (the numbers behind them)
to --out (any storage URL); with --run-id they are also logged to that MLflow run under analysis/.
Exit codes: 0 done, 2 a bad argument (reported before any model or image is loaded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory, official .npz, or timm checkpoint URL")
    parser.add_argument("--variant", help="architecture of a .npz or timm checkpoint, e.g. B/16")
    parser.add_argument("--data", required=True, help="shard set: manifest URL or brace pattern of shard URLs")
    parser.add_argument("--out", required=True, help="output directory, local path or storage URL")
    parser.add_argument("--images", type=int, default=32, help="images averaged for attention distance")
    parser.add_argument("--rollout-images", type=int, default=6, help="images shown with their rollout maps")
    parser.add_argument("--components", type=int, default=28, help="principal components of the filters shown")
    parser.add_argument("--run-id", help="MLflow run to log the figures to (as artifacts under analysis/)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline import analysis, storage
    from pipeline.config import default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        for name in ("images", "rollout_images", "components"):
            if getattr(args, name) < 1:
                raise analysis.AnalysisError(f"--{name.replace('_', '-')} must be at least 1")
        if args.rollout_images > args.images:
            raise analysis.AnalysisError("--rollout-images must not exceed --images (they are among those images)")
        try:
            out = storage.check_url(args.out, field="--out")
        except storage.UnsupportedURLError as exc:
            raise analysis.AnalysisError(str(exc)) from None
        source = analysis.check_model(args.model, variant=args.variant)
        data = analysis.check_images(args.data)
        if args.run_id:
            analysis.check_run(tracking_uri, args.run_id)
        started = time.monotonic()
        vit = analysis.load_model(source)
    except analysis.AnalysisError as exc:
        print(f"analyze: {exc}", file=sys.stderr)
        return 2

    size = vit.spec.img_size
    images = analysis.read_images(data, size, args.images)
    print(f"analyze: {source.label}, {len(images)} images at {size} px from {data}", flush=True)
    result = analysis.analyze(vit, images, components=args.components, rollout_images=args.rollout_images)
    with tempfile.TemporaryDirectory() as tmp:
        files = analysis.write_figures(result, images, out, label=source.label, image_size=size, local_dir=Path(tmp))
        if args.run_id:
            analysis.log_artifacts(tracking_uri, args.run_id, files)
            print(f"analyze: logged {len(files)} files to MLflow run {args.run_id} under analysis/")
    for path in files.values():
        print(f"analyze: wrote {storage.join(out, path.name)}")
    print(f"analyze: done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
