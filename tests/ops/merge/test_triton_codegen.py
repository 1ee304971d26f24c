"""The merge kernels compile for a GPU without FMA contraction or approximate division (no GPU
needed).

The interpreter ignores fp contraction and approximate division; a compiled kernel with either
would differ from the reference in the last bit on a GPU. So: (1) every launcher of
``mtmerge.kernels.merge`` runs once under the interpreter on small inputs while each kernel
launch's arguments are recorded (types, constexpr values, launch options such as
``enable_fp_fusion``); (2) in a fresh process without the interpreter, every recorded kernel is
compiled for sm_80 with exactly that specialization, and its PTX must hold no ``fma.rn.f32``
and no ``div.approx`` / ``div.full``. Nothing here names a kernel or its parameters, so a
renamed or new kernel is covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("triton_kernels")

_RECORD = textwrap.dedent("""
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    records = {}
    original = interpreter.InterpretedFunction.run

    def describe(v):
        if isinstance(v, torch.Tensor):
            return {"ptr": str(v.dtype).replace("torch.", "")}
        if isinstance(v, (tuple, list)):
            return {"tuple": [describe(x) for x in v]}
        if isinstance(v, bool):
            return {"bool": v}
        if isinstance(v, int):
            return {"int": v}
        if isinstance(v, float):
            return {"float": v}
        if v is None:
            return {"none": None}
        if isinstance(v, str):
            return {"str": v}
        if isinstance(v, tl.dtype):
            return {"tldtype": v.name}
        if isinstance(v, tl.constexpr):
            return describe(v.value)
        return {"repr": repr(v)}

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        key = f"{self.fn.__module__}:{self.fn.__name__}"
        signature = json.dumps({"args": {k: describe(v) for k, v in bound.items()},
                                "options": {k: describe(v) for k, v in options.items()}}, sort_keys=True)
        records.setdefault(key, [])
        if signature not in records[key] and len(records[key]) < 4:
            records[key].append(signature)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run

    from mtmerge import _rng
    from mtmerge.kernels import merge as K
    from mtmerge.reference import merge as ref
    from tests.ops.merge.helpers import keep_all, merge_scalars, rule, task_scalars, task_trim

    gen = torch.Generator().manual_seed(0)
    n = 1000
    base32 = torch.randn(n, generator=gen)
    fts32 = [base32 + 0.1 * torch.randn(n, generator=gen) for _ in range(3)]
    cons = ref.pack_bits(torch.rand(n, generator=gen) < 0.6)
    keep = [_rng.dare_keep_threshold(0.3)] * 3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base, fts = base32.to(dtype), [f.to(dtype) for f in fts32]
        thr, cut = K.delta_threshold(base=base, finetuned=fts, ks=[500, 3, 1000], selection="exact",
                                     allow_nonfinite=False, consensus=cons)
        K.delta_threshold(base=None, finetuned=fts, ks=[1, 2, 3], selection="geq", allow_nonfinite=True,
                          consensus=None)
        K.tie_cutoffs(base=base, finetuned=fts, thresholds=thr, ties_kept=torch.tensor([1, 2, 3]), consensus=cons)
        trim = task_trim(thr, cut, seed=5, keep=keep)
        scalars = task_scalars([1.0, 0.5, 2.0], [1.0, 2.0, 0.5])
        K.dare_abs_sums(base=base, finetuned=fts, task_trim=trim, index_offset=0)
        for elect, weighted, merge, divisor in [("sum", True, "mean", "weight"), ("count", False, "max", "count"),
                                                ("none", False, "sum", "count"), ("sum", False, "mean", "count")]:
            for check in (False, True):
                out = torch.empty(n, dtype=dtype)
                K.merge_fused(base=base, finetuned=fts, task_scalars=scalars, task_trim=trim, consensus=cons,
                              rule=rule(elect, weighted, merge, divisor, check_finite=check),
                              merge_scalars=merge_scalars(0.9, 1.0), out=out, index_offset=0)
            if elect != "none":
                K.elect_sign_total(base=base, finetuned=fts, task_scalars=scalars, task_trim=trim, consensus=None,
                                   rule=rule(elect, weighted), index_offset=0)
        K.merge_fused(base=None, finetuned=fts, task_scalars=scalars, task_trim=task_trim(*keep_all(3)),
                      consensus=None, rule=rule("sum", False, "mean", "count", with_base=False),
                      merge_scalars=merge_scalars(1.0, 1.0), out=torch.empty(n, dtype=torch.float32), index_offset=0)
        K.task_arithmetic(base=base, finetuned=fts, weights=torch.tensor([1.0, 0.5, 2.0]), lam=torch.tensor(0.5))
        K.magnitude_histogram(base=base, finetuned=fts, shift=16, bits=15, prefixes=[0, 0, 0], prefix_shift=31,
                              consensus=cons)
        masks = K.tall_masks(base=base, finetuned=fts, merged=sum(f.float() - base.float() for f in fts),
                             lams=[0.3, 0.4, 0.5])
        K.consensus_mask(masks=masks, k=2)
        t, ties = K.magnitude_threshold(xs=[base, fts[0]], k=700, selection="exact")
        K.threshold_mask(xs=[base, fts[0]], threshold=t, ties_kept=ties, selection="exact", packed=True)
        K.threshold_mask(xs=[base], threshold=t, ties_kept=ties, selection="geq", packed=False)
    json.dump({k: [json.loads(s) for s in v] for k, v in records.items()}, open(sys.argv[1], "w"))
    print(len(records))
""")

_COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
             "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}

    def value(d):
        (kind, v), = d.items()
        if kind == "tuple":
            return tuple(value(x) for x in v)
        if kind == "tldtype":
            return getattr(tl, v)
        if kind == "ptr":
            raise ValueError("a tensor cannot be a constexpr")
        return v

    def typeof(d):
        (kind, v), = d.items()
        if kind == "ptr":
            return "*" + TYPES[v]
        if kind == "tuple":
            return tuple(typeof(x) for x in v)
        if kind == "bool":
            return "i1"
        if kind == "int":
            return "i32" if -2**31 <= v < 2**31 else "i64"
        if kind == "float":
            return "fp32"
        if kind == "none":
            return "constexpr"
        raise ValueError(f"cannot type {d}")

    records = json.load(open(sys.argv[1]))
    problems, compiled = [], 0
    for key, launches in sorted(records.items()):
        module, name = key.split(":")
        fn = getattr(importlib.import_module(module), name)
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        for launch in launches:
            signature, constexprs = {}, {}
            for param in fn.params:
                d = launch["args"].get(param.name)
                if param.is_constexpr or (d is not None and "none" in d):
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value(d) if d is not None else param.default
                else:
                    signature[param.name] = typeof(d)
            options = {k: value(v) for k, v in launch["options"].items()}
            try:
                ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                     target=GPUTarget("cuda", 80, 32), options=options).asm["ptx"]
            except Exception as exc:
                text = str(exc)
                if "ptxas" in text.lower() and "not found" in text.lower():
                    print("NO_PTXAS")
                    sys.exit(0)
                problems.append(f"{key}: does not compile: {type(exc).__name__}: {text[:300]}")
                continue
            compiled += 1
            if "fma.rn.f32" in ptx:
                problems.append(f"{key} {options}: fma.rn.f32 (fp contraction must be off: enable_fp_fusion=False)")
            if "div.approx" in ptx or "div.full" in ptx:
                problems.append(f"{key}: approximate division (division must be IEEE div.rn)")
    print("\\n".join(problems) if problems else f"ok {compiled}")
""")


def test_merge_kernels_compile_for_gpu_exactly(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "MTMERGE_NO_EXTENSION": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    records = tmp_path / "launches.json"
    proc = subprocess.run([sys.executable, "-c", _RECORD, str(records)], env={**env, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recorded = json.loads(records.read_text())
    assert len(recorded) >= 5, sorted(recorded)  # histogram, selection, trim, merge, masks kernels at least
    compile_env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(records)], env=compile_env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    if proc.returncode == 0 and proc.stdout.strip() == "NO_PTXAS":
        pytest.skip("no ptxas to finish the CUDA compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().startswith("ok"), proc.stdout[-4000:]
