"""Cross-block sliding windows: which consecutive decoder blocks are reconstructed together, and when each block
is frozen.

Windows hold `size` consecutive blocks and advance by `size - overlap`; the last window is cut at the last block.
A block keeps training in every window that contains it and is frozen (hard-rounded, packed) after the last of
them, i.e. when the next window no longer contains it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Blocks [start, end) are optimised together; blocks [start, freeze_end) are frozen when it finishes."""

    index: int
    start: int
    end: int
    freeze_end: int

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    @property
    def frozen(self) -> range:
        return range(self.start, self.freeze_end)


def window_schedule(num_blocks: int, size: int, overlap: int) -> list[Window]:
    """The windows over `num_blocks` blocks, in order.

    Examples: (4 blocks, size 2, overlap 1) -> [0,2) [1,3) [2,4); (4, 2, 0) -> [0,2) [2,4); (5, 3, 1) -> [0,3)
    [2,5); (3, 1, 0) -> [0,1) [1,2) [2,3). Every block is frozen exactly once, in increasing order.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(
            f"window overlap must be in [0, size={size}), got {overlap} (windows advance by size - overlap blocks)"
        )
    stride = size - overlap
    starts = [0]
    while starts[-1] + size < num_blocks:
        starts.append(starts[-1] + stride)
    out = []
    for i, s in enumerate(starts):
        end = min(s + size, num_blocks)
        freeze_end = starts[i + 1] if i + 1 < len(starts) else num_blocks
        out.append(Window(i, s, end, freeze_end))
    return out
