"""The benchmark registry: the paper's recipes, VTAB's 19 tasks, name resolution and data layout."""

import pydantic
import pytest

from pipeline.transfer import tasks
from pipeline.transfer.tasks import REGISTRY, VTAB_TASKS, Recipe, resolve_benchmarks, vtab_score


def test_paper_benchmarks_follow_table_4():
    for name, steps in [("imagenet", 20_000), ("cifar10", 10_000), ("cifar100", 10_000), ("pets", 500)]:
        r = REGISTRY[name].recipe
        assert r.steps == steps
        assert (r.batch_size, r.momentum, r.weight_decay, r.grad_clip, r.resolution) == (512, 0.9, 0.0, 1.0, 384)
    assert REGISTRY["cifar10"].recipe.lrs == (0.001, 0.003, 0.01, 0.03)
    assert REGISTRY["imagenet"].recipe.lrs == (0.003, 0.01, 0.03, 0.06)
    assert REGISTRY["flowers102"].num_classes == 102
    assert REGISTRY["imagenet"].real_labels
    vtab = REGISTRY["vtab/dtd"].recipe
    assert (vtab.steps, vtab.lrs) == (2500, (0.01,))


def test_vtab_is_nineteen_tasks_in_three_groups():
    vtab = resolve_benchmarks("vtab")
    assert len(vtab) == 19
    groups = [b.group for b in vtab]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert all(b.name.startswith("vtab/") and b.suite == "vtab" for b in vtab)


def test_vtab_score_is_the_mean_of_all_nineteen_and_absent_when_one_is_missing():
    accs = {f"vtab/{t}": i / 100 for i, t in enumerate(VTAB_TASKS)}
    score, groups = vtab_score(accs)
    assert score == pytest.approx(sum(accs.values()) / 19)
    assert groups["specialized"] == pytest.approx((7 + 8 + 9 + 10) / 400)
    del accs["vtab/dmlab"]
    score, groups = vtab_score(accs)
    assert score is None and groups["structured"] is None and groups["natural"] is not None


def test_resolve_expands_aliases_keeps_order_and_drops_duplicates():
    names = [b.name for b in resolve_benchmarks("lfw, digits_heldout,embedded,cifar10")]
    assert names == ["lfw", "digits_heldout", "cifar10"]


def test_unknown_benchmark_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) 'cifar11'.*known: .*cifar10.*vtab"):
        resolve_benchmarks("cifar10,cifar11")
    with pytest.raises(ValueError, match="no benchmarks given"):
        resolve_benchmarks(" , ")


def test_split_urls_follow_the_data_root_layout():
    b = REGISTRY["pets"]
    assert b.split_url("gs://bucket/benchmarks", "minival") == "gs://bucket/benchmarks/pets/minival.manifest.json"
    assert REGISTRY["vtab/svhn"].split_url("gs://b/r", "test") == "gs://b/r/vtab/svhn/test.manifest.json"
    assert REGISTRY["imagenet"].real_labels_url("gs://b/r") == "gs://b/r/imagenet/real_labels.json"
    assert REGISTRY["cifar10"].real_labels_url("gs://b/r") is None
    with pytest.raises(ValueError, match="unknown split"):
        b.split_url("gs://b/r", "val")


def test_embedded_benchmarks_are_cpu_sized_and_say_how_to_make_their_data():
    for name in ("digits_heldout", "lfw"):
        b = REGISTRY[name]
        r = b.recipe
        assert r.num_gpus == 0 and r.resolution <= 48 and r.steps <= 300 and len(r.lrs) == 2
        for cmd in b.prepare_commands("file:///tmp/data"):
            assert cmd.startswith("python jobs/prepare_data.py") and cmd.endswith(f"--out file:///tmp/data/{name}")
    assert REGISTRY["digits_heldout"].recipe.seeds >= 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"warmup_steps": 100}, "recipe.warmup_steps"),
        ({"lrs": ()}, "recipe.lrs"),
        ({"lrs": (0.01, -1.0)}, "recipe.lrs"),
        ({"micro_batch_size": 5}, "recipe.micro_batch_size: must divide batch_size=32"),
        ({"steps": 0}, "recipe.steps"),
    ],
)
def test_bad_recipes_are_rejected_with_the_field_name(change, message):
    fields = {"resolution": 32, "steps": 100, "warmup_steps": 10, "batch_size": 32, "lrs": (0.01,)} | change
    with pytest.raises(pydantic.ValidationError, match=message):
        Recipe(**fields)


def test_registering_a_benchmark_refuses_to_shadow_an_existing_one():
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_benchmark(REGISTRY["lfw"])


def test_large_models_fine_tune_at_the_papers_higher_resolution_on_paper_benchmarks_only():
    res = tasks.finetune_resolution
    assert res(REGISTRY["cifar10"], "B/16") == 384
    assert res(REGISTRY["cifar10"], "L/16") == 512
    assert res(REGISTRY["imagenet"], "H/14") == 518  # 384 is not a multiple of 14
    assert res(REGISTRY["imagenet"], "ViT-H/14") == 518  # however the variant is spelled
    assert res(REGISTRY["vtab/dtd"], "H/14") == 518
    assert res(REGISTRY["digits_heldout"], "H/14") == REGISTRY["digits_heldout"].recipe.resolution
