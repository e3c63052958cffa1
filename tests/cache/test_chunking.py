"""Content-defined chunking: coverage, length bounds, offset invariance, determinism."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex.cache import ChunkingConfig, chunk_tokens

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ChunkingConfig(min_len=4, max_len=32, avg_len=12, window=4)


def random_tokens(seed: int, n: int, vocab: int = 50_000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def passage_cuts(spans: list[tuple[int, int]], start: int, length: int) -> list[int]:
    """Chunk ends strictly inside a passage embedded at ``start``, in passage coordinates (the
    passage's own end is left out: it is also the input's end in some embeddings)."""
    return [end - start for _, end in spans if start < end < start + length]


def cuts_after_sync(cut_lists: list[list[int]], window: int) -> tuple[int, list[list[int]]]:
    """First cut common to all embeddings whose hash window lies inside the passage, and the cuts
    after it. From such a cut on, every chunker is in the same state, so the rest must agree."""
    common = sorted(set.intersection(*(set(c) for c in cut_lists)))
    sync = next((c for c in common if c >= window), None)
    if sync is None:
        return -1, []
    return sync, [[c for c in cuts if c > sync] for cuts in cut_lists]


def assert_tiles(spans: list[tuple[int, int]], n: int, config: ChunkingConfig) -> None:
    starts = [start for start, _ in spans]
    ends = [end for _, end in spans]
    assert starts == [0, *ends[:-1]][: len(starts)]
    assert (ends[-1] if spans else 0) == n
    for i, (start, end) in enumerate(spans):
        assert end - start <= config.max_len
        assert end - start >= (1 if i == len(spans) - 1 else config.min_len)


def test_empty_and_short_inputs() -> None:
    assert chunk_tokens([]) == []
    assert chunk_tokens([7, 8, 9]) == [(0, 3)]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(0, 40), max_size=400), st.integers(1, 8), st.integers(0, 40), st.integers(1, 6))
def test_chunks_tile_the_input_within_length_bounds(
    token_ids: list[int], min_len: int, extra: int, window: int
) -> None:
    config = ChunkingConfig(
        min_len=min_len, max_len=min_len + extra, avg_len=min_len + extra // 2, window=window
    )
    spans = config.chunk(token_ids)
    assert_tiles(spans, len(token_ids), config)
    assert spans == chunk_tokens(token_ids, config.min_len, config.max_len, config.avg_len, config.window)


def test_default_chunks_average_about_avg_len() -> None:
    config = ChunkingConfig()
    spans = config.chunk(random_tokens(seed=1, n=50_000))
    assert_tiles(spans, 50_000, config)
    mean = 50_000 / len(spans)
    assert 0.8 * config.avg_len <= mean <= 1.25 * config.avg_len


def test_same_passage_after_different_prefixes_yields_the_same_interior_chunks() -> None:
    passage = random_tokens(seed=2, n=4000)
    config = ChunkingConfig()
    cut_lists = []
    for prefix_len in (0, 37, 300, 1001):
        prefix = random_tokens(seed=100 + prefix_len, n=prefix_len)
        suffix = random_tokens(seed=200 + prefix_len, n=prefix_len % 97)
        spans = chunk_tokens(prefix + passage + suffix)
        cut_lists.append(passage_cuts(spans, prefix_len, len(passage)))
    sync, after = cuts_after_sync(cut_lists, config.window)
    assert 0 < sync < 1000  # the chunkers lock onto the content quickly
    assert len(after[0]) >= 8 and all(cuts == after[0] for cuts in after)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.integers(0, 1000), min_size=1, max_size=300),
    st.lists(st.integers(0, 1000), max_size=60),
    st.lists(st.integers(0, 1000), max_size=60),
)
def test_cuts_agree_after_any_common_cut(
    passage: list[int], prefix_a: list[int], prefix_b: list[int]
) -> None:
    cut_lists = [
        passage_cuts(SMALL.chunk(prefix + passage + [1, 2, 3]), len(prefix), len(passage))
        for prefix in (prefix_a, prefix_b)
    ]
    _, after = cuts_after_sync(cut_lists, SMALL.window)
    assert after[0] == after[1] if after else True


def test_chunks_are_identical_across_processes() -> None:
    code = (
        "import random\n"
        "from sparsex.cache import chunk_tokens\n"
        "rng = random.Random(3)\n"
        "print(chunk_tokens([rng.randrange(50_000) for _ in range(5000)]))"
    )
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": python_path}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert outputs == {f"{chunk_tokens(random_tokens(seed=3, n=5000))}\n"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_len": 0}, "min_len"),
        ({"min_len": 300, "avg_len": 256}, "min_len <= avg_len <= max_len"),
        ({"avg_len": 600}, "min_len <= avg_len <= max_len"),
        ({"window": 0}, "window"),
    ],
)
def test_config_validates(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkingConfig(**kwargs)
