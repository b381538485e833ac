"""Promises the repository itself makes: the two quick-start commands, CI, and entry points that run from a checkout."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_has_exactly_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S)
    assert block, "the quick start needs a bash code block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_every_entry_point_answers_help():
    jobs = sorted(p for p in (ROOT / "jobs").glob("*.py") if not p.name.startswith("_"))
    assert jobs, "no entry points found under jobs/"
    for job in jobs:
        result = subprocess.run(
            [sys.executable, str(job), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{job.name} --help failed: {result.stderr[-800:]}"
        assert "usage" in result.stdout.lower(), f"{job.name} --help printed no usage"
