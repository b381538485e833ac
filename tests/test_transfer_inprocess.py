"""Transfer planning and single runs in-process (no Ray, no MLflow server), on tiny real data.

Mostly an official JAX .npz checkpoint (the paper's released weights): it does not say which architecture it holds,
so `--variant` (and its pre-training resolution) must be given and is checked before any run; the fine-tuned model
must start from exactly the checkpoint's weights, with its head dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from fixtures.official_npz import to_official

import model as vit_model
from pipeline import planner, storage
from pipeline.config import ConfigError
from pipeline.config.transfer import build_config
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.transfer import tasks
from pipeline.transfer.finetune import run_finetune, train_step
from pipeline.transfer.orchestrate import describe_plan, execute, gpu_named_by, sized_for_the_cluster
from pipeline.transfer.source import build_model
from pipeline.transfer.sweep import plan_sweep

FAST = ["resolution=24", "steps=3", "warmup_steps=1", "batch_size=8", "eval_every=3", "seeds=1", "lrs=[0.01]"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('benchmarks')}"
    digits = f"{url}/digits_heldout"
    prepare(PrepareOptions(source="digits", out=digits, split="train", classes="5-9", per_class=4))
    for split in ("minival", "test"):
        prepare(PrepareOptions(source="digits", out=digits, split=split, classes="5-9"))
    return url


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Mi/4 at 16 px with a 21k-style head, randomised, saved in the google-research/vision_transformer layout."""
    torch.manual_seed(0)
    vit = vit_model.create_vit("Mi/4", num_classes=7, img_size=16)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("npz") / "Mi_4.npz"
    np.savez(path, **to_official(vit.state_dict(), heads=vit_model.parse_variant("Mi/4").num_heads))
    return vit, f"file://{path}"


def _config(data_root, url, *extra):
    fields = {"pretrained": url, "benchmarks": ["digits_heldout"], "data_root": data_root, "fewshot": (1,)}
    return build_config(fields, [*FAST, "variant=Mi/4", "checkpoint_img_size=16", *extra])


@pytest.fixture
def digits_variant(data_root, tmp_path):
    """Register a copy of digits_heldout under another name, with changed fields, and its shards under a root of
    its own (returned): digits_variant(name, **update) -> data root URL. Unregistered afterwards."""
    registered = []

    def make(name: str, **update) -> str:
        tasks.register_benchmark(
            tasks.REGISTRY["digits_heldout"].model_copy(update={"name": name, **update}), replace=True
        )
        registered.append(name)
        storage.download_dir(f"{data_root}/digits_heldout", tmp_path / name)
        return f"file://{tmp_path}"

    yield make
    for name in registered:
        del tasks.REGISTRY[name]


def test_an_official_npz_is_loaded_as_is_and_fine_tuned_with_a_new_head(data_root, checkpoint):
    original, url = checkpoint
    plan = plan_sweep(_config(data_root, url))
    assert plan.source.kind == "npz" and plan.source.spec["variant"] == "Mi/4"
    assert plan.source.label == "ViT-Mi/4 (Mi_4.npz)"

    loaded = build_model(plan.source, "pretrained", seed=0)
    expected = {k: v for k, v in original.state_dict().items() if not k.startswith("head.")}
    got = loaded.state_dict()
    assert set(got) - {"head.weight", "head.bias"} == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)

    specs = {spec.kind: spec for spec in plan.specs()}
    tuned = execute(specs["finetune"])  # 24 px: position embeddings resampled from 4x4 to 6x6
    assert 0.0 <= tuned["test_accuracy"] <= 1.0 and 0.0 <= tuned["minival_accuracy"] <= 1.0
    few = execute(specs["fewshot"])
    assert 0.0 <= few["fewshot_1shot"] <= 1.0
    # Of the 20 training images only the drawn ones were embedded: 1 shot x 5 classes x 3 seeds at most.
    assert 5 <= few["train_images_embedded"] <= 15


def test_an_npz_without_its_variant_or_missing_is_refused_before_any_run(data_root, checkpoint, tmp_path):
    _, url = checkpoint
    fields = {"pretrained": url, "benchmarks": ["digits_heldout"], "data_root": data_root}
    with pytest.raises(ConfigError, match=r"does not name its architecture; pass --variant"):
        plan_sweep(build_config(fields, FAST))
    with pytest.raises(ConfigError, match=r"pretrained: .*nowhere\.npz does not exist"):
        plan_sweep(_config(data_root, f"file://{tmp_path}/nowhere.npz"))


def test_an_npz_of_another_architecture_is_refused_before_any_run_with_the_right_variant(data_root, checkpoint):
    _, url = checkpoint
    fields = {"pretrained": url, "benchmarks": ["digits_heldout"], "data_root": data_root}
    with pytest.raises(ConfigError, match=r"Checkpoint is a ViT-Mi/4 .*not ViT-Ti/4 .*use variant 'Mi/4'"):
        plan_sweep(build_config(fields, [*FAST, "variant=Ti/4", "checkpoint_img_size=16"]))
    with pytest.raises(ConfigError, match=r"has a class token, but pool='gap'.*use pool='token'"):
        plan_sweep(build_config(fields, [*FAST, "variant=Mi/4", "checkpoint_pool=gap"]))


def test_a_checkpoint_on_gcs_is_checked_from_its_headers_only(gcs_bucket, tmp_path):
    """A B/16-sized checkpoint (330 MiB) on the GCS emulator: the architecture check must not download it."""
    vit = vit_model.create_vit("B/16", num_classes=0)
    local = tmp_path / "B_16.npz"
    np.savez(local, **to_official(vit.state_dict(), heads=12))
    url = f"{gcs_bucket}/ckpt/B_16.npz"
    storage.put_file(local, url)

    with storage.open_read(url, small_reads=True) as file:
        vit_model.check_npz_architecture(file, "B/16")
        fetched = file.cache.total_requested_bytes
    print(f"checked a {local.stat().st_size / 2**20:.0f} MiB checkpoint from {fetched / 2**10:.0f} KiB of reads")
    assert fetched < 0.02 * local.stat().st_size
    with storage.open_read(url, small_reads=True) as file, pytest.raises(vit_model.CheckpointMismatchError):
        vit_model.check_npz_architecture(file, "L/16")


def test_a_shot_count_that_takes_every_training_image_warns_that_seeds_cannot_differ(data_root, checkpoint, caplog):
    _, url = checkpoint
    fields = {"pretrained": url, "benchmarks": ["digits_heldout"], "data_root": data_root, "fewshot": (1, 4)}
    with caplog.at_level("WARNING", logger="pipeline.transfer"):
        plan_sweep(build_config(fields, [*FAST, "variant=Mi/4", "checkpoint_img_size=16"]))
    assert "4-shot draws all of them, so its seeds do not differ" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.transfer"):
        plan_sweep(_config(data_root, url))  # 1-shot of 4 per class: seeds differ, no warning
    assert "seeds do not differ" not in caplog.text


def test_an_npz_with_a_pre_logits_layer_is_described_by_its_own_headers(data_root, tmp_path):
    """The original ImageNet-21k checkpoints have a representation layer and were trained at another resolution:
    with only --variant given, both come from the file."""
    torch.manual_seed(1)
    vit = vit_model.create_vit("Mi/4", num_classes=7, img_size=24, representation_size=64)
    path = tmp_path / "Mi_4_prelogits.npz"
    np.savez(path, **to_official(vit.state_dict(), heads=4))
    url = f"file://{path}"
    fields = {"pretrained": url, "benchmarks": ["digits_heldout"], "data_root": data_root}

    plan = plan_sweep(build_config(fields, [*FAST, "variant=ViT-Mi/4"]))
    assert plan.source.spec == {"variant": "Mi/4", "img_size": 24, "pool": "token", "representation_size": 64}
    assert plan.source.label == "ViT-Mi/4 (Mi_4_prelogits.npz)"
    loaded = build_model(plan.source, "pretrained", seed=0)
    torch.testing.assert_close(loaded.state_dict()["representation.weight"], vit.state_dict()["representation.weight"])
    assert 0.0 <= execute(plan.specs()[0])["test_accuracy"] <= 1.0  # representation dropped, new head

    with pytest.raises(ConfigError, match=r"checkpoint_representation_size=32: .* has a 64-wide pre-logits layer"):
        plan_sweep(build_config(fields, [*FAST, "variant=Mi/4", "checkpoint_representation_size=32"]))


def test_the_fine_tuning_resolution_follows_the_model_unless_set(
    data_root, checkpoint, digits_variant, monkeypatch, tmp_path
):
    _, url = checkpoint
    # A paper-suite benchmark on the digits shards, and Mi/4 treated like the paper's large models (as L/16 -> 512).
    monkeypatch.setitem(tasks.HIGH_RES_FINETUNE, "Mi/4", 20)
    root = digits_variant("digits_paperlike", suite="paper")
    storage.download_dir(f"{data_root}/digits_heldout", tmp_path / "digits_heldout")  # beside it, the original
    fields = {"pretrained": url, "benchmarks": ["digits_heldout", "digits_paperlike"], "data_root": root}
    no_resolution = [s for s in FAST if not s.startswith("resolution=")]
    plan = plan_sweep(build_config(fields, [*no_resolution, "variant=Mi/4"]))
    got = {p.benchmark.name: p.recipe.resolution for p in plan.benchmarks}
    assert got == {"digits_heldout": tasks.REGISTRY["digits_heldout"].recipe.resolution, "digits_paperlike": 20}

    plan = plan_sweep(build_config(fields, [*FAST, "variant=Mi/4"]))  # resolution=24 set
    assert {p.recipe.resolution for p in plan.benchmarks} == {24}


@pytest.fixture
def digits_with_real(digits_variant, tmp_path):
    """digits_heldout registered as a benchmark with ReaL-style labels (here: each test image's own label)."""
    from pipeline.data import build_eval_loader

    root = digits_variant("digits_real", real_labels=True)
    test = f"{root}/digits_real/test.manifest.json"
    labels = [int(y) for _, ys in build_eval_loader(test, image_size=8, batch_size=64, crop_fraction=None) for y in ys]
    (tmp_path / "digits_real" / "real_labels.json").write_text(json.dumps([[y] for y in labels]))
    return root, tmp_path / "digits_real"


def test_real_labels_are_checked_at_planning_and_withheld_when_test_images_are_unreadable(checkpoint, digits_with_real):
    import io
    import tarfile

    _, url = checkpoint
    root, folder = digits_with_real
    fields = {"pretrained": url, "benchmarks": ["digits_real"], "data_root": root}
    sets = [*FAST, "variant=Mi/4"]
    tuned = execute(plan_sweep(build_config(fields, sets)).specs()[0])
    assert tuned["real_accuracy"] == pytest.approx(tuned["test_accuracy"])  # ReaL labels = the labels here
    assert "test_bad_samples" not in tuned

    real_file = folder / "real_labels.json"
    good_labels = real_file.read_text()
    real_file.write_text(json.dumps(json.loads(good_labels)[:-1]))
    with pytest.raises(ConfigError, match=r"real_labels.json lists \d+ images but the test split has \d+"):
        plan_sweep(build_config(fields, sets))
    real_file.write_text(good_labels)

    # One test image's bytes turn to garbage: the accuracy says it stands on one image fewer, ReaL is withheld.
    shard = folder / "test-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        spoiled = False
        for member, data in members:
            if member.name.endswith(".jpg") and not spoiled:
                data, spoiled = b"not a jpeg" * 10, True
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    tuned = execute(plan_sweep(build_config(fields, sets)).specs()[0])
    assert tuned["test_bad_samples"] == 1
    assert "real_accuracy" not in tuned


def test_a_refit_benchmark_whose_minival_has_other_classes_is_refused_at_planning(checkpoint, digits_variant, tmp_path):
    _, url = checkpoint
    recipe = tasks.REGISTRY["digits_heldout"].recipe.model_copy(update={"refit": True})
    fields = {
        "pretrained": url,
        "benchmarks": ["digits_refit"],
        "data_root": digits_variant("digits_refit", recipe=recipe),
    }
    plan = plan_sweep(build_config(fields, [*FAST, "variant=Mi/4"]))
    assert {s.stage for s in plan.specs() if s.kind == "finetune"} == {"final"}  # one lr: final runs only
    minival = tmp_path / "digits_refit" / "minival.manifest.json"
    manifest = json.loads(minival.read_text())
    manifest["class_names"] = [f"other-{name}" for name in manifest["class_names"]]
    minival.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"'digits_refit': its final runs train on train \+ minival, which cannot"):
        plan_sweep(build_config(fields, [*FAST, "variant=Mi/4"]))


# ---------------------------------------------------------------------------------------------------------------
# Memory: micro-batches and activation checkpointing planned for the GPU a run gets


def _gpu_plan(data_root, url, *sets):
    """The sweep with its runs on one GPU each at the paper's batch of 512 and 384 px (Mi/4: 9,217 tokens)."""
    return plan_sweep(_config(data_root, url, "num_gpus=1", "batch_size=512", "resolution=384", *sets))


def _recipe(plan):
    (finetune,) = {spec.recipe for spec in plan.specs() if spec.kind == "finetune"}  # every run gets the plan's
    return finetune


def test_gpu_runs_get_the_largest_micro_batch_that_fits_their_gpu_and_the_plan_says_which(data_root, checkpoint):
    _, url = checkpoint
    chosen = {}
    for gpu in ("a100-40", "h100"):
        plan = _gpu_plan(data_root, url, f"gpu={gpu}")
        recipe = _recipe(plan)
        chosen[gpu] = (recipe.micro_batch_size, recipe.accumulation, recipe.grad_checkpointing)
        assert recipe.micro_batch_size == planner.plan_transfer_memory("Mi/4", 384, 512, gpu, num_classes=5).micro_batch
    assert chosen == {"a100-40": (64, 8, False), "h100": (256, 2, False)}
    assert "memory: H100 80GB SXM (gpu=h100): micro-batch 256 x 2 accumulated, activation checkpointing off" in (
        describe_plan(plan)
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu=auto takes this machine's own GPU")
def test_gpu_auto_on_a_driver_without_gpu_plans_for_an_h100_and_says_it_assumed_it(data_root, checkpoint):
    _, url = checkpoint
    plan = _gpu_plan(data_root, url)
    assert plan.gpu.key == "h100" and _recipe(plan).micro_batch_size == 256
    assert "gpu=auto assumed h100: --set gpu=<the runs' GPU>" in describe_plan(plan)


def test_checkpointing_is_turned_on_where_only_it_fits_and_what_never_fits_is_refused_with_the_fix(
    data_root, checkpoint
):
    _, url = checkpoint
    # 6144 px (2.4M tokens): one image's activations alone overflow an A100 40GB unless blocks are recomputed.
    recipe = _recipe(_gpu_plan(data_root, url, "gpu=a100-40", "resolution=6144"))
    assert (recipe.micro_batch_size, recipe.grad_checkpointing) == (1, True)
    with pytest.raises(ConfigError) as refused:
        _gpu_plan(data_root, url, "gpu=a100-40", "resolution=6144", "grad_checkpointing=false")
    assert "without activation checkpointing" in str(refused.value)
    assert "drop --set digits_heldout.grad_checkpointing=false" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        _gpu_plan(data_root, url, "gpu=a100-40", "resolution=8192")
    message = str(refused.value)
    assert "even at micro-batch 1 with activation checkpointing" in message and "(a100-80, h100" in message
    assert "--set gpu=<their kind>) or lower --set digits_heldout.resolution" in message
    assert _recipe(_gpu_plan(data_root, url, "gpu=h200", "resolution=8192")).grad_checkpointing


def test_a_micro_batch_set_by_hand_is_kept_where_it_fits_and_refused_naming_the_largest_that_does(
    data_root, checkpoint
):
    _, url = checkpoint
    plan = _gpu_plan(data_root, url, "gpu=a100-40", "micro_batch_size=32")
    assert (_recipe(plan).micro_batch_size, _recipe(plan).grad_checkpointing) == (32, False)
    assert "micro-batch 32 x 16 accumulated, activation checkpointing off" in describe_plan(plan)
    # 128 fits only with checkpointing (the planner's own choice is 64 without): kept, with checkpointing on ...
    recipe = _recipe(_gpu_plan(data_root, url, "gpu=a100-40", "micro_batch_size=128"))
    assert (recipe.micro_batch_size, recipe.grad_checkpointing) == (128, True)
    # ... unless checkpointing is ruled out.
    with pytest.raises(ConfigError, match=r"digits_heldout.micro_batch_size=128 needs .* A100 40GB .* lower it to 64"):
        _gpu_plan(data_root, url, "gpu=a100-40", "micro_batch_size=128", "grad_checkpointing=false")


def test_cpu_runs_keep_the_whole_batch_and_the_plan_says_no_memory_limit_applies(data_root, checkpoint):
    _, url = checkpoint
    plan = plan_sweep(_config(data_root, url, "gpu=a100-40"))  # digits_heldout's recipe runs on CPU
    recipe = _recipe(plan)
    assert (recipe.micro_batch_size, recipe.accumulation, recipe.grad_checkpointing) == (8, 1, False)
    assert "memory: CPU runs: no memory limit applied; micro-batch 8 x 1 accumulated" in describe_plan(plan)
    # Even at a size no GPU would hold: the CPU run is not sized.
    assert _recipe(plan_sweep(_config(data_root, url, "resolution=8192"))).micro_batch_size == 8


def test_a_fine_tuning_run_with_checkpointing_recomputes_its_blocks_and_trains_the_same(
    data_root, checkpoint, monkeypatch
):
    import model.vit

    _, url = checkpoint
    (spec,) = [s for s in plan_sweep(_config(data_root, url)).specs() if s.kind == "finetune"]
    recomputed = []

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(model.vit, "checkpoint", counting_checkpoint)
    runs = {}
    for ckpt in (False, True):
        losses = []

        def keep_loss(metrics: dict, step: int, losses=losses) -> None:
            if "train_loss" in metrics:
                losses.append(metrics["train_loss"])

        one = dataclasses.replace(spec, recipe=spec.recipe.model_copy(update={"grad_checkpointing": ckpt}))
        metrics = run_finetune(one, keep_loss)
        runs[ckpt] = (len(recomputed), losses, metrics["test_accuracy"])
    assert runs[False][0] == 0 and runs[True][0] > 0
    assert runs[True][1] == pytest.approx(runs[False][1], abs=1e-5) and runs[True][2] == runs[False][2]


def test_an_accumulated_step_gives_the_update_of_one_full_batch():
    """4 micro-batches of 2 accumulated == one batch of 8: same loss, gradient norm and weights after SGD with
    momentum and clipping (clip 0.5 is active here, so the norm must be of the accumulated gradient)."""
    torch.manual_seed(0)
    whole = vit_model.create_vit("Mi/4", num_classes=5, img_size=16, head_zero_init=False)
    accumulated = copy.deepcopy(whole)
    before = copy.deepcopy(whole.state_dict())
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 5, (8,))

    def step(vit, accumulation):
        vit.train()
        optimizer = torch.optim.SGD(vit.parameters(), lr=0.1, momentum=0.9)
        micro = len(images) // accumulation
        batches = iter([(images[i : i + micro], labels[i : i + micro]) for i in range(0, len(images), micro)])
        return train_step(vit, optimizer, batches, accumulation=accumulation, grad_clip=0.5, device=torch.device("cpu"))

    (loss_1, norm_1), (loss_4, norm_4) = step(whole, 1), step(accumulated, 4)
    assert norm_1 > 0.5  # clipping acted
    assert loss_4 == pytest.approx(loss_1, abs=1e-6) and norm_4 == pytest.approx(norm_1, rel=1e-5)
    moved = max((whole.state_dict()[k] - before[k]).abs().max().item() for k in before)
    diff = max((whole.state_dict()[k] - accumulated.state_dict()[k]).abs().max().item() for k in before)
    assert moved > 1e-3 and diff <= 1e-6, (moved, diff)


def test_a_cluster_whose_resources_name_another_gpu_gets_its_runs_sized_again_for_it(data_root, checkpoint):
    _, url = checkpoint
    assert gpu_named_by({"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0}).key == "h100"
    assert gpu_named_by({"accelerator_type:H100": 1.0, "accelerator_type:A100": 1.0}).key == "a100-40"  # the least
    assert gpu_named_by({"CPU": 2.0}) is None
    planned = _gpu_plan(data_root, url, "gpu=h100")
    for resources, micro in [({"accelerator_type:A100": 1.0}, 256), ({"CPU": 2.0}, 256)]:
        assert _recipe(sized_for_the_cluster(planned, resources)).micro_batch_size == micro  # gpu= set: kept
    auto = dataclasses.replace(planned, cfg=planned.cfg.model_copy(update={"gpu": "auto"}))
    resized = sized_for_the_cluster(auto, {"accelerator_type:A100": 1.0})
    assert resized.gpu.key == "a100-40" and _recipe(resized).micro_batch_size == 64
    assert "A100 40GB (the Ray cluster's GPUs): micro-batch 64 x 8" in describe_plan(resized)
    assert sized_for_the_cluster(auto, {"CPU": 2.0}) is auto  # names no GPU: as planned
