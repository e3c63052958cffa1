from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model

_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: arch name -> folder with a tiny random model + tokenizer (built once per session)."""

    def make(arch: str = "llama") -> Path:
        if arch not in _BUILT:
            _BUILT[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return _BUILT[arch]

    return make


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for engine tests (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--device"))
