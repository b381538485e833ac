"""The house plan, enforced: which packages may import which, and no import cycles inside pipeline/.

Stages (pretrain, transfer, planner) stand side by side on a ground floor (storage, tracking, cluster, config,
results, ...). ``model`` and ``pipeline.data`` sit below every stage, and transfer never reaches into pretraining:
a fine-tune must be able to run where the pretraining code is absent. Every import counts, also those inside
functions: a lazy import hides a cycle, it does not remove it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pipeline.pretrain", "pipeline.transfer", "pipeline.planner")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("model/**/*.py"), *ROOT.glob("pipeline/**/*.py")]
    return {_module_name(p): p for p in files}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its body, resolved to the most specific module."""
    tree = ast.parse(modules[name].read_text())
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pipeline.transfer import tasks` imports the submodule, not the package's namespace.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, modules) for name in modules}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_layering_rules_hold_for_every_import():
    graph = _graph()
    assert any(_within(m, "pipeline.pretrain") for m in graph), "pipeline.pretrain is missing: the plan changed"
    broken = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _within(module, "model") and not _within(target, "model"):
                broken.append(f"{module} -> {target} (model/ imports nothing of pipeline/)")
            if _within(module, "pipeline.data") and any(_within(target, s) for s in STAGES):
                broken.append(f"{module} -> {target} (pipeline.data imports no stage)")
            if _within(module, "pipeline.transfer") and _within(target, "pipeline.pretrain"):
                broken.append(f"{module} -> {target} (transfer never imports pretrain)")
            ground_floor = module.startswith("pipeline.") and not any(_within(module, s) for s in STAGES)
            # The transfer config validates recipe fields against the benchmark registry, the one exception.
            allowed = _within(module, "pipeline.config") and target == "pipeline.transfer.tasks"
            if ground_floor and any(_within(target, s) for s in STAGES) and not allowed:
                broken.append(f"{module} -> {target} (the ground floor imports no stage)")
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_there_are_no_import_cycles_inside_pipeline_or_model():
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", ["pipeline.data", "pipeline.pretrain", "pipeline.transfer", "pipeline.planner"])
def test_each_stage_package_says_what_it_owns(package):
    init = _modules()[package]
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring.split()) >= 10, f"{init} needs a docstring that says what the package owns"


def test_no_module_in_pipeline_is_over_the_size_a_reader_can_hold():
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in ROOT.glob("pipeline/**/*.py")
        if (n := len(p.read_text().splitlines())) > 520
    }
    assert not too_long, f"split these modules (lines): {too_long}"


def test_no_two_public_functions_or_classes_in_pipeline_share_a_name():
    owners: dict[str, list[str]] = {}
    for path in sorted(ROOT.glob("pipeline/**/*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                owners.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in owners.items() if len(paths) > 1}
    assert not shared, f"one name, several meanings: {shared}"
