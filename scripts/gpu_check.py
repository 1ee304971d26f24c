#!/usr/bin/env python3
"""The GPU check (DESIGN.md, "The GPU check"): everything a GPU machine is needed for, in one
command, under 8 minutes, writing ``report.md`` and ``report.json`` into ``--out``.

    python3 scripts/gpu_check.py --out DIR          # make gpu-check OUT=DIR
    python3 scripts/gpu_check.py --dry-run          # make gpu-check-dry: list the steps, run nothing

Made for a machine with one H200, torch 2.11 + CUDA 13, triton 3.6 and pytest preinstalled and
no network: it uses the Python that runs it (no venv) and installs nothing from the network. The
steps, each with its own time limit (a step that fails or runs out of time is recorded, and the
rest still run; the limits shrink to fit the overall deadline):

1. ``env``: python, torch, CUDA, triton, the GPU (``nvidia-smi``);
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` against the torch found there
   (C++ CPU kernels and ``csrc/cuda``; ``TORCH_CUDA_ARCH_LIST`` defaults to the GPU's arch);
3. ``import``: ``mtmerge`` imports, ``_C`` loaded, every op's CPU/CUDA backend;
4. ``tests-gpu``: the op tests that run on CUDA (compiled Triton, never the interpreter;
   opcheck, gradcheck and the public API on CUDA): ``pytest tests/ops -k "triton or cuda"``;
5. ``tests-cpu``: the rest of the op tests (the C++ kernels built against this torch);
6. ``bench-select``, ``bench-merge``, ``bench-pipeline``, ``bench-moe``, ``bench-lowrank``: each
   benchmark's ``--gpu`` mode (``triton.testing.do_bench``), figures kept as JSON.

Every step's output goes to ``DIR/logs/<step>.log``; the report has per step the command, exit
status, duration, pass/fail counts (pytest) and the tail of the output, and the bench figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 470  # 8 minutes minus the time to write the report
TAIL_CHARS = 3000
OP_TESTS = ["tests/ops", "tests/test_constants.py"]
GPU_SELECTION = "triton or cuda"
SHARDS = max(1, min(6, (os.cpu_count() or 2) // 2))

_ENV_CODE = """
import platform, subprocess, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
except Exception as exc:
    print("torch import failed:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
try:
    import pytest
    print("pytest", pytest.__version__)
except Exception as exc:
    print("pytest import failed:", exc)
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
except Exception as exc:
    print("nvidia-smi:", exc)
"""

_IMPORT_CODE = """
import json, torch, mtmerge
from mtmerge import _library
assert _library._C is not None, f"mtmerge._C did not load: {_library.EXTENSION_ERROR}"
print("mtmerge", mtmerge.__version__, "from", mtmerge.__file__)
print("build", json.dumps(_library._C.build_info(), default=str))
print("backends", json.dumps(_library.backends(), indent=1))
assert torch.cuda.is_available(), "no CUDA device"
x = torch.randn(1 << 20, device="cuda")
t, ties = torch.ops.mtmerge.magnitude_threshold(xs=[x], k=1000, selection="exact")
want = torch.topk(x.abs(), 1000).values[-1]
assert torch.equal(t, want), (t, want)
print("smoke: magnitude_threshold on CUDA ok")
"""


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    what: str
    env: dict[str, str] = field(default_factory=dict)
    bench_json: str | None = None  # a file the step writes its figures to
    pytest: bool = False
    attempt: int = 0  # retries of the build append to the first attempt's log


@dataclass
class Result:
    name: str
    command: str
    what: str
    rc: int | None = None
    duration_s: float = 0.0
    timed_out: bool = False
    skipped: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    tail: str = ""
    log: str = ""
    bench: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.skipped and self.rc == 0 and not self.timed_out


def steps(out: Path, python: str) -> list[Step]:
    pytest_args = ["-v", "-p", "no:cacheprovider", "-o", "addopts=-ra --import-mode=importlib", "--tb=short",
                   "--maxfail=200"]
    bench = out / "bench"
    return [
        Step("env", [python, "scripts/gpu_check.py", "--probe", "env"], 30, "python, torch, CUDA, triton, the GPU"),
        Step("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
             210, "build mtmerge._C (C++ and csrc/cuda) against the torch found here"),
        Step("import", [python, "scripts/gpu_check.py", "--probe", "import"], 60,
             "_C loads; backends per op; a CUDA smoke op"),
        Step("tests-gpu", [python, "scripts/gpu_check.py", "--shard-pytest", str(SHARDS), "--", *pytest_args, *OP_TESTS,
                           "-k", GPU_SELECTION], 200,
             f"op tests on CUDA in {SHARDS} parallel pytest processes (Triton compiles in parallel): compiled "
             "Triton, opcheck / gradcheck / public API on CUDA", pytest=True),
        Step("bench-select", [python, "benchmarks/bench_select.py", "--gpu", "--json", str(bench / "select.json")], 45,
             "selection vs torch.kthvalue / topk on the GPU", bench_json=str(bench / "select.json")),
        Step("bench-merge", [python, "benchmarks/bench_merge.py", "--gpu", "--json", str(bench / "merge.json")], 75,
             "fused TIES merge vs the floor and peers on the GPU", bench_json=str(bench / "merge.json")),
        Step("bench-pipeline", [python, "benchmarks/bench_pipeline.py", "--gpu", "--size", "small", "--json",
                                str(bench / "pipeline.json")], 45,
             "the pipeline engine's per-tensor passes on the GPU", bench_json=str(bench / "pipeline.json")),
        Step("bench-moe", [python, "benchmarks/bench_moe.py", "--gpu", "--tokens", "1", "64", "2048", "--json",
                           str(bench / "moe.json")], 90,
             "MoE experts vs transformers eager / grouped_mm and the floor on the GPU",
             bench_json=str(bench / "moe.json")),
        Step("bench-lowrank", [python, "benchmarks/bench_lowrank.py", "--gpu", "--json", str(bench / "lowrank.json")],
             90, "low-rank family vs PEFT / SDPA / the reference on the GPU", bench_json=str(bench / "lowrank.json")),
        Step("tests-cpu", [python, "scripts/gpu_check.py", "--shard-pytest", str(SHARDS), "--", *pytest_args, *OP_TESTS,
                           "-k", f"not ({GPU_SELECTION})"], 120,
             "the other op tests: the C++ kernels built against this torch (last: CI runs them too)", pytest=True),
    ]


def step_env() -> dict[str, str]:
    """The environment of every step: compiled Triton (never the interpreter), the build sized
    to this machine, no network for pip."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env.setdefault("PIP_NO_INDEX", "1")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "TORCH_CUDA_ARCH_LIST" not in env:
        arch = _gpu_arch()
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
    return env


def _gpu_arch() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0].strip() if out and re.fullmatch(r"\d+\.\d+", out[0].strip()) else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def pytest_counts(text: str) -> dict[str, int]:
    """Counts of one pytest run's output: from its final summary line, or, when it was killed
    by its time limit before printing one, from the ``pytest -v`` lines of the tests that ran."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "xfailed": 0, "xpassed": 0}
    for outcome in re.findall(r"::\S*\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text):
        key = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(outcome, outcome.lower())
        counts[key] += 1
    summary = re.findall(r"=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*) in [\d.]+s", text)
    if summary:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                                       summary[-1]):
            counts["error" if word.startswith("error") else word] = int(number)
    return counts


def run_step(step: Step, env: dict[str, str], logs: Path, time_left: float) -> Result:
    result = Result(step.name, shlex.join(step.command), step.what, log=str(logs / f"{step.name}.log"))
    limit = int(min(step.timeout_s, time_left))
    if limit < 5:
        result.skipped = f"no time left ({time_left:.0f} s before the deadline)"
        return result
    start = time.monotonic()
    with open(result.log, "a" if step.attempt else "w") as log:
        if step.attempt:
            log.write(f"\n===== retry {step.attempt}: {result.command}\n")
            log.flush()
        proc = subprocess.Popen(step.command, cwd=ROOT, env={**env, **step.env, "GPU_CHECK_STEP": step.name},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            result.rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group: pytest workers, compilers
            result.rc = proc.wait()
    result.duration_s = round(time.monotonic() - start, 1)
    text = Path(result.log).read_text(errors="replace")
    for shard in sorted(logs.glob(f"{step.name}-shard*.log")):  # pytest shards write their own logs
        text += f"\n===== {shard.name}\n" + shard.read_text(errors="replace")
    retry = _retry_build(step, text) if step.name == "build" and result.rc != 0 else None
    if retry is not None:
        retried = run_step(retry, env, logs, time_left - result.duration_s)
        retried.duration_s = round(retried.duration_s + result.duration_s, 1)
        return retried
    result.tail = text[-TAIL_CHARS:]
    if step.pytest:
        result.counts = {}
        for chunk in text.split("\n===== "):  # one chunk per pytest process
            for key, value in pytest_counts(chunk).items():
                result.counts[key] = result.counts.get(key, 0) + value
    if step.bench_json and Path(step.bench_json).is_file():
        result.bench = json.loads(Path(step.bench_json).read_text())
    return result


def _retry_build(step: Step, text: str) -> Step | None:
    """pip refusing the system site-packages: once with --break-system-packages, or --user;
    pip failing otherwise: ``setup.py build_ext --inplace`` (later steps then import mtmerge
    from the source tree, see :func:`use_source_tree`)."""
    if step.command[1:3] != ["-m", "pip"]:
        return None
    if "externally-managed-environment" in text and "--break-system-packages" not in step.command:
        return Step(step.name, [*step.command[:-2], "--break-system-packages", *step.command[-2:]], step.timeout_s,
                    step.what + " (retried with --break-system-packages)", attempt=step.attempt + 1)
    if "Permission denied" in text and "--user" not in step.command:
        return Step(step.name, [*step.command[:-2], "--user", *step.command[-2:]], step.timeout_s,
                    step.what + " (retried with --user)", attempt=step.attempt + 1)
    return Step(step.name, [step.command[0], "setup.py", "build_ext", "--inplace"], step.timeout_s,
                step.what + " (pip failed: setup.py build_ext --inplace)", attempt=step.attempt + 1)


def use_source_tree(env: dict[str, str]) -> None:
    """After an in-place build: mtmerge imports from the repository (kernels/ as mtmerge/kernels)."""
    link = ROOT / "mtmerge" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")


def shard_pytest(shards: int, pytest_args: list[str]) -> int:
    """Run ``pytest <pytest_args>`` as ``shards`` concurrent processes, the test files dealt out
    by size; print their outputs one after the other; fail if any failed (5, "no tests", is ok
    for a shard)."""
    paths = [a for a in pytest_args if not a.startswith("-") and (ROOT / a).exists()]
    options = [a for a in pytest_args if a not in paths]
    files: list[Path] = []
    for path in paths:
        p = ROOT / path
        files += sorted(p.rglob("test_*.py")) if p.is_dir() else [p]
    groups: list[list[Path]] = [[] for _ in range(max(1, min(shards, len(files))))]
    loads = [0] * len(groups)
    for f in sorted(files, key=lambda f: f.stat().st_size, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(f)
        loads[i] += f.stat().st_size
    # Tests check results, not speed: one Triton config per kernel (kernels/moe reads
    # MTMERGE_AUTOTUNE at import), so each kernel variant compiles once, not once per config.
    os.environ.setdefault("MTMERGE_AUTOTUNE", "0")
    logs = Path(os.environ.get("GPU_CHECK_LOGS", ROOT))
    step = os.environ.get("GPU_CHECK_STEP", "pytest")
    procs = []
    for i, group in enumerate(groups):
        log = logs / f"{step}-shard{i}.log"
        cmd = [sys.executable, "-m", "pytest", *options, *(str(f.relative_to(ROOT)) for f in group)]
        with open(log, "w") as handle:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT), log, cmd))
    worst = 0
    for proc, log, cmd in procs:
        rc = proc.wait()
        print(f"shard {log.name} (rc {rc}): {shlex.join(cmd)}", flush=True)
        worst = max(worst, 0 if rc == 5 else rc)
    return worst


def write_report(out: Path, results: list[Result], started: float, python: str) -> None:
    total = round(time.monotonic() - started, 1)
    payload = {"total_s": total, "deadline_s": DEADLINE_S, "python": python, "root": str(ROOT),
               "ok": all(r.ok for r in results), "steps": [asdict(r) for r in results]}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# GPU check: {'all steps passed' if payload['ok'] else 'FAILURES'} ({total:.0f} s)", "",
             "| step | what | rc | s | tests | result |", "|---|---|---:|---:|---|---|"]
    for r in results:
        counts = ", ".join(f"{v} {k}" for k, v in r.counts.items() if v) if r.counts else ""
        status = ("skipped: " + r.skipped if r.skipped else "TIMEOUT" if r.timed_out
                  else "ok" if r.rc == 0 else "FAILED")
        lines.append(f"| {r.name} | {r.what} | {'' if r.rc is None else r.rc} | {r.duration_s:.0f} | {counts} | "
                     f"{status} |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"`{r.command}`", ""]
        if r.skipped:
            lines.append(f"skipped: {r.skipped}")
            continue
        if r.bench:
            lines += ["figures: " + f"`{Path(r.log).parent.parent / 'bench'}`", ""]
        lines += ["```", r.tail.rstrip(), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="directory for report.md, report.json, logs/, bench/")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their limits, run nothing")
    parser.add_argument("--steps", nargs="+", default=None, help="run only these steps (by name)")
    parser.add_argument("--python", default=sys.executable, help="the Python to build and test with")
    parser.add_argument("--probe", choices=["env", "import"], help=argparse.SUPPRESS)
    parser.add_argument("--shard-pytest", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard_pytest:
        return shard_pytest(args.shard_pytest, [a for a in args.pytest_args if a != "--"])
    if args.probe:
        exec(compile(_ENV_CODE if args.probe == "env" else _IMPORT_CODE, f"<probe {args.probe}>", "exec"), {})
        return 0
    out = Path(args.out).resolve()
    plan = steps(out, args.python)
    if args.steps:
        unknown = set(args.steps) - {s.name for s in plan}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; steps: {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in args.steps]
    if args.dry_run:
        print(f"GPU check: {len(plan)} steps, deadline {DEADLINE_S} s, report into {out}/report.md + report.json")
        print("environment: TRITON_INTERPRET unset; PIP_NO_INDEX=1; MAX_JOBS=<cores>; "
              "TORCH_CUDA_ARCH_LIST=<the GPU's arch>")
        for i, s in enumerate(plan, 1):
            print(f"{i}. {s.name} (<= {s.timeout_s} s): {s.what}\n   $ {shlex.join(s.command)}")
        return 0
    started = time.monotonic()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    env = step_env()
    env["GPU_CHECK_LOGS"] = str(out / "logs")
    results: list[Result] = []
    for s in plan:
        result = run_step(s, env, out / "logs", DEADLINE_S - (time.monotonic() - started))
        results.append(result)
        if s.name == "build" and result.ok and "build_ext" in result.command:
            use_source_tree(env)
        print(f"[{time.monotonic() - started:5.0f} s] {s.name}: "
              f"{'skipped' if result.skipped else 'TIMEOUT' if result.timed_out else f'rc {result.rc}'} "
              f"{result.counts or ''}", flush=True)
        write_report(out, results, started, args.python)  # a report even if the machine goes away mid-run
    print(f"report: {out / 'report.md'}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
