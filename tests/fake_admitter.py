"""A stand-in for ``KVCacheManager`` in scheduler tests: blocks are counted, never allocated."""

from __future__ import annotations

from sparsex.core.request import Request
from sparsex.kv.admission import Admission


class FakeAdmitter:
    """Admits a request when its prompt + ``max_tokens`` fit in ``free`` blocks beside what admitted
    requests reserved; prefix hits are never found. ``release`` gives blocks back."""

    block_size = 4

    def __init__(self, free: int) -> None:
        self.free = free

    def admit(self, req: Request, reserved_blocks: int) -> Admission | None:
        if req.blocks_needed(self.block_size) > self.free - reserved_blocks:
            return None
        n = -(-len(req.prompt_token_ids) // self.block_size)
        self.free -= n
        return Admission(0, tuple(range(n)), (), ())

    def allocate_prompt(self, req: Request) -> list[int]:
        n = -(-len(req.prompt_token_ids) // self.block_size)
        self.free -= n
        return list(range(n))

    def release(self, req: Request) -> None:
        self.free += len(req.block_table)
        req.block_table = []
