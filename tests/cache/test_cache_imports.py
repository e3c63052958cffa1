"""The cache layer is pure Python: importing it must not load torch or numpy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import sparsex.cache

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / "sparsex" / "cache"


def test_importing_the_cache_loads_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, sparsex.cache\n"
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


def test_no_cache_module_imports_torch_or_numpy_even_lazily() -> None:
    for path in sorted(CACHE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "numpy"}, f"{path.name} imports {name}"


def test_public_names_are_exported() -> None:
    for name in sparsex.cache.__all__:
        assert hasattr(sparsex.cache, name), name
