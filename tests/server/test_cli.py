"""``sparsex serve`` arguments and entry point (uvicorn.run replaced, so nothing listens)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from sparsex.server import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    args = parse()
    assert (args.host, args.port, args.max_queue, args.reuse, args.device) == ("127.0.0.1", 8000, 256, None, "cpu")
    assert args.model is None and args.kv_cache_memory is None


def test_memory_sizes() -> None:
    assert cli.parse_memory("0.2") == 0.2
    assert cli.parse_memory("512M") == 512 << 20
    assert cli.parse_memory("2GiB") == 2 << 30
    assert cli.parse_memory("1048576") == 1 << 20
    for bad in ("lots", "1.5", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_memory(bad)


def test_reuse_choices() -> None:
    assert parse("--reuse", "sparsex").reuse == "sparsex"
    with pytest.raises(SystemExit):
        parse("--reuse", "magic")


def test_serve_main_builds_the_app(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsex.server.lifecycle import DrainingServer

    seen: dict[str, Any] = {}
    monkeypatch.setattr(DrainingServer, "run", lambda self: seen.update(server=self))
    cli.serve_main(parse("--model", str(model_dir), "--port", "9123", "--kv-cache-memory", "32M",
                         "--max-queue", "7", "--reuse", "prefix", "--shutdown-grace", "2.5"))
    server = seen["server"]
    assert server.config.host == "127.0.0.1" and server.config.port == 9123
    app = server.config.app
    assert app.state.engine.max_queue == 7 and app.state.lifecycle.grace_s == 2.5
    assert app.state.config.metrics == "open" and not app.state.config.tenants.enabled
    assert app.state.llm.engine.pool.num_blocks * app.state.llm.engine.pool.block_size > 0


def test_security_options(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# key tenant\nk-alice alice\n\nk-bob bob  # the second tenant\n")
    cfg = cli.server_config(parse("--api-keys", str(keys), "--api-key", "solo", "--hide-cache-usage"))
    assert cfg.tenants.authenticate("Bearer k-bob") == "bob"
    assert cfg.tenants.authenticate("Bearer solo") == "default"
    assert cfg.metrics == "off" and cfg.hide_cache_usage  # keys on: /metrics off unless opened
    assert cli.server_config(parse("--metrics-key", "m")).metrics == "key"
    assert cli.server_config(parse("--api-key", "k", "--metrics", "open")).metrics == "open"
    for bad in ("k-x bad/tenant\n", "only-a-key\n", "k t\nk u\n"):
        keys.write_text(bad)
        with pytest.raises(ValueError):
            cli.server_config(parse("--api-keys", str(keys)))


def test_max_prefill_tokens_flag() -> None:
    """``--max-prefill-tokens`` sets the chunk size; 0 turns chunking off; negatives are refused."""
    assert cli.prefill_kwargs(parse()) == {}
    assert cli.prefill_kwargs(parse("--max-prefill-tokens", "128")) == {"max_prefill_tokens": 128}
    assert cli.prefill_kwargs(parse("--max-prefill-tokens", "0")) == {"max_prefill_tokens": None}
    with pytest.raises(ValueError, match="max-prefill-tokens"):
        cli.prefill_kwargs(parse("--max-prefill-tokens", "-1"))


def test_kv_events_flags() -> None:
    from sparsex.kvevents import KVEventsConfig

    assert cli.events_kwargs(parse()) == {}
    got = cli.events_kwargs(parse("--kv-events", "tcp://127.0.0.1:5557", "--kv-events-replay", "tcp://127.0.0.1:5558",
                                  "--kv-events-topic", "kv-events", "--kv-events-token-ids",
                                  "--kv-events-hash-seed", "7"))
    assert got == {"kv_events": KVEventsConfig("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "kv-events",
                                               token_ids=True, hash_seed="7")}
    assert cli.events_kwargs(parse("--kv-events", "tcp://*:5557")) == {"kv_events": KVEventsConfig("tcp://*:5557")}
    with pytest.raises(ValueError, match="need --kv-events"):
        cli.events_kwargs(parse("--kv-events-token-ids"))


def test_serve_main_publishes_kv_events_and_closes_them(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsex.server.lifecycle import DrainingServer
    from tests.kvevents.subscriber import free_port

    seen: dict[str, Any] = {}
    monkeypatch.setattr(DrainingServer, "run", lambda self: seen.update(server=self))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cli.serve_main(parse("--model", str(model_dir), "--kv-cache-memory", "32M", "--kv-events", endpoint,
                         "--revision", "main"))
    llm = seen["server"].config.app.state.llm
    assert llm.config.kv_events.endpoint == endpoint and llm.config.revision == "main"
    assert llm.kv_events.closed  # serve_main closed the engine on its way out


def test_a_tenant_gets_half_the_queue_by_default_with_keys() -> None:
    assert cli.server_config(parse("--api-key", "k", "--max-queue", "10")).max_queue_per_tenant == 5
    assert cli.server_config(parse("--max-queue", "10")).max_queue_per_tenant is None  # one tenant: no share
    assert cli.server_config(parse("--api-key", "k", "--max-queue-per-tenant", "9")).max_queue_per_tenant == 9
