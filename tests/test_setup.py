"""The README's set-up commands: scripts/setup.sh finds Python 3.12 as a fresh CI-like machine has it, and CI
(.ci/run) runs the README's first two command blocks as written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(n: int) -> list[str]:
    out = subprocess.run([ROOT / "scripts" / "readme_block.sh", str(n)], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_ci_runs_the_readme_blocks_as_written():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'for block in 1 2; do' in ci and 'bash -euo pipefail -c "$(scripts/readme_block.sh "$block")"' in ci
    assert readme_block(1) == ["scripts/setup.sh && . .venv/bin/activate",
                               'python -m dsv4_jax.generate "Once upon a time" --max-new-tokens 32']
    assert readme_block(2) == ["scripts/setup.sh test,aot && . .venv/bin/activate",
                               "python -m pytest -q -n 2 --dist loadfile tests"]


def _python_312_installed() -> bool:
    return any(Path(os.path.expanduser("~/.pyenv/versions")).glob("3.12*/bin/python3.12")) or any(
        subprocess.run([p, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12))"],
                       capture_output=True).returncode == 0
        for p in (Path(d) / "python3.12" for d in os.environ["PATH"].split(os.pathsep)) if p.exists())


@pytest.mark.skipif(not _python_312_installed(), reason="no Python 3.12 on this machine")
def test_setup_finds_python_312_when_it_is_not_pyenvs_default():
    env = {**os.environ, "PYENV_VERSION": "3.11.7"}  # pyenv's shim for python3.12 then refuses to run
    out = subprocess.run([ROOT / "scripts" / "setup.sh", "--find-python"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    version = subprocess.run([out.stdout.strip(), "--version"], capture_output=True, text=True).stdout
    assert version.startswith("Python 3.12"), version


def test_setup_without_python_312_says_so_in_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([ROOT / "scripts" / "setup.sh", "--find-python"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("setup: no Python 3.12 found") and out.stderr.count("\n") == 1
