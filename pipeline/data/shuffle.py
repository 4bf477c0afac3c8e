"""The per-worker shuffle buffer between the stream and the trainer, one that starts yielding early.

Clips arrive grouped (a video's clips together, a shard's videos in runs), so each worker mixes them in a
buffer before batching. Ray Data's own local shuffle buffer yields nothing until it holds its whole size:
every pass (each epoch and the run's start) then waits for that many clips to be decoded before its first
step. This buffer starts once it holds ``initial`` rows and grows towards ``capacity`` by pulling two rows
for each row it gives out (WebDataset's ``shuffle(bufsize, initial)`` ramp), so a pass starts after a
couple of batches' decode and the mixing reaches its full depth within ``capacity / batch_size`` steps.

Rows are kept as references into the arriving batches (no copy until a batch is drawn). A batch stays in
memory while any of its rows waits, so random draws would leave many batches each held by a row or two:
once the buffer references more than twice the batches its rows fill, the waiting rows are copied into one
(each row is copied about once more on average), which bounds the memory near ``capacity`` rows. The draw
is seeded: the same arrivals give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def num_rows(batch: dict[str, np.ndarray]) -> int:
    """Rows of a batch of equally long columns (0 for an empty dict)."""
    return len(next(iter(batch.values()))) if batch else 0


class RampedShuffle:
    """Batches of exactly ``batch_size`` rows drawn at random from a buffer fed by ``batches`` (dicts of
    equally long numpy columns); the last rows that fill no batch are dropped (``drop_last``)."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], batch_size: int, capacity: int,
                 initial: int, seed: int | None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batches, self.batch_size = iter(batches), batch_size
        self.capacity = max(capacity, batch_size)
        self.initial = min(max(initial, batch_size), self.capacity)
        self.rng = np.random.default_rng(seed)
        self.rows: list[tuple[dict[str, np.ndarray], int]] = []
        self.waiting: dict[int, int] = {}  # id of an arriving batch -> its rows still in the buffer
        self.drawn = 0  # rows given out so far: the fill target grows with them
        self.ended = False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def start_deeper(self, rows: int) -> None:
        """``rows`` are at hand already (read ahead while the last epoch drained): no ramp below them."""
        self.initial = min(max(self.initial, rows), self.capacity)

    def target(self) -> int:
        """How many rows the buffer holds before the next draw."""
        return min(self.capacity, self.initial + self.drawn)

    def _pull(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.ended = True
            return
        n = num_rows(batch)
        if n:
            self.rows.extend((batch, i) for i in range(n))
            self.waiting[id(batch)] = n

    def _compact(self) -> None:
        """The waiting rows copied into one batch, releasing the batches they were held in."""
        merged = {key: np.stack([batch[key][i] for batch, i in self.rows]) for key in self.rows[0][0]}
        self.rows = [(merged, i) for i in range(len(self.rows))]
        self.waiting = {id(merged): len(self.rows)}

    def __next__(self) -> dict[str, np.ndarray]:
        while not self.ended and len(self.rows) < self.target():
            self._pull()
        if len(self.rows) < self.batch_size:
            raise StopIteration
        chosen = []
        for _ in range(self.batch_size):  # swap-remove: O(1) per row, the buffer's order does not matter
            i = int(self.rng.integers(len(self.rows)))
            self.rows[i], self.rows[-1] = self.rows[-1], self.rows[i]
            chosen.append(self.rows.pop())
            batch_id = id(chosen[-1][0])
            self.waiting[batch_id] -= 1
            if not self.waiting[batch_id]:
                del self.waiting[batch_id]
        self.drawn += self.batch_size
        if self.rows and len(self.waiting) > 2 * (len(self.rows) // self.batch_size + 1):
            self._compact()
        return {key: np.stack([batch[key][i] for batch, i in chosen]) for key in chosen[0][0]}
