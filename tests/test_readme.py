"""The README's promises: its Python examples run as written, and CI runs its test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace (later blocks reuse earlier names)."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {number} failed:\n{block}") from error


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    command = lines[lines.index("# install and run the test suite") + 1]
    assert "pytest" in command and command.startswith("pip install torch==2.13.0")
    extracted = subprocess.run(
        ["bash", "-c", "grep -m1 -A1 '^# install and run the test suite' README.md | tail -n 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == command
    assert "install and run the test suite" in (ROOT / ".ci" / "run").read_text()
