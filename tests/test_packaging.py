"""`kernels/` installs as `qtune.kernels` (never as a bare top-level `kernels`), editable and as a wheel."""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_under_qtune():
    spec = importlib.util.find_spec("qtune.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (whl,) = out.glob("qtune-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "qtune/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would clash with HF kernels"
    assert "qtune/csrc/qtune_cpu.c" in names  # the native CPU kernels compile from it on first use
    assert "qtune/data/austen/emma.txt.gz" in names or not (ROOT / "qtune/data/austen/emma.txt.gz").exists()


def test_wheel_imports_qtune_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import importlib.util, qtune.kernels, qtune; "
            "print(qtune.kernels.__file__); print(importlib.util.find_spec('kernels') is None or 'site' not in importlib.util.find_spec('kernels').origin)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()[-2:]
    assert first.startswith(str(target)) and first.endswith("qtune/kernels/__init__.py")
    assert second == "True"
