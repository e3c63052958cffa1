"""The pure-Python layers (cache, scheduler, workloads, reuse options) never load torch or numpy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "transformers")
PURE_MODULES = ["sparsex.cache", "sparsex.lab.workloads", "sparsex.core.scheduler", "sparsex.core.request",
                "sparsex.kv.admission", "sparsex.reuse.options", "sparsex.segments", "sparsex.sampling_params"]
PURE_FILES = [*sorted((REPO_ROOT / "sparsex" / "cache").glob("*.py")),
              *sorted((REPO_ROOT / "sparsex" / "lab" / "workloads").glob("*.py")),
              *(REPO_ROOT / "sparsex" / f for f in ("core/scheduler.py", "core/request.py", "kv/admission.py",
                                                     "segments.py", "sampling_params.py", "reuse/options.py"))]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_importing_loads_no_heavy_module(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "import sparsex.lab.workloads as w; w.make_workload('rag', 1, 0, doc_tokens=20, num_docs=2)\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": python_path}, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: p.name)
def test_no_pure_module_imports_a_heavy_module_even_lazily(path: Path) -> None:
    """Annotation-only imports (``if TYPE_CHECKING:``) never run and may name torch types."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                 and node.test.id == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"


def test_public_names_are_exported() -> None:
    import sparsex.cache
    import sparsex.lab.workloads

    for mod in (sparsex.cache, sparsex.lab.workloads):
        for name in mod.__all__:
            assert hasattr(mod, name), (mod.__name__, name)
    assert sparsex.lab.workloads.WORKLOADS == (
        "rag", "chat", "agents", "needle", "vartrack", "cwe", "fwe", "lookup", "combine"
    )
