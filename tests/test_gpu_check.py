"""``make gpu-check-dry`` and the parts of ``scripts/gpu_check.py`` that run without a GPU: the
step list, the report, the pytest counts, and that nothing reaches for the network or a venv."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_dry_lists_the_steps(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(["make", "-s", "gpu-check-dry", f"OUT={out}", f"GPU_PYTHON={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("env", "build", "import", "tests-gpu", "bench-select", "bench-merge", "bench-pipeline", "bench-moe",
                 "bench-lowrank", "tests-cpu"):
        assert f". {name} (<= " in proc.stdout, name
    assert "pip install --no-build-isolation --no-deps --no-index -e ." in proc.stdout
    assert "--gpu" in proc.stdout and "-k 'triton or cuda'" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_steps_fit_the_budget_and_stay_offline():
    gpu_check = load_script()
    steps = gpu_check.steps(Path("/tmp/out"), "python3")
    assert gpu_check.DEADLINE_S <= 480
    names = [s.name for s in steps]
    assert names.index("build") < names.index("tests-gpu") < names.index("bench-merge")
    for step in steps:
        command = " ".join(step.command)
        assert "venv" not in command and "http" not in command
        if "pip" in step.command:
            assert "--no-index" in step.command and "--no-build-isolation" in step.command
    benches = {s.command[1] for s in steps if s.name.startswith("bench-")}
    assert benches == {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert all("--gpu" in s.command for s in steps if s.name.startswith("bench-"))
    env = gpu_check.step_env()
    assert "TRITON_INTERPRET" not in env and env["PIP_NO_INDEX"] == "1"


def test_report_of_one_step(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--steps", "env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (step,) = report["steps"]
    assert step["name"] == "env" and step["rc"] == 0 and "torch" in step["tail"]
    assert {"command", "rc", "duration_s", "counts", "tail", "timed_out"} <= set(step)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# GPU check") and "| env |" in md
    assert (tmp_path / "logs" / "env.log").is_file()


def test_pytest_counts():
    gpu_check = load_script()
    finished = "tests/a.py::t PASSED\n===== 3 passed, 1 failed, 2 skipped, 4 deselected in 1.50s =====\n"
    assert gpu_check.pytest_counts(finished) == {"passed": 3, "failed": 1, "skipped": 2, "error": 0, "xfailed": 0,
                                                 "xpassed": 0, "deselected": 4}
    killed = "tests/a.py::t[x] PASSED  [ 10%]\ntests/a.py::u FAILED  [ 20%]\ntests/b.py::v SKIPPED (why)\n"
    assert gpu_check.pytest_counts(killed) == {"passed": 1, "failed": 1, "skipped": 1, "error": 0, "xfailed": 0,
                                               "xpassed": 0}


def test_ci_runs_the_dry_run():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make gpu-check-dry" in ci and "make lint" in ci
