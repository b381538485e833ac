"""Evaluation during pretraining (pipeline/pretrain/evaluation.py): precision@1, sharded evaluation equal to an
unsharded one and the same on rerun, and a real Ray + DeepSpeed run whose evaluations happen once per evaluation
step with the same numbers after a worker is killed and the run resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.config.evaluation import FewShotSet
from pipeline.pretrain.evaluation import is_due, precision_at_1


def test_precision_at_1_counts_the_top_class_when_it_is_any_of_the_labels():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert precision_at_1(logits, torch.tensor([1, 2, 2])).tolist() == [1.0, 0.0, 1.0]
    multi_hot = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # image 1's top class (0) is not among its labels
    assert precision_at_1(logits, multi_hot).tolist() == [1.0, 0.0, 1.0]


def test_evaluation_steps_are_every_n_and_the_last():
    assert [s for s in range(0, 11) if is_due(s, 4, 10)] == [4, 8, 10]
    assert not any(is_due(s, 0, 10) for s in range(11))


def _prepare(out: Path, *, classes: str, split: str, per_class: int | None = None) -> None:
    from pipeline.data.prepare import PrepareOptions, prepare

    prepare(
        PrepareOptions(
            source="digits",
            input=None,
            out=out.as_uri(),
            split=split,
            shard_size=1 << 30,
            samples_per_shard=32,
            classes=classes,
            per_class=per_class,
            split_seed=0,
        )
    )


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 0-4 (all splits, 32 per shard: several shards to shard over) and digits 5-9 as the few-shot benchmark."""
    root = tmp_path_factory.mktemp("evaldata")
    _prepare(root / "d04", classes="0-4", split="all")
    bench = root / "bench" / "digits_heldout"
    _prepare(bench, classes="5-9", split="train", per_class=10)
    _prepare(bench, classes="5-9", split="minival")
    _prepare(bench, classes="5-9", split="test")
    return root


class _Wrapped(torch.nn.Module):
    """What the Evaluator needs of the DeepSpeed engine: calling it, ``.module``, eval()/train()."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _evaluate(rank: int, world: int, root: str, init: str, out: str, loss: str) -> None:
    import model as vit_model
    from pipeline.config import make_layout
    from pipeline.data import check_data
    from pipeline.pretrain.evaluation import Evaluator
    from pipeline.pretrain.trainer import loss_function

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(
        "tiny",
        [
            f"data.train=file://{root}/d04/train.manifest.json",
            f"data.eval=file://{root}/d04/test.manifest.json",
            f"eval.data_root=file://{root}/bench",
            "eval.fewshot=digits_heldout",
            "eval.shots=1,5",
            "eval.seeds=2",
            "eval.every_steps=1",
            "eval.batch_size=16",
            f"train.loss={loss}",
        ],
    )
    plan = make_layout(cfg, check_data(cfg.data, world_size=1))
    torch.manual_seed(0)
    vit = vit_model.create_vit("Mi/4", num_classes=5, img_size=32, representation_size=16)
    torch.nn.init.normal_(vit.head.weight, std=0.5)  # a head that separates classes a little (not zero-init)
    evaluator = Evaluator(
        cfg,
        plan,
        engine=_Wrapped(vit),
        loss_fn=loss_function(loss, 5),
        rank=rank,
        world=world,
        device=torch.device("cpu"),
        dtype=torch.float32,
        metric_logger=None,
    )
    runs = [evaluator.evaluate(), evaluator.evaluate()]
    if rank == 0:
        torch.save(runs, out)
    dist.destroy_process_group()


def _run(world: int, eval_data: Path, tmp_path: Path, name: str, loss: str = "softmax") -> list[dict[str, float]]:
    out = tmp_path / f"{name}.pt"
    init = f"file://{tmp_path}/{name}.init"
    mp.spawn(_evaluate, args=(world, str(eval_data), init, str(out), loss), nprocs=world, join=True)
    return torch.load(out)


def test_sharded_evaluation_equals_the_unsharded_one_and_repeats_exactly(eval_data: Path, tmp_path: Path) -> None:
    """Two ranks (each its part of 180 test images in 6 shards, few-shot embeddings gathered) give the numbers one
    rank gives; evaluating again gives the same numbers."""
    one = _run(1, eval_data, tmp_path, "one")
    two = _run(2, eval_data, tmp_path, "two")
    for runs in (one, two):
        assert runs[0] == runs[1]  # deterministic: the same weights, the same numbers
    single, sharded = one[0], two[0]
    assert (
        single.keys()
        == sharded.keys()
        == {
            "eval/loss",
            "eval/top1",
            "eval/images",
            "fewshot/digits_heldout/1shot",
            "fewshot/digits_heldout/5shot",
        }
    )
    assert single["eval/images"] == sharded["eval/images"] == 180  # every image once
    # Losses are float32 means over batches that the sharding composes differently: equal to float32 precision.
    assert sharded["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-6)
    for key in ("eval/top1", "fewshot/digits_heldout/1shot", "fewshot/digits_heldout/5shot"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-12), key
    assert 0.0 < single["fewshot/digits_heldout/5shot"] <= 1.0


def test_a_sigmoid_run_reports_precision_at_1(eval_data: Path, tmp_path: Path) -> None:
    metrics = _run(1, eval_data, tmp_path, "sigmoid", loss="sigmoid")[0]
    assert "eval/prec@1" in metrics and "eval/top1" not in metrics


def test_preflight_refuses_more_shots_than_a_class_has_and_states_the_cost(eval_data: Path, tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.pretrain import check_before_launch
    from pipeline.pretrain.evaluation import check_evaluation

    base = [
        f"data.train={(eval_data / 'd04' / 'train.manifest.json').as_uri()}",
        f"data.eval={(eval_data / 'd04' / 'minival.manifest.json').as_uri()}",
        f"eval.data_root={(eval_data / 'bench').as_uri()}",
        "eval.fewshot=digits_heldout",
        f"run.root={tmp_path.as_uri()}",
    ]
    with pytest.raises(ConfigError, match=r"eval\.shots=\[25\]: digits_heldout's train split has only 10"):
        check_before_launch(load_config("tiny", [*base, "eval.shots=25"]))
    cfg = load_config("tiny", base)
    plan = check_before_launch(cfg)
    assert [FewShotSet.from_dict(d).name for d in plan.fewshot_sets] == ["digits_heldout"]
    # 90 held-out + 90 minival + 179 test + 25 shots = 384 forwards per evaluation, against 100 steps x 64 images
    # x 3 (forward + backward): 2.0 %.
    assert "384 images per evaluation" in check_evaluation(cfg, plan) and "2.0% of step time" in check_evaluation(
        cfg, plan
    )


# ---------------------------------------------------------------------------------------------------------
# a real run: Ray Train, DeepSpeed ZeRO-2 over gloo, MLflow


def _eval_history(tracking: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    logged = client.get_run(run_id).data.metrics
    keys = [k for k in logged if k.startswith(("eval/", "fewshot/")) and k != "eval/seconds"]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.slow
@pytest.mark.reliability
def test_evaluations_are_logged_at_their_steps_once_and_equal_after_a_kill_and_resume(
    eval_data: Path, tmp_path: Path, ray_connected, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 steps evaluated every 3 (and at the last step), checkpoints every 4. Rank 1 is SIGKILLed after step 6,
    whose evaluation had been logged: Ray restarts the workers from step 4, they train steps 5-6 again but do not
    evaluate step 6 again. Every evaluation appears once, at steps 3, 6 and 8, equal to an unfailed run's."""
    from pipeline import faults
    from pipeline.pretrain import check_before_launch, run

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    histories = {}
    for name, fault in (("straight", None), ("killed", "kill@after_step:6:1")):
        if fault:
            monkeypatch.setenv(faults.ENV, fault)
        cfg = load_config(
            "tiny",
            [
                f"data.train={(eval_data / 'd04' / 'train.manifest.json').as_uri()}",
                f"data.eval={(eval_data / 'd04' / 'minival.manifest.json').as_uri()}",
                f"eval.data_root={(eval_data / 'bench').as_uri()}",
                "eval.fewshot=digits_heldout",
                "eval.every_steps=3",
                f"run.root={tmp_path.as_uri()}",
                f"run.name={name}",
                "train.global_batch=32",
                "train.micro_batch=16",
                "train.steps=8",
                "optim.warmup_steps=2",
                "checkpoint.every_steps=4",
                "scale.max_failures=1",
                f"tracking.uri={tracking}",
            ],
        )
        result = run(cfg, check_before_launch(cfg))
        assert result.status == "finished", result
        histories[name] = _eval_history(tracking, result.mlflow_run_id)
        monkeypatch.delenv(faults.ENV, raising=False)
    assert (tmp_path / "killed" / "_faults" / "kill@after_step-step6-rank1.json").exists()  # the kill happened
    straight, killed = histories["straight"], histories["killed"]
    assert set(straight) == {"eval/loss", "eval/top1", "eval/images", "fewshot/digits_heldout/5shot"}
    for key, points in straight.items():
        assert [step for step, _ in points] == [3, 6, 8], key
    assert killed == straight
