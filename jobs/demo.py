"""The whole pipeline on the embedded defaults, end to end, on one machine with no cloud and no GPU.

    python jobs/demo.py            # what `make demo` runs

Each stage is the command a user would type, run as its own process and printed before it runs:
1. prepare_data: scikit-learn digits 0-4 (pretraining set) and the two embedded transfer benchmarks
   (digits 5-9 with 10 labels per class; scikit-image lfw_subset faces) as WebDataset shards under runs/data;
2. pretrain: the `tiny` preset (ViT-Mi/4 at 32 px, 2 Ray workers, DeepSpeed ZeRO-2, fp32 on CPU), evaluated every
   100 steps (held-out loss and top-1, 5-shot linear probes on digits 5-9; `jobs/curves.py` draws them);
3. transfer: fine-tune the exported model on both benchmarks (2 learning rates, 3 seeds), few-shot linear eval,
   and the same fine-tuning from scratch as the baseline;
4. compare: the table (Markdown, CSV, PNG) next to the paper's numbers;
5. analyze: the paper's Figure 6 and 7 analyses of the pretrained model on its own images (PNGs in
   runs/<run name>/analysis, also logged to the pretraining's MLflow run).
Everything is tracked in MLflow (SQLite, runs/mlflow.db): `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.

Running it again reuses the prepared data and the finished pretraining run (same run name), and runs a new
transfer sweep.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import storage  # noqa: E402
from pipeline.config import default_runs_root, presets  # noqa: E402
from pipeline.config.transfer import local_data_root  # noqa: E402
from pipeline.export import export_metadata  # noqa: E402
from pipeline.transfer import tasks as benchmarks  # noqa: E402

TRANSFER_BENCHMARKS = ("digits_heldout", "lfw")


def run_stage(title: str, command: str) -> str:
    """Run one pipeline command from the repository root, echo its output, and return it."""
    print(f"\n=== {title}\n$ {command}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *shlex.split(command)[1:]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    print(f"--- {title}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"demo: stage '{title}' failed (exit {code}); its output is above")
    return "".join(lines)


def prepare_commands(data_root: str) -> list[str]:
    commands = [presets.demo_data_command()]
    for name in TRANSFER_BENCHMARKS:
        bench = benchmarks.get(name)
        if not all(storage.exists(bench.split_url(data_root, split)) for split in ("train", "minival", "test")):
            commands += bench.prepare_commands(data_root)
    if storage.exists(presets.demo_data_url()) and storage.exists(presets.demo_eval_url()):
        commands = commands[1:]
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-name", default="demo", help="pretraining run name (same name = resume / reuse)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    data_root = local_data_root()
    for command in prepare_commands(data_root):
        run_stage("prepare data", command)

    # Evaluated every 100 steps on the held-out digits 0-4 (the preset's) and by 5-shot probes on digits 5-9.
    out = run_stage(
        "pretrain",
        f"python jobs/pretrain.py --config tiny --set run.name={args.run_name} --set eval.fewshot=digits_heldout",
    )
    export = re.search(r"export: (\S+)", out)
    if not export:
        raise SystemExit("demo: pretraining printed no export URL")

    export_url = export.group(1).rstrip(";")

    out = run_stage(
        "transfer",
        f"python jobs/transfer.py --pretrained {export_url} "
        f"--benchmarks {','.join(TRANSFER_BENCHMARKS)} --fewshot 1,5,10 --scratch --label tiny-digits",
    )
    parent = re.search(r"transfer: parent run (\w+)", out)
    if not parent:
        raise SystemExit("demo: the transfer sweep printed no parent run id")

    out_dir = default_runs_root() + "/compare"
    run_stage("compare", f"python jobs/compare.py --runs {parent.group(1)} --out {out_dir}")

    analysis_dir = f"{default_runs_root()}/{args.run_name}/analysis"  # beside the run's export
    pretrain_run = export_metadata(export_url).get("mlflow_run_id")
    run_stage(
        "analyze",
        f"python jobs/analyze.py --model {export_url} --data {presets.demo_data_url()} --out {analysis_dir}"
        + (f" --run-id {pretrain_run}" if pretrain_run else ""),
    )
    print(
        f"\ndemo: done in {(time.monotonic() - started) / 60:.1f} min. Table and chart: {out_dir}/comparison.md, "
        f"comparison.png. Analysis figures: {analysis_dir}. "
        f"MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///{ROOT}/runs/mlflow.db"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
