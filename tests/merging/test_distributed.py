"""``torchrun --nproc-per-node 2 -m mtmerge merge``: gloo on CPU, byte-identical to one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtmerge.merging import merge_checkpoints
from tests.merging.conftest import config, make_family, python_env, save_checkpoint
from tests.merging.test_pipeline import load_dir

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")

pytestmark = pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(), reason="needs torchrun and gloo")

# A second merge in the same torchrun processes (the process group is reused): DARE (per-tensor
# seeds, L1 rescale over chunks) and the paper's flavor (global majority sign, >= selection).
_SECOND = """
import sys
from mtmerge.merging import merge_checkpoints
from mtmerge import cli
assert cli.main(["merge", sys.argv[1], "-o", sys.argv[2], "--chunk-size", "512", "--max-shard-size", "2KB",
                 "--no-progress"]) == 0
for cfg, out in zip(sys.argv[3:-2:2], sys.argv[4:-2:2]):
    merge_checkpoints(cfg, out, chunk_bytes=512, max_shard_size="3KB")
try:  # NaN in one tensor, merged by one rank: every rank stops with the error
    merge_checkpoints(sys.argv[-2], sys.argv[-1], chunk_bytes=512)
except ValueError as exc:
    print(f"failed as expected: {exc}", flush=True)
else:
    raise SystemExit("the merge with NaN did not fail")
"""


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_two_ranks_write_the_single_process_bytes(tmp_path, monkeypatch):
    base, dirs, _, models = make_family(tmp_path, coarse=True)  # bf16 with many ties: the tie-counting pass runs
    configs = {
        "ties_global": config("ties", base, dirs, scope="global"),  # exact: ties split across ranks' chunks
        "dare_ties": config("dare_ties", base, dirs, seed=9),
        "paper_global": config("consensus_ties", base, dirs, scope="global", flavor="paper"),
    }
    from mtmerge.merging.streaming_topk import Selection

    allocations = []
    original = Selection.to_allocate
    monkeypatch.setattr(Selection, "to_allocate", lambda self: allocations.append(original(self)) or
                        allocations[-1])
    paths = {}
    for name, cfg in configs.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
        merge_checkpoints(paths[name], tmp_path / f"{name}-1", chunk_bytes=512,
                          max_shard_size="2KB" if name == "ties_global" else "3KB")
    assert any(allocations)  # some task keeps part of its threshold ties: they straddle chunks and ranks
    poisoned = dict(models[1])
    poisoned["model.norm.weight"] = poisoned["model.norm.weight"].clone()
    poisoned["model.norm.weight"][2] = float("nan")
    save_checkpoint(tmp_path / "nan", poisoned)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config("ties", base, [dirs[0], tmp_path / "nan"])))
    # the CLI path exactly as documented, then more merges in the same ranks
    args = [str(paths["ties_global"]), str(tmp_path / "ties_global-2"),
            str(paths["dare_ties"]), str(tmp_path / "dare_ties-2"),
            str(paths["paper_global"]), str(tmp_path / "paper_global-2"), str(bad), str(tmp_path / "bad-2")]
    script = tmp_path / "driver.py"
    script.write_text(_SECOND)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), *args],
                          capture_output=True, text=True, timeout=600, env=python_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = [line for line in proc.stdout.splitlines() if line.startswith("failed as expected")]
    assert len(failures) == 2 and all("tensor 'model.norm.weight'" in f and "models[1]" in f for f in failures)
    assert not (tmp_path / "bad-2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mtmerge-")] == []
    for name in configs:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        assert len([f for f in _files(one) if f.endswith(".safetensors")]) > 1  # several shards
        assert _files(one) == _files(two), name
        a, b = load_dir(one), load_dir(two)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_dash_m_mtmerge_merge(tmp_path):
    base, dirs, _, _ = make_family(tmp_path, coarse=True)
    cfg = config("ties", base, dirs, scope="global")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    merge_checkpoints(tmp_path / "merge.yaml", tmp_path / "one", chunk_bytes=512, max_shard_size="2KB")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "mtmerge", "merge",
                           str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "two"), "--chunk-size", "512",
                           "--max-shard-size", "2KB"],
                          capture_output=True, text=True, timeout=600, env=python_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("merged 9 tensors") == 1 and "on 2 ranks" in proc.stdout  # rank 0 reports
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
