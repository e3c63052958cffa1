"""API keys -> tenants, and the cache namespace a tenant's request gets.

The tenant comes from the key, server-side, and prefixes every namespace:

    namespace = "<tenant>/<client namespace>"     e.g. "alice/" (no cache_salt), "alice/kb"

Tenant names match ``[A-Za-z0-9_.-]+``, so they cannot contain the separator ``/``: the text before
the first ``/`` is always the tenant, and no client string (``cache_salt``, ``sparsex.namespace``,
a segment namespace) can produce another tenant's namespace; it can only subdivide its own.

Without keys every client shares one tenant and namespaces are the clients' strings, as given.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from sparsex.core.request import DEFAULT_TENANT as DEFAULT_ENGINE_TENANT
from sparsex.server.protocol import APIError

TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SEPARATOR = "/"
DEFAULT_TENANT = "default"


def _digest(key: str) -> bytes:
    # Keys are looked up by digest: the time a lookup takes does not depend on how much of a key matched.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Tenants:
    """The server's API keys and the tenant of each; empty = no authentication (one shared tenant)."""

    by_digest: dict[bytes, str] = field(default_factory=dict)

    @classmethod
    def from_keys(cls, keys: dict[str, str]) -> Tenants:
        """``{key: tenant}``; raises ValueError for an empty key or an invalid tenant name."""
        by_digest = {}
        for key, tenant in keys.items():
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and contain no whitespace")
            if not TENANT_NAME.fullmatch(tenant):
                raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
            by_digest[_digest(key)] = tenant
        return cls(by_digest)

    @classmethod
    def load(cls, api_key: str | None = None, keys_file: str | Path | None = None) -> Tenants:
        """``--api-key KEY`` (tenant ``default``) and ``--api-keys FILE`` (lines ``KEY TENANT``)."""
        keys: dict[str, str] = {}
        if api_key is not None:
            keys[api_key] = DEFAULT_TENANT
        if keys_file is not None:
            keys.update(parse_keys_file(Path(keys_file).read_text()))
        return cls.from_keys(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer KEY`` header; None when keys are off.

        Raises a 401 ``APIError`` when keys are on and the header is missing or the key unknown.
        """
        if not self.enabled:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        tenant = self.by_digest.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="invalid_request_error", code="invalid_api_key")
        return tenant


def parse_keys_file(text: str) -> dict[str, str]:
    """Lines ``KEY TENANT``; blank lines and ``#`` comments are skipped. Raises ValueError on a bad line."""
    keys: dict[str, str] = {}
    for num, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"API keys file, line {num}: expected 'KEY TENANT'")
        key, tenant = fields
        if key in keys:
            raise ValueError(f"API keys file, line {num}: a key appears twice")
        keys[key] = tenant
    return keys


def engine_tenant(tenant: str | None) -> str:
    """The tenant the engine schedules a request for (its fair share): the key's tenant, or the
    engine's default one when keys are off."""
    return DEFAULT_ENGINE_TENANT if tenant is None else tenant


def namespace_for(tenant: str | None, client_namespace: str) -> str:
    """The engine namespace of a request: the client's own, inside its tenant (see the module doc)."""
    return client_namespace if tenant is None else f"{tenant}{SEPARATOR}{client_namespace}"


def owns(tenant: str | None, namespace: str) -> bool:
    """Whether an engine namespace belongs to ``tenant`` (every namespace does without keys)."""
    return tenant is None or namespace.startswith(f"{tenant}{SEPARATOR}")


def tenant_of(namespace: str) -> str | None:
    """The tenant an engine namespace belongs to (the text before the first ``/``, when it is a
    tenant name), or None for a namespace no tenant's request can produce."""
    tenant, sep, _ = namespace.partition(SEPARATOR)
    return tenant if sep and TENANT_NAME.fullmatch(tenant) else None


def client_namespace(tenant: str | None, namespace: str) -> str:
    """The namespace as the tenant's client named it (the tenant prefix removed)."""
    return namespace if tenant is None else namespace[len(tenant) + len(SEPARATOR) :]
