"""``ServerConfig``: every option of the HTTP server (the engine's options are the engine's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsex.server.auth import Tenants


@dataclass(frozen=True)
class ServerConfig:
    """How the server admits, limits and reports requests.

    max_queue: most engine requests in flight (waiting + running); past it requests get 429.
    max_queue_per_tenant: most of them one tenant may hold (429 past it); None = only ``max_queue``.
        With several tenants, a share below ``max_queue`` keeps one tenant's flood from filling the
        queue for everyone (``sparsex serve`` sets half of ``max_queue`` when API keys are on).
    served_model_name: the model id clients must send (None = the engine's ``model_name``).
    default_max_tokens: ``max_tokens`` for requests that give none (capped by the context left).
    default_reuse: reuse method for requests whose ``sparsex.reuse`` is absent (None = the engine's).
    tenants: API keys and their tenants; empty = no authentication, every client in one tenant.
    metrics: ``"open"`` (anyone may scrape ``/metrics``), ``"off"`` (404), or ``"key"`` (only with
        ``Authorization: Bearer <metrics_key>``; tenants' API keys do not open it).
    metrics_key: the key of ``metrics="key"``.
    hide_cache_usage: omit the cache fields (``cached_tokens``, prefix / segment hit tokens,
        recomputed tokens, compute fraction) from responses and the cache counters from
        ``/metrics``, for deployments where one tenant serves many mutually untrusted users.
    max_body_bytes: largest request body; a larger one gets 400 (and the connection is closed).
    max_json_depth: deepest nesting of arrays / objects in a body; deeper gets 400.
    shutdown_grace_s: on SIGTERM, seconds running requests get to finish before they are ended
        with an error (new requests get 503 meanwhile).
    """

    max_queue: int = 256
    max_queue_per_tenant: int | None = None
    served_model_name: str | None = None
    default_max_tokens: int = 256
    default_reuse: str | None = None
    tenants: Tenants = field(default_factory=Tenants)
    metrics: str = "open"
    metrics_key: str | None = None
    hide_cache_usage: bool = False
    max_body_bytes: int = 8 << 20
    max_json_depth: int = 32
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.metrics not in ("open", "off", "key"):
            raise ValueError(f"metrics must be 'open', 'off' or 'key', got {self.metrics!r}")
        if (self.metrics == "key") != bool(self.metrics_key):
            raise ValueError("metrics='key' needs a metrics_key (and only it does)")
        if self.max_queue < 1 or self.default_max_tokens < 1 or (self.max_queue_per_tenant or 1) < 1:
            raise ValueError("max_queue, max_queue_per_tenant and default_max_tokens must be >= 1")
        if self.max_body_bytes < 1024 or self.max_json_depth < 4 or self.shutdown_grace_s < 0:
            raise ValueError("max_body_bytes >= 1024, max_json_depth >= 4 and shutdown_grace_s >= 0")
