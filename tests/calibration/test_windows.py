"""Window schedule: sizes, overlaps and when each block is frozen."""

from __future__ import annotations

import pytest

from cbq_hf.calibration.windows import window_schedule
from cbq_hf.config import CBQConfig

CASES = [
    # (blocks, size, overlap) -> [(start, end, freeze_end)]
    ((4, 2, 1), [(0, 2, 1), (1, 3, 2), (2, 4, 4)]),
    ((4, 2, 0), [(0, 2, 2), (2, 4, 4)]),
    ((5, 3, 1), [(0, 3, 2), (2, 5, 5)]),
    ((6, 3, 1), [(0, 3, 2), (2, 5, 4), (4, 6, 6)]),
    ((3, 1, 0), [(0, 1, 1), (1, 2, 2), (2, 3, 3)]),
    ((2, 4, 1), [(0, 2, 2)]),
    ((1, 2, 1), [(0, 1, 1)]),
    ((30, 2, 1), [(i, i + 2, i + 1) for i in range(28)] + [(28, 30, 30)]),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[f"n{a[0]}-size{a[1]}-overlap{a[2]}" for a, _ in CASES])
def test_schedule(args, expected):
    got = [(w.start, w.end, w.freeze_end) for w in window_schedule(*args)]
    assert got == expected


@pytest.mark.parametrize("n,size,overlap", [(7, 2, 1), (7, 3, 2), (9, 4, 1), (5, 5, 0), (8, 3, 0)])
def test_every_block_trained_then_frozen_once(n, size, overlap):
    wins = window_schedule(n, size, overlap)
    frozen = [b for w in wins for b in w.frozen]
    assert frozen == list(range(n))
    for w in wins:
        assert len(w.blocks) <= size
        for b in w.frozen:  # a block is frozen when the window leaves it: no later window contains it
            assert all(b not in later.blocks for later in wins[w.index + 1 :])
    for a, b in zip(wins, wins[1:]):
        assert b.start - a.start == size - overlap
        assert len(set(a.blocks) & set(b.blocks)) == min(overlap, len(b.blocks))


@pytest.mark.parametrize("n,size,overlap", [(4, 2, 2), (4, 2, 3), (4, 0, 0), (0, 2, 1)])
def test_bad_schedule(n, size, overlap):
    with pytest.raises(ValueError):
        window_schedule(n, size, overlap)


def test_config_rejects_overlap_not_smaller_than_size():
    with pytest.raises(ValueError, match="window_overlap"):
        CBQConfig(method="cbq", window_size=2, window_overlap=2)
