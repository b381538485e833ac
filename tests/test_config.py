"""Pretraining config: presets, --set overrides, validation messages, the derived plan, the LR schedule."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from model.variants import resolution_problem
from pipeline.config import (
    ConfigError,
    PretrainConfig,
    apply_overrides,
    load_config,
    make_layout,
    parse_override,
    presets,
)
from pipeline.config.transfer import apply_sets
from pipeline.data import DataInfo
from pipeline.pretrain import check_before_launch, checkpoint_info
from pipeline.schedules import warmup_linear_decay

REPO = Path(__file__).resolve().parents[1]


def _digits(tmp_path_factory: pytest.TempPathFactory, name: str, per_shard: int) -> str:
    from pipeline.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp(name)
    prepare(
        PrepareOptions(
            source="digits",
            input=None,
            out=out.as_uri(),
            split="train",
            shard_size=1 << 30,
            samples_per_shard=per_shard,
            classes="0-4",
            per_class=None,
            split_seed=0,
        )
    )
    return (out / "train.manifest.json").as_uri()


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _digits(tmp_path_factory, "digits", 128)


def _problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return "\n".join(excinfo.value.problems)


# --------------------------------------------------------------------------------------------------- presets


def test_tiny_is_the_default_and_fits_two_cpu_workers() -> None:
    cfg = load_config(presets.DEFAULT_PRESET)
    assert presets.DEFAULT_PRESET == "tiny"
    assert (cfg.model.variant, cfg.data.image_size) == ("Mi/4", 32)
    assert (cfg.scale.workers, cfg.scale.gpus_per_worker, cfg.scale.cpus_per_worker) == (2, 0, 1)
    assert cfg.train.zero_stage == 2 and not cfg.use_bf16
    assert cfg.run_name == "tiny"


@pytest.mark.parametrize("name", ["vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"])
def test_paper_presets_need_data_and_then_validate(name: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(name)
    assert "data.train" in _problems(excinfo) and "--set data.train=gs://" in _problems(excinfo)

    cfg = load_config(name, ["data.train=gs://bucket/shards/train-{000000..000999}.tar"])
    assert cfg.train.global_batch == 4096 and cfg.data.image_size == 224
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.warmup_steps == 10_000 and cfg.optim.grad_clip == 1.0
    assert cfg.on_gpu and cfg.use_bf16
    assert cfg.train.global_batch % (cfg.train.micro_batch * cfg.scale.workers) == 0


def test_paper_recipes() -> None:
    url = ["data.train=gs://b/t.manifest.json"]
    b16, l16, h14 = (load_config(n, url) for n in ("vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"))
    assert (b16.model.variant, b16.optim.lr, b16.optim.weight_decay, b16.model.dropout, b16.train.epochs) == (
        "B/16",
        1e-3,
        0.03,
        0.1,
        90,
    )
    assert (l16.model.variant, l16.optim.lr, l16.optim.weight_decay) == ("L/16", 4e-4, 0.1)
    assert (h14.model.variant, h14.optim.lr, h14.optim.weight_decay, h14.train.epochs) == ("H/14", 3e-4, 0.1, 14)
    # 14 epochs of JFT-300M (303M images) at batch 4096
    jft = DataInfo(num_shards=10_000, num_samples=303_000_000, num_classes=18_291, class_names=None)
    plan = make_layout(h14, jft)
    assert plan.total_steps == math.ceil(14 * 303_000_000 / 4096)
    assert plan.head_bias_init == pytest.approx(-math.log(18_291))  # the paper's ~-10 for sigmoid


@pytest.mark.parametrize("name", ["vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"])
def test_every_paper_preset_has_a_tiny_cpu_sibling_with_its_recipe(name: str) -> None:
    full = load_config(name, ["data.train=gs://b/t.manifest.json"])
    tiny = load_config(f"{name}_tiny")
    assert (tiny.model.variant, tiny.scale.gpus_per_worker, tiny.data.image_size) == ("Mi/4", 0, 32)
    assert tiny.train.loss == full.train.loss == "sigmoid"
    assert (tiny.optim.lr, tiny.optim.weight_decay, tiny.model.dropout) == (
        full.optim.lr,
        full.optim.weight_decay,
        full.model.dropout,
    )
    assert tiny.train.zero_stage == full.train.zero_stage


def test_missing_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("vit_g14")
    assert "vit_g14" in _problems(excinfo) and "vit_h14_jft" in _problems(excinfo)


# --------------------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed_by_the_field() -> None:
    def parse(text: str) -> tuple[str, object]:
        return parse_override(text, PretrainConfig)

    assert parse("train.steps=100") == ("train.steps", 100)
    assert parse("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse("train.activation_checkpointing=true") == ("train.activation_checkpointing", True)
    assert parse("train.zero_stage=3") == ("train.zero_stage", 3)
    # Sequences (held as lists in the settings tree) as JSON, a bracketed list or a comma list.
    assert parse("optim.betas=[0.9,0.95]") == parse("optim.betas=0.9,0.95") == ("optim.betas", [0.9, 0.95])
    assert parse("model.representation_size=null") == ("model.representation_size", None)
    assert parse("model.representation_size=width") == ("model.representation_size", "width")
    assert parse("run.name=123") == ("run.name", "123")
    assert parse("data.train=gs://b/t-{000000..000009}.tar") == ("data.train", "gs://b/t-{000000..000009}.tar")
    cfg = load_config("tiny", ["train.steps=7", "optim.warmup_steps=2", "scale.workers=1", "train.micro_batch=64"])
    assert (cfg.train.steps, cfg.scale.workers) == (7, 1)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1e-3", "'optim.lr'"),  # a key in the wrong section gets the right one suggested
        ("optim.weight_decy=0.1", "'optim.weight_decay'"),
        ("trian.steps=3", "unknown config key"),
        ("train.steps=many", "train.steps=many"),
        ("train.zero_stage=4", "train.zero_stage=4"),
        ("optim.betas=0.9", "optim.betas=0.9: give 2 values"),
        ("train=3", "train is a section"),
        ("train.steps", "expected key=value"),
        ("train.steps.x=1", "is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_field(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", [override])
    assert expected in _problems(excinfo)


def test_apply_overrides_does_not_touch_the_preset() -> None:
    tree = presets.get_preset("tiny").model_dump(mode="json", exclude_unset=True)
    out = apply_overrides(tree, ["train.steps=5", "optim.warmup_steps=2"], PretrainConfig)
    assert out["train"]["steps"] == 5 and tree["train"]["steps"] == presets.tiny().train.steps != 5


def test_every_bad_override_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", ["train.lr=1e-3", "train.steps=many", "data.flip"])
    assert len(excinfo.value.problems) == 3


# --------------------------------------------------------------------------------------------------- one grammar


def test_transfer_sets_follow_the_same_typed_grammar() -> None:
    fields = apply_sets(
        {},
        [
            "lrs=[0.01]",
            "pets.lrs=0.003,0.01",
            "lfw.lrs=0.1",
            "benchmarks=[cifar10, pets]",
            "fewshot=1,5",
            "model_label=123",  # a string field: not read as a number
            "variant=null",
            "crop_scale=0.9,1.0",
            "eval_crop_fraction=none",
        ],
    )
    assert fields["recipe"] == {"lrs": [0.01], "crop_scale": [0.9, 1.0], "eval_crop_fraction": None}
    assert fields["benchmark_recipes"] == {"pets": {"lrs": [0.003, 0.01]}, "lfw": {"lrs": [0.1]}}
    assert fields["benchmarks"] == ["cifar10", "pets"] and fields["fewshot"] == [1, 5]
    assert fields["model_label"] == "123" and fields["variant"] is None


def test_bad_transfer_sets_name_the_key_the_value_and_the_closest_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_sets({}, ["stepz=5", "steps=abc", "lfw.seedz=3", "fewshot=1,five", "crop_scale=0.9", "resolution"])
    problems = excinfo.value.problems
    assert len(problems) == 6
    assert problems[0].startswith("--set stepz: unknown key; did you mean 'steps'?")
    assert problems[1].startswith("--set steps=abc: Input should be a valid integer")
    assert "did you mean 'lfw.seeds'?" in problems[2]
    assert problems[3].startswith("--set fewshot=1,five: ") and "integer" in problems[3]
    assert problems[4].startswith("--set crop_scale=0.9: give 2 values")
    assert problems[5] == "--set 'resolution': expected key=value, e.g. --set steps=500"


def test_the_resolution_check_names_the_field_and_sizes_that_work() -> None:
    assert resolution_problem(32, "Mi/4") is None and resolution_problem(518, "ViT-H/14") is None
    problem = resolution_problem(384, "H/14", field="recipe.resolution")
    assert problem == "recipe.resolution=384 is not a multiple of the patch size 14 of H/14: use e.g. 378 or 392"
    assert resolution_problem(3, "B/16") == "img_size=3 is not a multiple of the patch size 16 of B/16: use e.g. 16"


# --------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        (["train.micro_batch=24"], ["train.global_batch=64", "train.micro_batch=24", "scale.workers=2"]),
        (["train.grad_accum=3"], ["train.grad_accum=3"]),
        (["optim.warmup_steps=5000"], ["optim.warmup_steps=5000", "train.steps=600"]),
        (["train.epochs=3"], ["train.steps", "train.epochs"]),
        (["data.image_size=30"], ["data.image_size=30", "Mi/4"]),
        (["model.variant=Q/16"], ["model.variant"]),
        (["optim.lr=-1"], ["optim.lr"]),
        (["run.name=my run"], ["run.name"]),
        (["run.root=ftp://host/runs"], ["run.root"]),
        (["data.train=pipe:curl x"], ["data.train"]),
        (["tracking.uri=postgres://x"], ["tracking.uri"]),
        (["train.stop_at_step=5000"], ["train.stop_at_step=5000"]),
    ],
)
def test_validation_messages_name_the_field(overrides: list[str], fields: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides)
    text = _problems(excinfo)
    for field in fields:
        assert field in text


def test_unknown_keys_in_a_config_tree_are_rejected() -> None:
    tree = presets.get_preset("tiny").model_dump(mode="json")
    tree["train"]["learning_rate"] = 1.0
    with pytest.raises(Exception) as excinfo:
        PretrainConfig.model_validate(tree)
    assert "learning_rate" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        PretrainConfig.from_tree(tree)
    assert _problems(excinfo) == "train.learning_rate: unknown key: remove it or fix the spelling"
    del tree["train"]["learning_rate"]
    tree["optim"]["weight_decy"] = 0.1
    with pytest.raises(ConfigError) as excinfo:
        PretrainConfig.from_tree(tree)
    assert "optim.weight_decy: unknown key: did you mean 'optim.weight_decay'?" in _problems(excinfo)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", ["optim.lr=-1", "optim.eps=0", "scale.workers=0"])
    text = _problems(excinfo)
    assert "optim.lr" in text and "optim.eps" in text and "scale.workers" in text


def test_relative_sqlite_tracking_uri_becomes_absolute() -> None:
    cfg = load_config("tiny", ["tracking.uri=sqlite:///runs/other.db"])
    assert cfg.tracking.uri.startswith("sqlite:////") and cfg.tracking.uri.endswith("/runs/other.db")


def test_flat_params() -> None:
    flat = load_config("tiny").flat()
    assert flat["train.global_batch"] == 64 and flat["optim.betas"] == "[0.9, 0.999]"
    assert flat["data.image_size"] == 32 and "tracking.uri" in flat


# --------------------------------------------------------------------------------------------------- data + plan


def test_preflight_derives_the_plan_from_the_data(digits_manifest: str, tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"data.train={digits_manifest}", f"run.root={tmp_path.as_uri()}", "run.name=p1"])
    plan = check_before_launch(cfg)
    assert (plan.num_classes, plan.samples_per_epoch, plan.world_size) == (5, 631, 2)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (32, 1, 64)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.global_batch
    assert plan.head_bias_init == 0.0  # softmax
    assert plan.representation_size == 128  # "width" of Mi
    assert plan.run_dir == f"{tmp_path.as_uri()}/p1" and plan.export_dir.endswith("/p1/export")

    by_epochs = load_config(
        "tiny", [f"data.train={digits_manifest}", "train.steps=null", "train.epochs=2", "train.micro_batch=8"]
    )
    plan = check_before_launch(by_epochs)
    assert plan.total_steps == math.ceil(2 * 631 / 64) and plan.grad_accum == 4


def test_preflight_rejects_missing_or_empty_data(digits_manifest: str, tmp_path: Path) -> None:
    missing = load_config("tiny", [f"data.train=file://{tmp_path}/none/train-{{000000..000003}}.tar"])
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(missing)
    assert "data.train" in _problems(excinfo) and "does not exist" in _problems(excinfo)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train-000000.tar").write_bytes(b"")
    (empty / "train-000001.tar").write_bytes(b"")
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(load_config("tiny", [f"data.train=file://{empty}/train-{{000000..000001}}.tar"]))
    assert "is empty" in _problems(excinfo)


def test_preflight_rejects_more_readers_than_shards(digits_manifest: str) -> None:
    # 631 samples in 5 shards cannot feed 8 ranks
    cfg = load_config("tiny", [f"data.train={digits_manifest}", "scale.workers=8", "train.micro_batch=8"])
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(cfg)
    assert "5 shards" in _problems(excinfo) and "workers" in _problems(excinfo)


def test_preflight_tells_how_to_make_the_demo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITPIPE_HOME", str(tmp_path))  # where the demo data would be: not made yet
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(load_config("tiny"))
    assert f"jobs/prepare_data.py --source digits --classes 0-4 --split all --out file://{tmp_path}/runs/data" in (
        _problems(excinfo)
    )


def test_preflight_refuses_a_checkpoint_it_cannot_resume(digits_manifest: str, tmp_path: Path) -> None:
    from pipeline import storage

    cfg = load_config("tiny", [f"data.train={digits_manifest}", f"run.root={tmp_path.as_uri()}", "run.name=r"])
    plan = check_before_launch(cfg)
    # a complete checkpoint written by 4 workers with ZeRO-3 and another global batch: this 2-worker ZeRO-2 config
    # cannot resume it (the number of workers alone may change: tests/test_elastic_resume.py)
    step_dir = storage.join(plan.checkpoint_dir, "step_00000010")
    info = {**checkpoint_info(cfg, plan), "world_size": 4, "zero_stage": 3, "global_batch": 4096, "files": []}
    storage.mark_complete(step_dir, info)
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(cfg)
    text = _problems(excinfo)
    assert "run.name=r" in text and "zero_stage" in text and "global_batch" in text and "new run.name" in text
    assert "world_size" not in text


def test_make_layout_needs_classes_and_size_when_the_data_has_no_manifest() -> None:
    cfg = load_config("tiny", ["train.steps=null", "train.epochs=1"])
    with pytest.raises(ConfigError) as excinfo:
        make_layout(cfg, DataInfo(num_shards=4, num_samples=None, num_classes=None, class_names=None))
    text = _problems(excinfo)
    assert "model.num_classes" in text and "train.epochs" in text


# --------------------------------------------------------------------------------------------------- schedule


def test_warmup_then_linear_decay() -> None:
    lr = [warmup_linear_decay(s, peak_lr=1.0, warmup_steps=4, total_steps=12, end_lr=0.0) for s in range(13)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and lr[8] == pytest.approx(0.5) and lr[12] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(lr[4:]))


# --------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "jobs/pretrain.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_config_errors_exit_2_before_ray(tmp_path: Path) -> None:
    result = _cli("--config", "tiny", "--set", "train.micro_batch=24", "--set", "optim.lr=fast")
    assert result.returncode == 2
    assert "optim.lr=fast" in result.stderr
    result = _cli("--config", "tiny", "--set", f"data.train={(tmp_path / 'x.manifest.json').as_uri()}")
    assert result.returncode == 2 and "data.train" in result.stderr
    assert "Ray" not in result.stdout  # nothing was started


def test_cli_prints_the_resolved_config() -> None:
    result = _cli("--config", "vit_h14_jft", "--set", "data.train=gs://b/t.manifest.json", "--print-config")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["model"]["variant"] == "H/14" and cfg["preset"] == "vit_h14_jft"


def test_defaults_inside_a_ray_job_copy_go_to_the_stable_home_and_paths_inside_the_copy_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ray job submit --working-dir .` runs a temporary copy of the code: the defaults move to ~/.vitpipe, and a
    path given inside the copy (it would be lost with it) is refused naming the field."""
    from pipeline import config
    from pipeline.config import paths

    monkeypatch.delenv(config.HOME_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b")
    defaults = load_config("tiny")
    stable = tmp_path / "user" / ".vitpipe" / "runs"
    assert defaults.run.root == stable.as_uri() and defaults.data.train.startswith(stable.as_uri() + "/data/")
    assert defaults.tracking.uri == f"sqlite:///{stable}/mlflow.db"
    assert config.check_durable_defaults(defaults) == []
    inside = paths.REPO_ROOT.as_uri() + "/runs"
    copied = [
        f"run.root={inside}",
        f"tracking.uri=sqlite:///{paths.REPO_ROOT}/runs/m.db",
        f"data.train={inside}/t.json",
    ]
    problems = config.check_durable_defaults(load_config("tiny", copied))
    assert [p.split(":")[0] for p in problems] == ["run.root", "tracking.uri", "data.train"]
    assert "Ray deletes it" in problems[0] and str(stable) in problems[0] and "VITPIPE_HOME" in problems[0]
    explicit = [
        f"run.root={tmp_path.as_uri()}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        f"data.train={tmp_path.as_uri()}/train.manifest.json",
    ]
    assert config.check_durable_defaults(load_config("tiny", explicit)) == []
    # Several sources: any one inside the copy is refused.
    joined = [*explicit[:2], f"data.train={tmp_path.as_uri()}/train.manifest.json :: {inside}/data/extra.manifest.json"]
    assert [p.split(":")[0] for p in config.check_durable_defaults(load_config("tiny", joined))] == ["data.train"]
    monkeypatch.setenv(config.HOME_ENV, str(tmp_path))
    assert load_config("tiny").run.root == (tmp_path / "runs").as_uri()


def test_make_demo_links_the_stable_home_to_its_checkout_once(tmp_path: Path) -> None:
    from pipeline.config.paths import link_home_runs

    runs, home = tmp_path / "checkout" / "runs", tmp_path / "home" / ".vitpipe"
    assert link_home_runs(runs, home).endswith("(linked now)")
    assert (home / "runs").resolve() == runs.resolve()
    assert "(linked now)" not in link_home_runs(runs, home)  # the second time: nothing to do
    other = tmp_path / "other" / "runs"
    assert "already exists" in link_home_runs(other, home)  # another checkout does not steal the link
    assert (home / "runs").resolve() == runs.resolve()
