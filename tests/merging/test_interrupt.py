"""Interrupted merges: a process killed mid-merge leaves no OUT_DIR and never touches an existing
one; the next merge removes the dead process's temporary directory."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.merging.conftest import PYTHON, config, make_family, python_env


def _start(cfg_path: Path, out: Path, *extra: str, slowdown: str = "0.3") -> subprocess.Popen:
    # A shell without job control starts background commands with SIGINT ignored, and a child
    # inherits that (Python then installs no KeyboardInterrupt handler): restore the default,
    # as an interactive terminal has it, whatever started the tests.
    return subprocess.Popen([PYTHON, "-m", "mtmerge", "merge", str(cfg_path), "-o", str(out), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=python_env(MTMERGE_MERGE_SLOWDOWN=slowdown),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_mid_merge(proc: subprocess.Popen, parent: Path, timeout: float = 120.0) -> Path:
    """Wait until the merge has written into its temporary directory (then a little more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tmps = [p for p in parent.iterdir() if p.name.startswith(".mtmerge-tmp-")]
        if tmps and (tmps[0] / "model.safetensors").exists():
            time.sleep(0.7)  # a couple of tensors merged, most still to go
            assert proc.poll() is None, "the merge finished before it could be interrupted"
            return tmps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the merge never started writing")


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_sigkill_mid_merge_leaves_no_partial_output(tmp_path):
    base, dirs, _, _ = make_family(tmp_path)
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(config("ties", base, dirs)))

    # 1. a new OUT_DIR: killed mid-merge -> no OUT_DIR at all
    proc = _start(cfg_path, tmp_path / "out")
    tmp = _wait_mid_merge(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "out").exists()
    assert tmp.exists()  # SIGKILL runs no clean-up: the temporary directory stays, hidden

    # 2. an existing OUT_DIR with --overwrite: killed mid-merge -> untouched
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes(b"previous merge")
    (tmp_path / "old" / "config.json").write_text("{}")
    before = _snapshot(tmp_path / "old")
    proc = _start(cfg_path, tmp_path / "old", "--overwrite")
    _wait_mid_merge(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _snapshot(tmp_path / "old") == before

    # 3. the next merge succeeds and removes the dead processes' temporary directories
    done = subprocess.run([PYTHON, "-m", "mtmerge", "merge", str(cfg_path), "-o", str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=300, env=python_env())
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mtmerge-")] == []
    assert _snapshot(tmp_path / "old") == before


def test_sigterm_and_sigint_clean_up(tmp_path):
    base, dirs, _, _ = make_family(tmp_path)
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(config("task_arithmetic", base, dirs)))
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        proc = _start(cfg_path, tmp_path / "out")
        _wait_mid_merge(proc, tmp_path)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mtmerge-")] == []
