"""Every ISA version of the experts' small-M kernel (csrc/moe/small_m.h, ``dots2``), each in a subprocess.

The version is the best this CPU has, capped by the environment variable ``MTMERGE_MAX_ISA``
(avx2 | default), the choice ``mtmerge._C.window_isa()`` reports. Each version must match the
reference on items of 1 to 17 rows (so both the small path and BLAS run), with dot lengths that
leave a tail after the 16-lane blocks. The avx512f and avx2 versions add in the same lane order,
so on bfloat16 / float16 inputs (exact float32 products: fused or not, the same sums) they must
give the same bits; on float32 they may differ in where the compiler fuses a multiply-add.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mtmerge import _library

pytestmark = pytest.mark.usefixtures("cpp_kernels")

# Runs in a fresh process (the version is chosen once per process): saves the forward outputs of
# every case and the version's name to argv[1].
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import mtmerge
    from mtmerge import _library
    from mtmerge.reference import moe as ref
    from tests.ops.moe.helpers import EXPERT_TOLERANCES, make_experts, make_weights, make_x

    torch.set_num_threads(1)
    outs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for activation, bias, transposed in (("silu", False, False), ("gpt_oss", True, False),
                                             ("gelu", True, True)):
            T, H, F, E, k = 40, 37, 21, 4, 2
            w = make_experts(E, H, F, dtype, 3, bias=bias, transposed=transposed)
            x = make_x(T, H, dtype, 4)
            weights = make_weights(T, k, torch.float32, 5)
            # expert e gets 1, 3, 9 and 17 rows: items on both sides of the small-M cut
            rows = [1, 3, 9, 17]
            flat = torch.cat([torch.full((n,), e) for e, n in enumerate(rows)])
            flat = torch.cat([flat, torch.full((T * k - len(flat),), -1)])
            ids = flat[torch.randperm(T * k, generator=torch.Generator().manual_seed(6))].view(T, k)
            a = (x, w["gate_up"], w["down"], weights, ids, activation, w["gate_up_bias"], w["down_bias"])
            y = torch.ops.mtmerge.moe_experts(*a)
            torch.testing.assert_close(y, ref.moe_experts(*a), **EXPERT_TOLERANCES[dtype])
            outs.append(y)
    torch.save({"isa": _library._C.window_isa(), "outs": outs}, sys.argv[1])
""")


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def run_version(cap: str | None, path: str) -> dict:
    env = dict(os.environ)
    env.pop("MTMERGE_MAX_ISA", None)
    if cap is not None:
        env["MTMERGE_MAX_ISA"] = cap
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, path], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


def test_every_isa_version(tmp_path):
    if not hasattr(_library._C, "window_isa"):
        pytest.skip("mtmerge._C has no window_isa()")
    results = {}
    for cap in (None, "avx2", "default"):
        results[cap] = run_version(cap, str(tmp_path / f"{cap}.pt"))
    assert results["default"]["isa"] == "default"
    if cpu_has("avx2"):
        assert results["avx2"]["isa"] == "avx2"
    if cpu_has("avx512f") and cpu_has("avx2"):
        assert results[None]["isa"] == "avx512f"
        for a, b in zip(results[None]["outs"], results["avx2"]["outs"], strict=True):
            if a.dtype != torch.float32:
                assert torch.equal(a, b), f"avx512f and avx2 versions must give the same bits on {a.dtype}"
