"""``ZmqEventPublisher``: the sockets of vLLM's KV event protocol (used by one thread only).

    PUB    endpoint          [topic, seq (8 bytes big-endian), msgpack EventBatch]   seq 0, 1, 2, ...
    ROUTER replay_endpoint   request  [<identity>, b"", start seq (8 bytes)]
                             replies  [<identity>, b"", seq, payload] per kept batch >= start seq,
                                      then [<identity>, b"", -1 (8 bytes, signed), b""]  (the end)

A REQ client (vLLM's example) sends the start sequence number alone and reads the replies; a
DEALER sends ``[b"", start]``. Only the last ``buffer_steps`` batches are kept for replay.
A sequence number that never arrives, not even by replay, marks changes that were dropped.
"""

from __future__ import annotations

from collections import deque

import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The replay's end marker."""


class ZmqEventPublisher:
    """Binds a PUB socket (and a ROUTER for replay); sends payloads with sequence numbers.

    Not thread-safe: the thread that sends must be the only one using it (zmq sockets are not
    thread-safe). Binding happens in the constructor, so a bad or busy endpoint fails there. It has
    its own zmq context, terminated by :meth:`close`, so the endpoints are free when close returns.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "",
                 buffer_steps: int = 10_000, hwm: int = 100_000) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._topic = topic.encode("utf-8")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.next_seq = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._pub.set_hwm(hwm)
            _bind(self._pub, endpoint)
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                _bind(self._replay, replay_endpoint)
        except BaseException:
            self.close()
            raise

    def send(self, payload: bytes) -> int:
        """Publish one payload under the next sequence number (kept for replay); returns that number."""
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, payload))
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        return seq

    def skip(self) -> None:
        """Leave a sequence number out: subscribers see a gap that replay cannot fill (lost changes)."""
        self.next_seq += 1

    def serve_replay(self, timeout_ms: int = 0) -> int:
        """Answer the replay requests waiting (up to ``timeout_ms`` for the first); returns how many."""
        if self._replay is None:
            return 0
        served = 0
        while self._replay.poll(timeout_ms if served == 0 else 0):
            frames = self._replay.recv_multipart()
            served += 1
            if len(frames) != 3 or len(frames[2]) != 8:
                continue  # not a replay request: ignore it
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", END_SEQ, b""))
        return served

    def close(self, linger_ms: int = 500) -> None:
        """Close the sockets, giving queued messages ``linger_ms`` to leave; returns once the
        endpoints are released."""
        self._pub.close(linger=linger_ms)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()


def _bind(sock: zmq.Socket[bytes], endpoint: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise ValueError(f"cannot bind the KV events socket to {endpoint!r}: {e}") from e
