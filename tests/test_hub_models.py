"""Models by Hugging Face Hub id: loaded from a Hub cache folder the test lays out (offline), and
every failure turned into one error that says what to do. No test needs the network: the failing
Hub is a local HTTP server answering the way the Hub does (status + ``X-Error-Code``)."""

from __future__ import annotations

import json
import shutil
import threading
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sparsex import LLM, SamplingParams
from sparsex.models.hub import HubModelError, parse_hub_id
from sparsex.models.loader import UnknownModelError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def go_online(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """HF_HUB_OFFLINE=0 and HF_ENDPOINT for this test (huggingface_hub reads HF_HUB_OFFLINE once, at
    import, for its HTTP layer: an earlier test may have imported it offline)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


def lay_out_hub_cache(cache: Path, repo_id: str, files: Path, revision: str = "main", commit: str = COMMIT) -> Path:
    """``files`` copied as the snapshot of ``repo_id`` at ``revision`` in huggingface_hub's layout:
    ``models--org--name/snapshots/<commit>/...`` and ``refs/<revision>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME, offline, with no token and no endpoint override."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_ids_are_parsed_and_paths_are_not() -> None:
    assert parse_hub_id("Qwen/Qwen3-0.6B") is not None
    ref = parse_hub_id("unsloth/gemma-3-270m-it-GGUF:gemma-3-270m-it-Q4_K_M.gguf")
    assert ref is not None and ref.repo_id == "unsloth/gemma-3-270m-it-GGUF"
    assert ref.gguf_file == "gemma-3-270m-it-Q4_K_M.gguf"
    for not_an_id in ("smollm2", "/models/x", "./org/name", "a/b/c", "org/../x", "~/x", "org/name:weights.bin"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_a_model_loads_by_hub_id_from_the_cache_offline(hub_home: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    snapshot = lay_out_hub_cache(hub_home / "hub", "acme/tiny-llama", tiny_model_dir("llama"))
    llm = LLM(model="acme/tiny-llama", kv_cache_memory=1 << 20)
    assert llm.engine.model_path == snapshot
    assert llm.model_name == "acme/tiny-llama"
    local = LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=1 << 20)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert llm.generate(["Hello"], params)[0].token_ids == local.generate(["Hello"], params)[0].token_ids


def test_a_revision_is_its_own_snapshot(hub_home: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    lay_out_hub_cache(hub_home / "hub", "acme/tiny", tiny_model_dir("llama"))
    other = "f" * 40
    v2 = lay_out_hub_cache(hub_home / "hub", "acme/tiny", tiny_model_dir("qwen2"), revision="v2", commit=other)
    assert resolve_model("acme/tiny", revision="v2") == v2
    with pytest.raises(HubModelError, match="v3.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("acme/tiny", revision="v3")


def test_a_gguf_file_of_a_repository_is_fetched_from_the_cache(hub_home: Path, tmp_path: Path) -> None:
    from sparsex.models.hub import fetch_model

    files = tmp_path / "gguf-repo"
    files.mkdir()
    (files / "tiny-Q4_K_M.gguf").write_bytes(b"GGUF")  # fetched, not converted, here
    snapshot = lay_out_hub_cache(hub_home / "hub", "acme/tiny-GGUF", files)
    assert fetch_model("acme/tiny-GGUF:tiny-Q4_K_M.gguf") == snapshot / "tiny-Q4_K_M.gguf"
    with pytest.raises(HubModelError, match="not in the Hugging Face cache"):
        fetch_model("acme/tiny-GGUF:other.gguf")


def test_only_the_transformers_weights_are_loaded(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    from sparsex.models.loader import weight_files

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "consolidated.safetensors").write_bytes(b"another format")  # e.g. a Mistral repository
    assert weight_files(folder) == [folder / "model.safetensors"]
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(folder) == [folder / "model-00001-of-00001.safetensors"]


def test_hf_hub_cache_overrides_hf_home(hub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         tiny_model_dir: Callable[[str], Path]) -> None:
    cache = tmp_path / "elsewhere"
    snapshot = lay_out_hub_cache(cache, "acme/tiny", tiny_model_dir("llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model("acme/tiny") == snapshot


def test_an_existing_local_path_wins_over_a_hub_id(hub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tiny_model_dir: Callable[[str], Path]) -> None:
    lay_out_hub_cache(hub_home / "hub", "acme/tiny", tiny_model_dir("qwen2"))
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir("llama"), work / "acme" / "tiny")
    monkeypatch.chdir(work)
    assert resolve_model("acme/tiny") == Path("acme/tiny")


def test_a_repository_missing_offline_says_what_to_do(hub_home: Path) -> None:
    with pytest.raises(HubModelError, match=r"'acme/nothing' \(main\) is not in the Hugging Face cache.*"
                                            r"unset HF_HUB_OFFLINE"):
        LLM(model="acme/nothing")
    with pytest.raises(HubModelError, match="not in the Hugging Face cache"):
        resolve_model("acme/nothing:model-Q4_K_M.gguf")


def test_an_unsupported_architecture_fails_before_the_weights_are_fetched(
    hub_home: Path, tmp_path: Path, tiny_model_dir: Callable[[str], Path]
) -> None:
    files = tmp_path / "bert"
    shutil.copytree(tiny_model_dir("llama"), files)
    config = json.loads((files / "config.json").read_text())
    (files / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    for f in files.glob("*.safetensors"):  # not needed to refuse it
        f.unlink()
    lay_out_hub_cache(hub_home / "hub", "acme/a-bert", files)
    with pytest.raises(HubModelError, match="'bert' model, an architecture SparseX does not support.*Llama, Mistral"):
        resolve_model("acme/a-bert")


def test_a_string_that_is_neither_path_alias_nor_id_is_unknown(hub_home: Path) -> None:
    with pytest.raises(UnknownModelError, match="Hub id"):
        resolve_model("not-a-model")


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every request for ``/<org>/<kind>/...`` the way the Hub answers that failure."""

    ANSWERS = {"gated": (401, "GatedRepo"), "missing": (401, "RepoNotFound"),
               "norev": (404, "RevisionNotFound"), "nofile": (404, "EntryNotFound")}

    def _answer(self) -> None:
        parts = self.path.split("/")
        status, code = self.ANSWERS.get(parts[2] if len(parts) > 2 else "", (404, "RepoNotFound"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_hub(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    go_online(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield "acme"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("repo", "revision", "message"), [
    ("acme/gated", None, "'acme/gated' is a gated repository: accept its license.*set HF_TOKEN"),
    ("acme/missing", None, "'acme/missing' was not found on the Hub: check the id.*HF_TOKEN"),
    ("acme/norev", "v9", "'acme/norev' has no revision 'v9'"),
    ("acme/nofile:model.gguf", None, "lacks a file SparseX needs.*org/name:<file>.gguf"),
])
def test_hub_failures_get_one_clear_error(failing_hub: str, repo: str, revision: str | None, message: str) -> None:
    with pytest.raises(HubModelError, match=message):
        resolve_model(repo, revision)


def test_no_network_and_no_cache_says_so(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils._http as hf_http

    go_online(monkeypatch, "http://127.0.0.1:9")  # the discard port: nothing listens
    # huggingface_hub retries a refused connection 5 times over ~23 s: keep its count, skip its waits
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    with pytest.raises(HubModelError, match="cannot reach the Hugging Face Hub.*not in the cache"):
        resolve_model("acme/unreachable")


def test_a_cached_model_still_loads_when_the_hub_is_unreachable(
    hub_home: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Callable[[str], Path]
) -> None:
    snapshot = lay_out_hub_cache(hub_home / "hub", "acme/tiny", tiny_model_dir("llama"))
    go_online(monkeypatch, "http://127.0.0.1:9")
    assert resolve_model("acme/tiny") == snapshot
