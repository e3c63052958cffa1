"""``RedisTier``: the tier every replica shares, through the ``redis`` client (Redis or Valkey).

The store is an accelerator, never a dependency. Every call is bounded by the socket timeouts and
never raises:

    healthy ──connection error / timeout──▶ down: warn once, count, skip calls for `backoff`
       ▲                                      │ backoff over: the next call tries again
       └──────── a call succeeds: log "recovered" ◀──┤ fails again: backoff doubles (capped)

A server that answers with an error (``OOM command not allowed`` when full under ``noeviction``,
``READONLY`` on a replica) is reachable: the write is dropped and counted, reads go on, and one
warning is logged until a write succeeds again. Eviction under ``allkeys-lru`` is just a miss.

redis-py retries failed commands by itself (10 times by default in redis-py 8); here retries are
off, because a retry loop is exactly the hang a request must never wait for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sparsex.kvstore.metrics import StoreMetrics
from sparsex.kvstore.tiers import FaultLog

# reachable-server failures: the connection is fine, the command was refused
_REFUSED = (redis.ResponseError, redis.ReadOnlyError)
# Values are tens of MB: reading them 32 KiB at a time (redis-py's default) made a 94 MB GET take
# ~3.5 s with the pure-Python parser on a 2-core CPU; 1 MiB reads and hiredis (a runtime dependency
# that redis-py picks up by itself) bring it to ~0.5 s.
_SOCKET_READ_BYTES = 1 << 20


class RedisTier:
    """Entries as Redis strings (``SET key value [EX ttl]``), one connection pool per tier."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 0.3,
        timeout_s: float = 0.5,
        retry_backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        ttl_s: int | None = None,
        max_connections: int = 16,
        metrics: StoreMetrics | None = None,
        name: str = "redis",
    ) -> None:
        """
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket).
        connect_timeout_s / timeout_s: bounds on connecting and on each command's reply; a 4k-token
            entry is tens of MB, so ``timeout_s`` must cover reading one value on the network.
        retry_backoff_s, max_backoff_s: after a connection failure, calls are skipped (a miss) for
            the backoff, which doubles on each further failure up to the cap.
        ttl_s: expire entries this long after they are written (None: rely on Redis eviction).
        """
        self.name = name
        self.url = url
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.ttl_s = ttl_s
        self.metrics = metrics if metrics is not None else StoreMetrics()
        pool = redis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            socket_read_size=_SOCKET_READ_BYTES,
        )
        self._client = redis.Redis(connection_pool=pool)
        self._down = FaultLog(name, f"connection to {_redact(url)}")
        self._refused = FaultLog(name, f"writes to {_redact(url)}")
        self._lock = threading.Lock()
        self._retry_at = 0.0  # monotonic time before which calls are skipped
        self._backoff = retry_backoff_s

    @property
    def is_down(self) -> bool:
        """True while in backoff after a connection failure."""
        return self._down.failing

    def _skip(self, op: str) -> bool:
        if self._down.failing and time.monotonic() < self._retry_at:
            self.metrics.error(self.name, op)
            return True
        return False

    def _connection_failed(self, op: str, err: Exception) -> None:
        self.metrics.error(self.name, op)
        with self._lock:
            if self._down.failing:
                self._backoff = min(2 * self._backoff, self.max_backoff_s)
            else:
                self._backoff = self.retry_backoff_s
            self._retry_at = time.monotonic() + self._backoff
            self._down.failed(f"{type(err).__name__}: {err}")

    def _reached(self) -> None:
        if self._down.failing:
            with self._lock:
                self._down.succeeded()

    def get(self, key: str) -> bytes | None:
        if self._skip("get"):
            return None
        try:
            value = self._client.get(key)
        except _REFUSED:  # reachable, but refused a read (e.g. WRONGTYPE): a miss
            self._reached()
            self.metrics.error(self.name, "get")
            return None
        except (redis.RedisError, OSError) as err:
            self._connection_failed("get", err)
            return None
        self._reached()
        return value if isinstance(value, bytes) else None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` (one round trip; the keys of one model and namespace share a Cluster slot).

        Same fault handling as ``get``: every fault is all misses."""
        if not keys:
            return []
        if self._skip("get"):
            return [None] * len(keys)
        try:
            values = self._client.mget(list(keys))
        except _REFUSED:
            self._reached()
            self.metrics.error(self.name, "get")
            return [None] * len(keys)
        except (redis.RedisError, OSError) as err:
            self._connection_failed("get", err)
            return [None] * len(keys)
        self._reached()
        return [v if isinstance(v, bytes) else None for v in values]

    def put(self, key: str, value: bytes) -> bool:
        if self._skip("put"):
            return False
        try:
            self._client.set(key, value, ex=self.ttl_s)
        except _REFUSED as err:  # full (OOM under noeviction), read-only replica, ...
            self._reached()
            self.metrics.error(self.name, "put")
            self._refused.failed(err)
            return False
        except (redis.RedisError, OSError) as err:
            self._connection_failed("put", err)
            return False
        self._reached()
        self._refused.succeeded()
        return True

    def delete(self, key: str) -> None:
        if self._skip("delete"):
            return
        try:
            self._client.delete(key)
        except _REFUSED:
            self.metrics.error(self.name, "delete")
        except (redis.RedisError, OSError) as err:
            self._connection_failed("delete", err)
        else:
            self._reached()

    def contains(self, key: str) -> bool:
        if self._skip("contains"):
            return False
        try:
            found = bool(self._client.exists(key))
        except _REFUSED:
            self.metrics.error(self.name, "contains")
            return False
        except (redis.RedisError, OSError) as err:
            self._connection_failed("contains", err)
            return False
        self._reached()
        return found

    def close(self) -> None:
        try:
            self._client.close()
        except (redis.RedisError, OSError):
            pass


def _redact(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
