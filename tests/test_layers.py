"""The layer map holds: no import circle, no module imports one of a higher layer, and the serving
path (engine, server) never loads the evaluation lab. Every import counts, lazy ones included."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "sparsex"

# Lowest first: a module may import its own layer or lower ones; the first matching prefix wins.
# Every package (folder) sits in one layer, so the same rule holds between folders.
LAYERS: list[tuple[str, ...]] = [
    ("sparsex.segments", "sparsex.sampling_params", "sparsex.config", "sparsex.detokenize"),  # plain data
    ("sparsex.cache",),                                                      # block bookkeeping (pure)
    ("sparsex.models", "sparsex.tokenizer"),                                 # model files, tokenizer
    ("sparsex.kvstore",),                                                    # store tiers (bytes)
    ("sparsex.kvevents",),                                                   # KV events out
    ("sparsex.kv",),                                                         # what is cached, and where
    ("sparsex.runtime",),                                                    # running a plan on a model
    ("sparsex.reuse",),                                                      # recompute policy
    ("sparsex.core",),                                                       # the engine core's step loop
    ("sparsex.llm", "sparsex"),                                              # LLM, the public API
    ("sparsex.server",),                                                     # HTTP
    ("sparsex.lab", "sparsex.demo"),                                         # evaluation, demo
    ("sparsex.cli",),                                                        # the command line
]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank < 0:
        raise AssertionError(f"{module} has no place in the layer map (tests/test_layers.py LAYERS)")
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports_of(module: str, runtime_only: bool = False) -> set[str]:
    """The sparsex modules ``module`` imports (a ``from pkg import name`` of a submodule counts as it);
    ``runtime_only``: leave out imports made for annotations only (``if TYPE_CHECKING:``)."""
    tree = ast.parse(MODULES[module].read_text())
    skip = type_only_nodes(tree) if runtime_only else set()
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        out.update(n for n in names if n == "sparsex" or n.startswith("sparsex."))
    out.discard(module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}
"""Every import, annotation-only ones included: what the layer and folder rules judge."""
RUNTIME_GRAPH = {m: imports_of(m, runtime_only=True) for m in MODULES}
"""Imports that run: what a module-level import circle is made of."""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > mine)
    assert not upward, f"{module} (layer {mine}) imports higher layers: {upward}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_no_import_circle() -> None:
    # The package facade lazily imports the engine, which every module's package import runs
    # through; edges *to* the facade are real, edges *from* it to the engine are its API. Between
    # folders, annotation-only imports count too (test_no_folder_imports_a_folder_that_imports_it_back).
    graph = {m: {t for t in ts if t != "sparsex"} for m, ts in RUNTIME_GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def folder_of(module: str) -> str:
    """The package a module belongs to (``sparsex.kv.admission`` -> ``sparsex.kv``); a top-level
    module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


FOLDERS = {folder_of(m) for m in MODULES}
FOLDER_GRAPH = {f: {folder_of(t) for m in MODULES if folder_of(m) == f for t in GRAPH[m]} - {f, "sparsex"}
                for f in FOLDERS}


def test_no_folder_imports_a_folder_that_imports_it_back() -> None:
    assert find_cycle(FOLDER_GRAPH) is None, " -> ".join(find_cycle(FOLDER_GRAPH) or [])


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_folder_sits_in_one_layer_and_imports_only_below_it(folder: str) -> None:
    members = {layer_of(m) for m in MODULES if folder_of(m) == folder}
    assert len(members) == 1, f"{folder}'s modules span layers {sorted(members)}"
    upward = sorted(t for t in FOLDER_GRAPH[folder] if layer_of(t) > layer_of(folder))
    assert not upward, f"{folder} imports higher folders: {upward}"


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layer_check_catches_an_upward_import() -> None:
    assert layer_of("sparsex.models.llama") < layer_of("sparsex.kv.paged")  # models must not import storage
    assert layer_of("sparsex.kv.admission") < layer_of("sparsex.core.request")  # admission sees a Protocol
    assert layer_of("sparsex.runtime.executor") < layer_of("sparsex.reuse.planner")  # plans are data
    assert layer_of("sparsex.core.engine") < layer_of("sparsex.lab.quality")
    with pytest.raises(AssertionError):
        layer_of("sparsex_other.module")
    planted = {"sparsex.kv": {"sparsex.core"}, "sparsex.core": {"sparsex.kv"}}
    assert find_cycle(planted) == ["sparsex.core", "sparsex.kv", "sparsex.core"]


def test_serving_path_never_loads_the_lab(tiny_model_dir) -> None:
    """Engine + server, a request through the app, and the CLI's serve parser: no lab module, no plotting."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from sparsex import LLM, SamplingParams
from sparsex.server.app import create_app
from sparsex.cli import main
llm = LLM(model={str(tiny_model_dir("llama"))!r}, kv_cache_memory=8 << 20)
llm.generate("hello there", SamplingParams(max_tokens=2))
with TestClient(create_app(llm)) as client:
    r = client.post("/v1/completions", json={{"model": llm.model_name, "prompt": "hi", "max_tokens": 2}})
    assert r.status_code == 200, r.text
try:
    main(["serve", "--help"])
except SystemExit:
    pass
loaded = sorted(m for m in sys.modules if m.startswith("sparsex.lab") or m.split(".")[0] == "matplotlib")
assert not loaded, loaded
"""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": python_path}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
