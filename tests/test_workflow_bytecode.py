"""The workflow sandbox imports Spine's workflow modules afresh for every run. Without a current
bytecode cache, under PYTHONDONTWRITEBYTECODE, that is a compile from source per run: the
worker says so at start, and the shipped build steps compile them."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
import types
from pathlib import Path

import pytest

from spine.plugin import uncompiled_workflow_modules

ROOT = Path(__file__).resolve().parents[1]


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    source = tmp_path / "fake_workflow.py"
    source.write_text("X = 1\n")
    module = types.ModuleType("spine.workflows.fake_workflow")
    module.__file__ = str(source)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return source


def test_a_workflow_module_without_current_bytecode_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _module(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert "spine.workflows.fake_workflow" in uncompiled_workflow_modules()

    py_compile.compile(str(source), doraise=True)
    assert "spine.workflows.fake_workflow" not in uncompiled_workflow_modules()

    # Edited after it was compiled: the cache no longer matches, it is compiled per run again.
    source.write_text("X = 2  # changed\n")
    os.utime(source, (1, 1))
    assert "spine.workflows.fake_workflow" in uncompiled_workflow_modules()

    # Where Python may write bytecode, it writes it at the first import: nothing to say.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert uncompiled_workflow_modules() == []


def test_the_setup_compiles_spines_workflow_modules() -> None:
    """`make setup` and the container image compile the sources; a worker started after it has
    nothing to compile per run (checked in a fresh interpreter, as a worker starts)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "workflows"], cwd=ROOT, check=True)
    out = subprocess.run(
        [
            sys.executable,
            "-B",
            "-c",
            "import spine.plugin as p; print(p.uncompiled_workflow_modules())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "compileall" in makefile
    assert "--no-compile" not in dockerfile
