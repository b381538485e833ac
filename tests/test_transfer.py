"""Transfer sweeps against a real local Ray head and a real MLflow server (fixtures), on tiny real shards.

One sweep fans out three benchmarks x two learning rates (+ few-shot): two healthy embedded benchmarks and one
whose training shard is corrupt. The healthy ones must complete with their curves and summaries, the broken one
must be recorded as FAILED without stopping its siblings, and the comparison must show exactly what MLflow holds.
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics

import pytest
from mlflow.tracking import MlflowClient
from ray.exceptions import WorkerCrashedError

import model as vit_model
from pipeline import compare as cmp
from pipeline import results as schema
from pipeline.cluster import check_resources
from pipeline.config import ConfigError
from pipeline.config.transfer import build_config
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.export import save_exported_model
from pipeline.transfer import orchestrate, tasks
from pipeline.transfer.orchestrate import resource_needs, run_sweep
from pipeline.transfer.source import EXPORT_URI_TAG
from pipeline.transfer.summary import ERROR_TAG
from pipeline.transfer.sweep import plan_sweep

pytestmark = pytest.mark.slow

# Tiny everything: Mi/4 pretrained at 16 px, fine-tuned at 24 px (position embeddings resampled 4x4 -> 6x6).
FAST = [
    "resolution=24",
    "steps=4",
    "warmup_steps=1",
    "batch_size=8",
    "eval_every=2",
    "seeds=1",
    "digits_heldout.seeds=2",
]
BROKEN = "broken_digits"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    url = f"file://{root}"
    digits = f"{url}/digits_heldout"
    prepare(PrepareOptions(source="digits", out=digits, split="train", classes="5-9", per_class=4))
    for split in ("minival", "test"):
        prepare(PrepareOptions(source="digits", out=digits, split=split, classes="5-9"))
    prepare(PrepareOptions(source="lfw", out=f"{url}/lfw", split="all"))
    # A benchmark whose manifests are fine but whose training shard is garbage: only the runs can find out.
    shutil.copytree(root / "digits_heldout", root / BROKEN)
    (root / BROKEN / "train-000000.tar").write_bytes(b"this is not a tar archive" * 100)
    return url


@pytest.fixture(scope="module")
def broken_benchmark():
    b = tasks.REGISTRY["digits_heldout"].model_copy(update={"name": BROKEN, "prepare_args": ()})
    tasks.register_benchmark(b, replace=True)
    yield b
    del tasks.REGISTRY[BROKEN]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, mlflow_server):
    """A tiny exported model and the MLflow 'pretraining run' that points at it, as jobs/pretrain.py leaves them."""
    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment("pretrain-fixture")
    run_id = client.create_run(exp_id, run_name="tiny-fixture").info.run_id
    vit = vit_model.create_vit("Mi/4", num_classes=5, img_size=16, representation_size=128)
    url = f"file://{tmp_path_factory.mktemp('export')}/tiny"
    save_exported_model(vit, url, metadata={"run_name": "tiny-fixture", "mlflow_run_id": run_id})
    client.set_tag(run_id, EXPORT_URI_TAG, url)
    client.set_terminated(run_id, "FINISHED")
    return run_id, url


def _children(client, parent_id):
    return client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=1000,
    )


def test_sweep_records_every_child_and_a_broken_benchmark_fails_alone(
    ray_connected, mlflow_server, data_root, broken_benchmark, pretrained, tmp_path
):
    pretrain_run_id, export_url = pretrained
    result = run_sweep(
        pretrained=export_url,
        benchmarks=["digits_heldout", "lfw", BROKEN],
        fewshot=[1, 2],
        fewshot_seeds=2,
        data_root=data_root,
        tracking_uri=mlflow_server.url,
        experiment="transfer-sweep-test",
        sets=[*FAST, "lfw.refit=true"],  # lfw as the paper's benchmarks: a final run on train + minival
    )
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(result.run_id)
    # The parent links back to the pretraining run (found through the export's metadata).
    assert parent.data.tags[schema.PRETRAIN_RUN_TAG] == pretrain_run_id
    assert parent.data.tags[schema.PRETRAINED_URI_TAG] == export_url
    assert parent.data.tags[schema.MODEL_LABEL_TAG] == "tiny-fixture"
    assert parent.info.status == "FINISHED"

    children = _children(client, result.run_id)
    finetunes = [c for c in children if c.data.tags["kind"] == "finetune"]
    fewshots = [c for c in children if c.data.tags["kind"] == "fewshot"]
    # digits: 2 lrs x 2 seeds, lfw: 2 lrs x 1 seed + 1 final, broken: 2 lrs x 1 seed (no final: none finished);
    # one few-shot run per benchmark.
    assert sorted(c.data.tags["benchmark"] for c in finetunes) == sorted(
        ["digits_heldout"] * 4 + ["lfw"] * 3 + [BROKEN] * 2
    )
    assert sorted(c.data.tags["benchmark"] for c in fewshots) == sorted(["digits_heldout", "lfw", BROKEN])

    for child in children:
        if child.data.tags["benchmark"] == BROKEN:
            assert child.info.status == "FAILED"
            assert f"{BROKEN}/train-000000.tar" in child.data.tags[ERROR_TAG]
            continue
        assert child.info.status == "FINISHED", child.data.tags.get(ERROR_TAG)
        if child.data.tags["kind"] == "finetune":
            # Curves over steps, the recipe as params.
            curve = client.get_metric_history(child.info.run_id, "test_accuracy")
            assert [m.step for m in curve] == [2, 4]
            minival_evals = 0 if child.data.params["stage"] == "final" else 2  # a final run trained on minival
            assert len(client.get_metric_history(child.info.run_id, "minival_accuracy")) == minival_evals
            assert child.data.params["momentum"] == "0.9" and child.data.params["grad_clip"] == "1.0"
            assert child.data.params["resolution"] == "24"
        else:
            # The mean and sample std over the seeds' own accuracies, exactly.
            for k in (1, 2):
                seeds = [child.data.metrics[f"fewshot_{k}shot_seed{s}"] for s in range(2)]
                assert child.data.metrics[f"fewshot_{k}shot"] == statistics.mean(seeds)
                # the same sample std, up to the last bit of float rounding (the run sums in another order)
                assert child.data.metrics[f"fewshot_{k}shot_std"] == pytest.approx(statistics.stdev(seeds), rel=1e-12)

    # Every child's metrics in MLflow are exactly what its run returned to the driver.
    returned = {o.spec.run_id: o.metrics for o in result.outcomes if o.status == "FINISHED"}
    for child in children:
        if child.info.status == "FINISHED":
            got = returned[child.info.run_id]
            assert {k: child.data.metrics[k] for k in got} == got, child.info.run_name

    # The parent summary is the best-on-minival learning rate's mean over seeds, recomputed here from the children.
    digits = [c for c in finetunes if c.data.tags["benchmark"] == "digits_heldout"]
    by_lr: dict[float, list] = {}
    for c in digits:
        by_lr.setdefault(float(c.data.params["lr"]), []).append(c)
    minival = {lr: statistics.mean(c.data.metrics["minival_accuracy"] for c in runs) for lr, runs in by_lr.items()}
    best = max(sorted(minival), key=minival.get)  # ties: the first in the sweep (0.01, 0.03)
    tests = [c.data.metrics["test_accuracy"] for c in by_lr[best]]
    metrics = parent.data.metrics
    assert metrics["digits_heldout/best_lr"] == best
    assert metrics["digits_heldout/test_accuracy"] == statistics.mean(tests)  # exact: mean is order-independent
    assert metrics["digits_heldout/test_accuracy_std"] == pytest.approx(statistics.stdev(tests), rel=1e-12)
    # Few-shot rows are their child run's numbers, exactly.
    for child in fewshots:
        name = child.data.tags["benchmark"]
        for k in (1, 2):
            if name == BROKEN:
                assert f"{name}/fewshot_{k}shot" not in metrics
                continue
            assert metrics[f"{name}/fewshot_{k}shot"] == child.data.metrics[f"fewshot_{k}shot"]
            assert metrics[f"{name}/fewshot_{k}shot_std"] == child.data.metrics[f"fewshot_{k}shot_std"]
    # lfw reports its final run: the minival winner retrained on train + minival.
    lfw = {c.data.params["stage"]: c for c in finetunes if c.data.tags["benchmark"] == "lfw"}
    lfw_select = [c for c in finetunes if c.data.tags["benchmark"] == "lfw" and c.data.params["stage"] == "select"]
    winner = max(
        sorted(lfw_select, key=lambda c: float(c.data.params["lr"])), key=lambda c: c.data.metrics["minival_accuracy"]
    )
    assert float(lfw["final"].data.params["lr"]) == metrics["lfw/best_lr"] == float(winner.data.params["lr"])
    assert metrics["lfw/test_accuracy"] == lfw["final"].data.metrics["test_accuracy"]
    assert parent.data.tags[schema.status_tag(BROKEN)] == schema.STATUS_FAILED
    assert f"{BROKEN}/test_accuracy" not in metrics

    # The comparison shows the broken benchmark as a gap and our numbers as logged.
    table = cmp.compare(run_ids=[result.run_id], tracking_uri=mlflow_server.url, out_dir=tmp_path, log_run=False)
    rows = {r["benchmark"]: r for r in csv.DictReader(io.StringIO(table.files["csv"].read_text()))}
    assert set(rows) == {
        "digits_heldout",
        "digits_heldout/fewshot_1shot",
        "digits_heldout/fewshot_2shot",
        "lfw",
        "lfw/fewshot_1shot",
        "lfw/fewshot_2shot",
        BROKEN,
        f"{BROKEN}/fewshot_1shot",
        f"{BROKEN}/fewshot_2shot",
    }
    assert rows[BROKEN]["tiny-fixture"] == "failed"
    assert rows["lfw"]["tiny-fixture"] == f"{100 * metrics['lfw/test_accuracy']:.2f}"


def test_job_submit_resolves_a_pretraining_run_and_runs_the_scratch_baseline(
    ray_cluster, mlflow_server, data_root, pretrained, tmp_path
):
    pretrain_run_id, _ = pretrained
    proc = ray_cluster.job_submit(
        "python",
        "jobs/transfer.py",
        "--pretrained",
        pretrain_run_id,
        "--benchmarks",
        "lfw",
        "--scratch",
        "--tracking-uri",
        mlflow_server.url,
        "--experiment",
        "transfer-job-test",
        "--set",
        f"data_root={data_root}",
        *[arg for s in [*FAST, "lrs=0.01"] if not s.startswith("digits") for arg in ("--set", s)],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("transfer-job-test")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.{schema.ROLE_TAG} = '{schema.SWEEP_ROLE}'")
    by_init = {p.data.tags[schema.INIT_TAG]: p for p in parents}
    assert set(by_init) == {"pretrained", "scratch"}
    assert by_init["pretrained"].data.tags[schema.SCRATCH_RUN_TAG] == by_init["scratch"].info.run_id
    assert by_init["pretrained"].data.tags[schema.PRETRAIN_RUN_TAG] == pretrain_run_id
    for p in parents:
        assert "lfw/test_accuracy" in p.data.metrics
        assert len(_children(client, p.info.run_id)) == 1

    # The scratch baseline joins the comparison by itself, in a column named as such.
    result = cmp.compare(run_ids=[by_init["pretrained"].info.run_id], tracking_uri=mlflow_server.url, out_dir=tmp_path)
    header = next(csv.reader(io.StringIO(result.files["csv"].read_text())))
    assert header[:3] == ["benchmark", "tiny-fixture", "tiny-fixture (scratch)"]


def test_configuration_errors_surface_before_any_run_is_created(tmp_path, data_root, pretrained):
    _, export_url = pretrained
    uri = f"sqlite:///{tmp_path / 'untouched.db'}"
    base = {"pretrained": export_url, "data_root": data_root, "tracking_uri": uri}

    with pytest.raises(ConfigError, match=r"unknown benchmark\(s\) 'cifar11'; known: .*cifar10"):
        plan_sweep(build_config({**base, "benchmarks": ["cifar11"]}))
    # A paper benchmark without shards under the root: named, with its URL.
    with pytest.raises(ConfigError, match=r"benchmark 'pets': split train is missing .*/pets/train.manifest.json"):
        plan_sweep(build_config({**base, "benchmarks": ["lfw", "pets"]}))
    with pytest.raises(ConfigError, match=r"lfw: recipe.warmup_steps"):
        plan_sweep(build_config({**base, "benchmarks": ["lfw"]}, ["steps=5", "warmup_steps=9"]))
    with pytest.raises(ConfigError, match=r"--set stepz: unknown key"):
        build_config({**base, "benchmarks": ["lfw"]}, ["stepz=5"])
    with pytest.raises(ConfigError, match=r"fewshot: benchmark 'digits_heldout' has only 4 training images"):
        plan_sweep(build_config({**base, "benchmarks": ["digits_heldout"], "fewshot": [5]}))
    with pytest.raises(ConfigError, match=r"benchmark_recipes.vtab: 'vtab' is not among the benchmarks"):
        plan_sweep(build_config({**base, "benchmarks": ["lfw"]}, ["vtab.steps=5"]))
    # Nothing reached MLflow.
    assert not (tmp_path / "untouched.db").exists()


def test_an_alias_override_sets_every_member_and_a_members_own_setting_wins(data_root, pretrained):
    _, export_url = pretrained
    fields = {"pretrained": export_url, "data_root": data_root, "benchmarks": ["embedded"]}
    plan = plan_sweep(build_config(fields, ["embedded.steps=17", "lfw.steps=19", "embedded.seeds=2"]))
    got = {p.benchmark.name: (p.recipe.steps, p.recipe.seeds) for p in plan.benchmarks}
    assert got == {"digits_heldout": (17, 2), "lfw": (19, 2)}


@pytest.mark.reliability
def test_a_run_whose_worker_is_killed_is_marked_failed_and_the_others_finish(
    ray_connected, mlflow_server, data_root, pretrained
):
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_tasks

    _, export_url = pretrained
    box: dict = {}

    def sweep() -> None:
        box["result"] = run_sweep(
            pretrained=export_url,
            benchmarks=["digits_heldout", "lfw"],
            data_root=data_root,
            tracking_uri=mlflow_server.url,
            experiment="transfer-kill-test",
            # lfw runs long enough to be killed mid-training; digits finishes quickly.
            sets=[*FAST, "digits_heldout.seeds=1", "lfw.lrs=0.01", "lfw.steps=100000", "lfw.eval_every=0"],
        )

    thread = threading.Thread(target=sweep)
    thread.start()
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        running = list_tasks(
            address=ray_connected.dashboard_url,  # other Ray instances may run on this machine
            filters=[("state", "=", "RUNNING")],
            detail=True,
            raise_on_missing_output=False,
        )
        victim = next((t for t in running if t.name.startswith("lfw ") and t.worker_pid), None)
        time.sleep(0.5)
    assert victim is not None, "the lfw run never started"
    time.sleep(2)  # let it get into its training loop
    os.kill(victim.worker_pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()

    result = box["result"]
    client = MlflowClient(mlflow_server.url)
    children = {c.data.tags["benchmark"] + c.data.params["lr"]: c for c in _children(client, result.run_id)}
    killed = children["lfw0.01"]
    assert killed.info.status == "FAILED"
    # The death of its worker process, as Ray reports a SIGKILL: not any error that mentions a worker.
    assert killed.data.tags[ERROR_TAG] == f"WorkerCrashedError: {WorkerCrashedError()}", killed.data.tags
    assert all(c.info.status == "FINISHED" for key, c in children.items() if key.startswith("digits_heldout"))
    parent = client.get_run(result.run_id)
    assert parent.data.tags[schema.status_tag("lfw")] == schema.STATUS_FAILED
    assert "digits_heldout/test_accuracy" in parent.data.metrics


def test_runs_the_cluster_cannot_host_yet_fail_on_a_local_ray_and_wait_for_the_autoscaler_on_a_cluster(
    ray_connected, data_root, pretrained, caplog
):
    _, export_url = pretrained
    fields = {"pretrained": export_url, "benchmarks": ["digits_heldout"], "data_root": data_root, "num_gpus": 1}
    specs = plan_sweep(build_config(fields, FAST)).specs()
    with pytest.raises(ConfigError, match=r"asks for 1 GPU\(s\) but the Ray cluster has 0"):
        check_resources(resource_needs(specs), can_grow=False)
    with caplog.at_level("WARNING", logger="pipeline.cluster"):
        check_resources(resource_needs(specs), can_grow=True)
    assert "asks for 1 GPU(s)" in caplog.text and "autoscaler" in caplog.text


def test_final_runs_that_cannot_be_started_fail_alone_and_the_sweep_still_summarises(
    ray_connected, mlflow_server, data_root, pretrained, monkeypatch
):
    _, export_url = pretrained
    real_create_child = orchestrate._create_child

    def create_child(client, exp_id, parent_id, spec):
        if spec.stage == "final":  # the tracking server goes away just as the final runs are due
            raise ConnectionError("tracking server unreachable")
        return real_create_child(client, exp_id, parent_id, spec)

    monkeypatch.setattr(orchestrate, "_create_child", create_child)
    result = run_sweep(
        pretrained=export_url,
        benchmarks=["lfw", "digits_heldout"],
        data_root=data_root,
        tracking_uri=mlflow_server.url,
        experiment="transfer-final-start-failure",
        sets=[*FAST, "lfw.refit=true"],
    )
    parent = MlflowClient(mlflow_server.url).get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[schema.status_tag("lfw")] == schema.STATUS_FAILED
    assert "could not start: ConnectionError: tracking server unreachable" in parent.data.tags[f"{ERROR_TAG}/lfw"]
    assert parent.data.tags[schema.status_tag("digits_heldout")] == schema.STATUS_OK  # the sibling is unaffected
