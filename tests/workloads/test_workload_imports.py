"""The workloads are pure Python: importing them must not load torch, numpy or transformers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import sparsex.workloads

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOADS_DIR = REPO_ROOT / "sparsex" / "workloads"
HEAVY = {"torch", "numpy", "transformers"}


def test_importing_the_workloads_loads_no_heavy_module() -> None:
    code = (
        "import sys, sparsex.workloads as w\n"
        "w.make_workload('rag', 1, 0, doc_tokens=20, num_docs=2)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_no_workload_module_imports_a_heavy_module() -> None:
    for path in sorted(WORKLOADS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"


def test_public_names_are_exported() -> None:
    for name in sparsex.workloads.__all__:
        assert hasattr(sparsex.workloads, name), name
    assert sparsex.workloads.WORKLOADS == ("rag", "chat", "agents", "needle", "vartrack", "cwe", "fwe")
