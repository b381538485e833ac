"""Malformed configurations are refused up front: before Ray or DeepSpeed does anything, naming the field.

Three layers, cheapest first:
- a table of bad ``--set`` overrides and presets through ``load_config`` (what ``jobs/pretrain.py`` calls first);
- a table of configs that are well-formed but point at data that cannot work, through ``train.preflight`` (the
  data check and the derived plan, still on the driver);
- a handful of real ``jobs/pretrain.py`` / ``jobs/transfer.py`` processes, run concurrently, which must exit with
  the documented configuration-error code 2, name the field, return quickly and never have imported Ray or
  DeepSpeed. They run with ``RAY_ADDRESS`` at a closed loopback port and a private ``RAY_TMPDIR``: had anything
  tried to reach or start a Ray cluster, it would have failed (exit 1, not 2) or left a session directory there.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.shards import ShardWriter, manifest_name
from pipeline.transfer import tasks as benchmarks
from tests.fixtures.gcs import make_bucket

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
CONFIG_ERROR_EXIT = 2  # documented in the docstrings of jobs/pretrain.py and jobs/transfer.py


# ---------------------------------------------------------------------------------------------------------------
# load_config: types, unknown keys, ranges, batch arithmetic, URLs, presets


def _case(case_id: str, sets: list[str], names_the_field: str, preset: str = "tiny"):
    return pytest.param(preset, sets, names_the_field, id=case_id)


BAD_CONFIGS = [
    # wrong types
    _case("steps-not-an-integer", ["train.steps=abc"], r"train\.steps=abc: .*valid integer"),
    _case("steps-fractional", ["train.steps=12.5"], r"train\.steps=12\.5: .*integer"),
    _case("flip-not-a-boolean", ["data.flip=maybe"], r"data\.flip=maybe: .*boolean"),
    _case("section-set-to-a-number", ["train=3"], r"--set train=3: .*TrainSection"),
    _case("value-used-as-section", ["train.steps.x=3"], r"train\.steps is a value, not a section"),
    _case("set-without-value", ["train"], r"--set 'train': expected key=value"),
    # unknown keys: the message points at the right one
    _case("key-in-wrong-section", ["train.lr=0.1"], r"train\.lr: unknown config key; did you mean 'optim\.lr'"),
    _case("misspelt-section", ["trian.steps=10"], r"trian\.steps: unknown config key; did you mean 'train\.steps'"),
    _case("unknown-data-key", ["data.shuffle=true"], r"data\.shuffle: unknown config key"),
    # negative or zero sizes
    _case("negative-image-size", ["data.image_size=-32"], r"data\.image_size: .*positive"),
    _case("zero-micro-batch", ["train.micro_batch=0"], r"train\.micro_batch: .*greater than or equal to 1"),
    _case("negative-loader-workers", ["data.workers=-1"], r"data\.workers: .*0 or more"),
    _case("zero-ray-workers", ["scale.workers=0"], r"scale\.workers: .*greater than or equal to 1"),
    _case("zero-checkpoint-interval", ["checkpoint.every_steps=0"], r"checkpoint\.every_steps: "),
    _case("bad-fraction-over-1", ["data.max_bad_fraction=2"], r"data\.max_bad_fraction: .*\[0, 1\]"),
    # batch arithmetic that cannot work
    _case(
        "global-batch-not-divisible",
        ["train.global_batch=64", "train.micro_batch=48"],
        r"train\.global_batch=64 is not divisible by train\.micro_batch=48 x scale\.workers=2",
    ),
    _case("grad-accum-mismatch", ["train.grad_accum=3"], r"train\.grad_accum=3 x .* != train\.global_batch=64"),
    _case("image-not-patch-multiple", ["data.image_size=30"], r"data\.image_size=30 is not a multiple of the patch"),
    # URLs: pipe:, unsupported schemes, empty, no bucket
    _case("pipe-url", ["data.train=pipe:gsutil cat gs://b/x.tar"], r"data\.train: 'pipe:' URLs"),
    _case("s3-url", ["data.train=s3://b/train-{000000..000009}.tar"], r"data\.train: unsupported URL scheme 's3'"),
    _case("http-url", ["data.train=http://127.0.0.1:9/train.tar"], r"data\.train: unsupported URL scheme 'http'"),
    _case("empty-shard-url", ["data.train="], r"data\.train: expected a storage URL"),
    _case("gs-url-without-bucket", ["data.train=gs:///train.tar"], r"data\.train: .*names no bucket"),
    _case("s3-run-root", ["run.root=s3://b/runs"], r"run\.root: unsupported URL scheme 's3'"),
    _case("ftp-tracking-uri", ["tracking.uri=ftp://127.0.0.1/x"], r"tracking\.uri: .*http\(s\)://"),
    # presets
    _case("missing-preset", [], r"--config no_such_preset: no such preset; choose one of tiny", "no_such_preset"),
    _case("preset-without-data", [], r"data\.train: the preset 'vit_h14_jft' names no training shards", "vit_h14_jft"),
    # engine choices
    _case("zero-stage-4", ["train.zero_stage=4"], r"train\.zero_stage=4: Input should be 0, 1, 2 or 3"),
    _case("precision-fp8", ["train.precision=fp8"], r"train\.precision=fp8: Input should be 'auto', 'bf16' or 'fp32'"),
    _case("unknown-data-engine", ["data.engine=spark"], r"data\.engine=spark: Input should be 'webdataset' or 'ray'"),
    _case("two-gpus-per-worker", ["scale.gpus_per_worker=2"], r"scale\.gpus_per_worker: "),
    _case("unknown-variant", ["model.variant=Z/3"], r"model\.variant: Unknown ViT variant 'Z/3'"),
    # optimisation and run length
    _case("zero-lr", ["optim.lr=0"], r"optim\.lr: Input should be greater than 0"),
    _case("negative-lr", ["optim.lr=-0.001"], r"optim\.lr: Input should be greater than 0"),
    _case("beta-over-1", ["optim.betas=[0.9,1.5]"], r"optim\.betas: both Adam betas"),
    _case("dropout-over-1", ["model.dropout=1.5"], r"model\.dropout: "),
    _case("warmup-over-steps", ["optim.warmup_steps=5000"], r"optim\.warmup_steps=5000 must be smaller than"),
    _case("stop-past-end", ["train.stop_at_step=1000"], r"train\.stop_at_step=1000 is past train\.steps=600"),
    _case("no-run-length", ["train.steps=null"], r"give exactly one of train\.steps and train\.epochs"),
    _case("bad-run-name", ["run.name=bad name!"], r"run\.name: 'bad name!' is not a usable run name"),
]


@pytest.mark.parametrize(("preset", "sets", "names_the_field"), BAD_CONFIGS)
def test_bad_config_is_rejected_by_load_config_naming_the_field(preset, sets, names_the_field):
    with pytest.raises(ConfigError) as raised:
        load_config(preset, sets)
    assert raised.value.problems, "a ConfigError must list its problems"
    assert any(re.search(names_the_field, p) for p in raised.value.problems), raised.value.problems


def test_every_independent_problem_is_reported_at_once():
    # One round trip to fix a config, not one per mistake: both cross-field problems are listed.
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["train.global_batch=64", "train.micro_batch=48", "optim.warmup_steps=5000"])
    text = str(raised.value)
    assert "train.global_batch=64 is not divisible" in text and "optim.warmup_steps=5000 must be smaller" in text


def test_an_unknown_transfer_benchmark_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) 'no_such_benchmark'; known: .*cifar10"):
        benchmarks.resolve_benchmarks(["cifar10", "no_such_benchmark"])


# ---------------------------------------------------------------------------------------------------------------
# preflight: well-formed configs whose data or derived plan cannot work


def _shards(url: str, *, shards: int, classes: int = 3) -> None:
    """A small real shard set with a manifest (tiny JPEGs, ``classes`` classes)."""
    import numpy as np
    import simplejpeg

    writer = ShardWriter(url, "train", max_bytes=1 << 30, max_samples=4)
    for i in range(shards * 4):
        pixels = np.full((8, 8, 3), i * 13 % 256, np.uint8)
        writer.write(f"k{i:03d}", simplejpeg.encode_jpeg(pixels), i % classes)
    records = writer.close()
    from pipeline import storage

    storage.write_json(
        storage.join(url, manifest_name("train")),
        {
            "format": "vitpipe-webdataset/1",
            "num_samples": shards * 4,
            "num_classes": classes,
            "class_names": [str(c) for c in range(classes)],
            "shards": [{"name": r.name, "samples": r.samples} for r in records],
        },
    )


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preflight")
    (root / "empty").mkdir()
    _shards(f"file://{root}/ok", shards=4)
    _shards(f"file://{root}/two", shards=2)
    (root / "zero").mkdir()
    for i in range(2):
        (root / "zero" / f"train-{i:06d}.tar").write_bytes(b"")
    return {name: f"file://{root}/{name}" for name in ("empty", "ok", "two", "zero")} | {
        "missing": f"file://{root}/nope"
    }


def _preflight(case_id: str, sets: list[str], names_the_field: str):
    return pytest.param(sets, names_the_field, id=case_id)


PREFLIGHT = [
    _preflight(
        "empty-shard-directory",
        ["data.train={empty}/train-{{000000..000003}}.tar"],
        r"data\.train: .*train-000000\.tar does not exist",
    ),
    _preflight(
        "missing-shard-directory",
        ["data.train={missing}/train-{{000000..000003}}.tar"],
        r"data\.train: .*does not exist",
    ),
    _preflight("missing-manifest", ["data.train={missing}/train.manifest.json"], r"data\.train: manifest .* not exist"),
    _preflight(
        "zero-byte-shards", ["data.train={zero}/train-{{000000..000001}}.tar"], r"data\.train: .*000000\.tar is empty"
    ),
    _preflight(
        "fewer-shards-than-readers",
        ["data.train={two}/train.manifest.json", "data.workers=2"],
        r"data\.train .* has 2 shards but 2 ranks x 2 workers",
    ),
    _preflight(
        "missing-eval-data",
        ["data.train={ok}/train.manifest.json", "data.eval={missing}/eval.manifest.json"],
        r"data\.eval: .*does not exist",
    ),
    _preflight(
        "head-smaller-than-labels",
        ["data.train={ok}/train.manifest.json", "model.num_classes=2"],
        r"model\.num_classes=2 is smaller than the 3 classes",
    ),
    _preflight(
        "epochs-without-manifest",
        ["data.train={ok}/train-{{000000..000003}}.tar", "train.steps=null", "train.epochs=2"],
        r"train\.epochs: the dataset size is unknown",
    ),
    _preflight(
        "warmup-over-derived-steps",
        ["data.train={ok}/train.manifest.json", "train.steps=null", "train.epochs=1"],
        r"optim\.warmup_steps=10 is not below the run's 1 steps",
    ),
]


@pytest.mark.parametrize(("sets", "names_the_field"), PREFLIGHT)
def test_data_that_cannot_work_is_rejected_by_preflight_naming_the_field(data_dirs, tmp_path, sets, names_the_field):
    from pipeline import pretrain as train

    sets = [s.format(**data_dirs) for s in sets] + [f"run.root=file://{tmp_path}/runs"]
    with pytest.raises(ConfigError) as raised:
        train.check_before_launch(load_config("tiny", sets))
    assert any(re.search(names_the_field, p) for p in raised.value.problems), raised.value.problems


def test_a_bucket_that_does_not_exist_is_rejected_by_preflight(gcs_emulator, tmp_path):
    from pipeline import pretrain as train

    missing = make_bucket().replace("gs://test-", "gs://absent-")  # same emulator, a name nobody created
    cfg = load_config("tiny", [f"data.train={missing}/train-{{000000..000003}}.tar", f"run.root=file://{tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.train: .*train-000000\.tar does not exist"):
        train.check_before_launch(cfg)


# ---------------------------------------------------------------------------------------------------------------
# the entry points, as processes


# Runs the entry point exactly as `python <script> args` would (run_name="__main__"), then reports which heavy
# frameworks the process had imported by the time it exited.
PROBE = textwrap.dedent(
    """
    import json, runpy, sys
    script, sys.argv = sys.argv[1], sys.argv[1:]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    ray = sys.modules.get("ray")
    report = {
        "imported": sorted(m for m in ("ray", "deepspeed", "mlflow") if m in sys.modules),
        "ray_initialized": bool(ray is not None and ray.is_initialized()),
    }
    print("PROBE " + json.dumps(report), file=sys.stderr)
    sys.exit(code)
    """
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def _job_cases(data_dirs: dict[str, str]) -> list[tuple[str, list[str], dict[str, str], list[str], float]]:
    """(script, args, extra env, texts the error must contain, seconds it may take)."""
    dead_gcs = f"http://127.0.0.1:{_closed_port()}"
    cases = [
        ("jobs/pretrain.py", ["--set", "train.zero_stage=4"], {}, ["train.zero_stage=4"], 60),
        (
            "jobs/pretrain.py",
            ["--set", "train.global_batch=64", "--set", "train.micro_batch=48", "--set", "optim.warmup_steps=5000"],
            {},
            ["train.global_batch=64", "train.micro_batch=48", "optim.warmup_steps=5000"],
            60,
        ),
        ("jobs/pretrain.py", ["--config", "no_such_preset"], {}, ["--config no_such_preset: no such preset"], 60),
        ("jobs/pretrain.py", ["--set", "data.train=pipe:curl http://127.0.0.1:9/x"], {}, ["data.train: 'pipe:'"], 60),
        (
            "jobs/pretrain.py",
            ["--set", f"data.train={data_dirs['empty']}/train-{{000000..000003}}.tar"],
            {},
            ["data.train: ", "does not exist"],
            60,
        ),
        # Storage that cannot be reached at all: refused once gcsfs's retries (~30 s) are spent, still as code 2.
        (
            "jobs/pretrain.py",
            ["--set", "data.train=gs://vitpipe-absent/train-{000000..000003}.tar"],
            {"STORAGE_EMULATOR_HOST": dead_gcs},
            ["data.train: cannot read gs://vitpipe-absent/"],
            150,
        ),
    ]
    if (REPO / "jobs" / "transfer.py").exists():
        cases.append(
            (
                "jobs/transfer.py",
                [
                    "--pretrained",
                    "no-such-run",
                    "--benchmarks",
                    "no_such_benchmark",
                    "--tracking-uri",
                    "http://127.0.0.1:9",
                ],
                {},
                ["benchmarks: unknown benchmark(s) 'no_such_benchmark'"],
                60,
            )
        )
        cases.append(
            (
                "jobs/transfer.py",
                ["--pretrained", "x", "--benchmarks", "digits_heldout", "--fewshot", "1,five"],
                {},
                ["--fewshot '1,five': give shot counts as integers"],
                60,
            )
        )
        cases.append(
            (
                "jobs/compare.py",
                ["--runs", "0" * 32, "--tracking-uri", f"sqlite:///{data_dirs['ok'][len('file://') :]}/mlflow.db"],
                {},
                ["compare: ", "0" * 32],
                60,
            )
        )
    return cases


@pytest.mark.timeout(240)
def test_entry_points_exit_with_code_2_naming_the_field_before_any_ray_or_deepspeed_work(data_dirs, tmp_path):
    cases = _job_cases(data_dirs)
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    base_env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}",  # connecting there fails at once and loudly
        "RAY_TMPDIR": str(ray_tmp),  # where a started Ray would put its session_* directory
        "VITPIPE_HOME": str(tmp_path / "home"),  # nothing under the repository's runs/
        "PYTHONPATH": str(REPO),
    }
    base_env.pop("MLFLOW_TRACKING_URI", None)
    # Concurrently: each process spends most of its time importing torch, so they overlap well.
    procs = []
    for script, args, env, _, _ in cases:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(REPO / script), *args],
            cwd=tmp_path,
            env={**base_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((proc, started))
    failures = []
    for (script, args, _, expected, limit), (proc, started) in zip(cases, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=max(1.0, limit - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            failures.append(f"{script} {args}: still running after {limit}s")
            continue
        elapsed = time.monotonic() - started
        probe = json.loads(err.rsplit("PROBE ", 1)[1]) if "PROBE " in err else None
        where = f"{script} {' '.join(args)} (exit {proc.returncode}, {elapsed:.0f}s)"
        if proc.returncode != CONFIG_ERROR_EXIT:
            failures.append(f"{where}: expected exit {CONFIG_ERROR_EXIT}; stderr tail: {err[-800:]}")
            continue
        missing = [text for text in expected if text not in err]
        if missing:
            failures.append(f"{where}: message does not contain {missing}; stderr tail: {err[-800:]}")
        if probe is None or probe["ray_initialized"] or {"ray", "deepspeed"} & set(probe["imported"]):
            failures.append(f"{where}: Ray/DeepSpeed were touched before the config was refused: {probe}")
    sessions = sorted(p.name for p in ray_tmp.rglob("session_*"))
    assert not sessions, f"a Ray session was started: {sessions}"
    assert not failures, "\n".join(failures)
