"""setup.py finds its packages itself: every package directory under ``mtmerge/`` and
``kernels/`` (installed as ``mtmerge.kernels``) is installed, so a new subpackage is never
silently left out of a wheel."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
# source directory -> the package name it is installed as
TREES = {"mtmerge": "mtmerge", "kernels": "mtmerge.kernels"}


def package_dirs() -> dict[str, Path]:
    """Every directory holding an ``__init__.py`` under the package trees, by installed name."""
    found = {}
    for top, name in TREES.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" not in filenames:
                dirnames[:] = []  # setuptools does not look below a non-package either
                continue
            rel = Path(dirpath).relative_to(ROOT / top)
            found[".".join([name, *rel.parts])] = Path(dirpath)
    return found


def setup_kwargs(monkeypatch) -> dict:
    """What setup.py passes to ``setuptools.setup`` (run without compiling anything)."""
    captured: dict = {}
    monkeypatch.setenv("MTMERGE_SKIP_BUILD", "1")
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_every_package_directory_is_in_setup_py(monkeypatch):
    kwargs = setup_kwargs(monkeypatch)
    packages = set(kwargs["packages"])
    dirs = package_dirs()
    assert {"mtmerge", "mtmerge.kernels", "mtmerge.ops", "mtmerge.reference"} <= set(dirs)
    assert set(dirs) - packages == set(), "package directories that setup.py would leave out"
    assert packages - set(dirs) == set(), "packages setup.py lists without a package directory"
    assert kwargs["package_dir"] == {"mtmerge.kernels": "kernels"}
    assert "kernels" not in packages  # never a top-level `kernels` module


def test_kernels_subpackages_map_to_the_kernels_directory():
    """``mtmerge.kernels.<sub>`` resolves to ``kernels/<sub>`` in this install (e.g. kernels/merge/)."""
    import importlib.util

    for name, path in package_dirs().items():
        if not name.startswith("mtmerge.kernels"):
            continue
        spec = importlib.util.find_spec(name)
        assert spec is not None, name
        assert Path(spec.submodule_search_locations[0]).resolve() == path.resolve(), name


def test_wheel_contains_every_package(tmp_path):
    """A real (pure-Python, MTMERGE_SKIP_BUILD=1) wheel of a copy of the sources has each
    package's ``__init__.py`` at its installed path."""
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for top in TREES:
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    env = {**os.environ, "MTMERGE_SKIP_BUILD": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation",
                           "--no-deps", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mtmerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in package_dirs():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert not any(n.startswith("kernels/") for n in names)
