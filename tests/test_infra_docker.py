"""The images in infra/docker carry the same pins as pyproject.toml (read from both files)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "infra" / "docker"
RAY_DOCKERFILE = DOCKER_DIR / "Dockerfile"
MLFLOW_DOCKERFILE = DOCKER_DIR / "mlflow.Dockerfile"
# The training stack the image must install with exactly the project's pins.
MUST_PIN = {"torch", "torchvision", "deepspeed"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def project_requirements() -> dict[str, Requirement]:
    return {Requirement(dep).name.lower(): Requirement(dep) for dep in project()["dependencies"]}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    out = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def pip_pins(path: Path) -> dict[str, str]:
    """name -> version for every quoted "name==version" / "name[extra]==version" in RUN pip install lines."""
    pins = {}
    for keyword, args in instructions(path):
        if keyword == "RUN" and "pip install" in args:
            for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', args):
                pins[name.lower()] = version
    return pins


def base_image(path: Path) -> str:
    froms = [args for keyword, args in instructions(path) if keyword == "FROM"]
    assert len(froms) == 1, f"{path.name}: one stage expected"
    return froms[0].split()[0]


def final_user(path: Path) -> str:
    users = [args for keyword, args in instructions(path) if keyword == "USER"]
    assert users, f"{path.name} must switch to a non-root user"
    return users[-1]


def torch_cuda_version() -> str:
    """The CUDA version the pinned torch wheel is built for, read from the installed torch (no import)."""
    spec = importlib.util.find_spec("torch")
    assert spec and spec.origin, "torch is part of the project's environment"
    text = (Path(spec.origin).parent / "version.py").read_text()
    version = re.search(r"^__version__ = '([^']+)'", text, re.M).group(1)
    assert version.split("+")[0] == str(project_requirements()["torch"].specifier).removeprefix("=="), version
    match = re.search(r"^cuda: .*= '(\d+\.\d+)'", text, re.M)
    assert match, f"torch {version} is not a CUDA build"
    return match.group(1)


def test_ray_base_image_matches_the_ray_pin_and_python():
    image = base_image(RAY_DOCKERFILE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", image)
    assert match, f"{image}: pin an exact rayproject/ray tag with its CUDA flavour (-cuXYZ), not the moving -gpu"
    ray_version, py_major, py_minor, _ = match.groups()
    assert project_requirements()["ray"].specifier.contains(ray_version), (
        f"base image Ray {ray_version} vs pyproject {project_requirements()['ray']}"
    )
    assert f"{py_major}.{py_minor}" in project()["requires-python"].replace(">=", "").replace("<", " ")


def test_base_image_cuda_is_the_cuda_torch_is_built_for():
    """DeepSpeed refuses to build ops when nvcc's CUDA major differs from torch's; torch 2.14.1 is a cu130 wheel."""
    cuda = torch_cuda_version()
    flavour = re.search(r"-cu(\d+)$", base_image(RAY_DOCKERFILE)).group(1)
    assert flavour == cuda.replace(".", ""), f"base image cu{flavour}, torch built for CUDA {cuda}"
    runs = " ".join(args for keyword, args in instructions(RAY_DOCKERFILE) if keyword == "RUN")
    major = cuda.split(".")[0]
    assert f'grep -q "release {major}\\."' in runs, "the build checks nvcc's CUDA major"
    assert f"torch.version.cuda.startswith('{major}.')" in runs


def _env(path: Path) -> dict[str, str]:
    out = {}
    for keyword, args in instructions(path):
        if keyword == "ENV":
            out.update(re.findall(r'(\w+)="?([^"\s]*)"?', args))
    return out


def deepspeed_ops_the_engine_can_load() -> set[str]:
    """DS_BUILD_* names of the CUDA ops the DeepSpeed config of pipeline/pretrain/engine.py makes DeepSpeed load."""
    engine = (REPO / "pipeline" / "pretrain" / "engine.py").read_text()
    optimizer = re.search(r'"optimizer":\s*\{"type":\s*"(\w+)"', engine)
    assert optimizer, "engine.py names DeepSpeed's optimizer type"
    ops = {"FUSED_ADAM"} if optimizer.group(1).lower() in {"adam", "adamw"} else {f"FUSED_{optimizer.group(1).upper()}"}
    if "offload_optimizer" in engine:
        ops.add("CPU_ADAM")
    if "nvme" in engine:
        ops.add("AIO")
    return ops


def test_deepspeed_ops_are_prebuilt_for_sm90():
    env = _env(RAY_DOCKERFILE)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0", "H100 = sm_90"
    assert env["DS_BUILD_OPS"] == "0", "build only what the engine uses"
    built = {
        name.removeprefix("DS_BUILD_") for name, value in env.items() if name.startswith("DS_BUILD_") and value == "1"
    }
    assert built == deepspeed_ops_the_engine_can_load() and built
    install = next(args for keyword, args in instructions(RAY_DOCKERFILE) if keyword == "RUN" and "deepspeed==" in args)
    assert "--no-build-isolation" in install and "ds_report" in install
    # The ENV line comes before the install it configures.
    steps = [(keyword, args) for keyword, args in instructions(RAY_DOCKERFILE)]
    env_index = next(i for i, (k, a) in enumerate(steps) if k == "ENV" and "DS_BUILD_OPS" in a)
    assert env_index < steps.index(("RUN", install))


def test_training_stack_pins_equal_pyproject():
    pins = pip_pins(RAY_DOCKERFILE)
    requirements = project_requirements()
    assert pins.keys() >= MUST_PIN, f"Dockerfile must pin {sorted(MUST_PIN - pins.keys())}"
    for name, version in pins.items():
        assert name in requirements, f"Dockerfile pins {name}, which pyproject.toml does not list"
        spec = str(requirements[name].specifier)
        assert spec == f"=={version}", f"{name}: Dockerfile =={version}, pyproject {spec}"


def test_ray_image_installs_the_project_and_runs_as_non_root():
    steps = instructions(RAY_DOCKERFILE)
    copies = " ".join(args for keyword, args in steps if keyword == "COPY")
    for path in ("pyproject.toml", "model", "pipeline", "jobs"):
        assert re.search(rf"(^|\s){path}(\s|$)", copies), f"COPY {path}"
    assert any(keyword == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", args) for keyword, args in steps)
    user = final_user(RAY_DOCKERFILE)
    assert user.split(":")[0] not in {"0", "root"}, user
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric user, so Kubernetes can verify runAsNonRoot"
    workdir = [args for keyword, args in steps if keyword == "WORKDIR"][-1]
    assert workdir == "/home/ray/app", "the RayJobs use /home/ray/app as working_dir"


def test_dockerignore_keeps_what_the_image_copies():
    ignore = (DOCKER_DIR / "Dockerfile.dockerignore").read_text().split()
    assert "**" in ignore, "exclude everything by default (virtual environments are GBs)"
    for path in ("pyproject.toml", "README.md", "model/**", "pipeline/**", "jobs/**"):
        assert f"!{path}" in ignore, path


def test_image_tag_in_manifests_names_project_and_ray_versions():
    ray_version = base_image(RAY_DOCKERFILE).split(":")[1].split("-")[0]
    tag = f"vitpipe:{project()['version']}-ray{ray_version}"
    manifests = list((REPO / "infra" / "k8s" / "ray").glob("*.yaml"))
    assert manifests
    for path in manifests:
        images = re.findall(r"image:\s*(\S+)", path.read_text())
        assert images and all(image.endswith("/" + tag) for image in images), f"{path.name}: {images}"
    assert tag in RAY_DOCKERFILE.read_text(), "the build command in the Dockerfile's header uses the same tag"


def test_mlflow_image_pins_a_version_the_project_accepts_and_runs_unprivileged():
    pins = pip_pins(MLFLOW_DOCKERFILE)
    assert "mlflow" in pins
    assert project_requirements()["mlflow"].specifier.contains(pins["mlflow"])
    assert pins["mlflow"].startswith("3.")
    user = final_user(MLFLOW_DOCKERFILE)
    assert int(user.split(":")[0]) >= 10000, "high uid, distinct from any host user"
    image = base_image(MLFLOW_DOCKERFILE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image


@pytest.mark.parametrize("path", [RAY_DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_no_latest_or_untagged_base(path):
    image = base_image(path)
    assert ":" in image and not image.endswith(":latest"), image
