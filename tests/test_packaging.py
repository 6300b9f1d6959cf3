"""The sdist carries what the wheel needs, and the wheel built from it holds the whole package (no venv, no network:
setuptools' PEP 517 hooks, as ``python -m build`` calls them; .ci/run installs and runs the real wheel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import llm2vec_fast

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "__pycache__", "*.py[cod]", "*.egg-info", "build", "dist", ".venv*", ".whl", ".pytest_cache", ".hypothesis"
)
BUILD = """
import sys, tarfile
from pathlib import Path
from setuptools import build_meta
out = Path(sys.argv[1])
sdist = out / build_meta.build_sdist(str(out))
with tarfile.open(sdist) as archive:
    archive.extractall(out / "unpacked", filter="data")
(unpacked,) = (out / "unpacked").iterdir()
import os
os.chdir(unpacked)
build_meta.build_wheel(str(out))
"""


def _relative(paths, root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in paths if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[set[str], Path, Path]:
    """The sdist's file list, the sdist and the wheel built from the unpacked sdist."""
    work = tmp_path_factory.mktemp("packaging")
    shutil.copytree(ROOT, work / "source", ignore=NOT_SOURCES)
    out = work / "dist"
    out.mkdir()
    environment = {**os.environ, "LLM2VEC_FAST_BUILD_CUDA": "0"}
    subprocess.run(
        [sys.executable, "-c", BUILD, str(out)], cwd=work / "source", env=environment, check=True, capture_output=True
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    with tarfile.open(sdist) as archive:
        sdist_files = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    return sdist_files, sdist, wheel


def test_sdist_holds_the_package_kernels_presets_cuda_sources_test_suite_and_benchmarks(built) -> None:
    sdist_files, sdist, _ = built
    needed = _relative((ROOT / "llm2vec_fast").rglob("*.py"), ROOT) | _relative((ROOT / "kernels").glob("*.py"), ROOT)
    needed |= _relative((ROOT / "llm2vec_fast" / "training" / "presets").glob("*.json"), ROOT)
    needed |= {p for p in _relative((ROOT / "csrc").rglob("*"), ROOT) if p.endswith((".cu", ".cuh", ".h", ".cpp"))}
    needed |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "tests/conftest.py"}
    needed |= _relative((ROOT / "tests" / "data").rglob("*"), ROOT)
    needed |= _relative((ROOT / "benchmarks").glob("*.py"), ROOT)  # some tests import them
    assert needed - sdist_files == set()
    assert not [name for name in sdist_files if "__pycache__" in name or name.endswith(".pyc")]
    assert sdist.name == f"llm2vec_fast-{llm2vec_fast.__version__}.tar.gz"


def test_wheel_from_the_sdist_holds_the_package_kernels_presets_and_command(built) -> None:
    _, _, wheel = built
    archive = zipfile.ZipFile(wheel)
    wheel_files = set(archive.namelist())
    needed = _relative((ROOT / "llm2vec_fast").rglob("*.py"), ROOT)
    needed |= {f"llm2vec_fast/kernels/{path.name}" for path in (ROOT / "kernels").glob("*.py")}
    needed |= _relative((ROOT / "llm2vec_fast" / "training" / "presets").glob("*.json"), ROOT)
    assert needed - wheel_files == set()
    assert not [name for name in wheel_files if name.endswith(".so") or name.startswith("tests/")]
    entry_points = archive.read(f"llm2vec_fast-{llm2vec_fast.__version__}.dist-info/entry_points.txt").decode()
    assert "llm2vec-fast = llm2vec_fast.cli:main" in entry_points
