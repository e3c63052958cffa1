"""``sparsex.LLM`` has every member of ``ServedLLM`` with the same leading parameters (mypy checks the types
where ``sparsex serve`` passes an ``LLM`` to ``create_app``)."""

from __future__ import annotations

import inspect

from sparsex import LLM
from sparsex.server.engine_api import ServedLLM


def test_llm_provides_the_served_interface(llm: LLM) -> None:
    members = [n for n in dir(ServedLLM) if not n.startswith("_")] + list(ServedLLM.__annotations__)
    for name in members:
        assert hasattr(llm, name), name
        wanted = getattr(ServedLLM, name, None)
        if inspect.isfunction(wanted):
            have = inspect.signature(getattr(llm, name)).parameters
            want = list(inspect.signature(wanted).parameters)[1:]
            assert list(have)[: len(want)] == want, name  # the same leading parameters...
            extra = list(have.values())[len(want):]
            assert all(p.default is not inspect.Parameter.empty for p in extra), name  # ...and optional extras
