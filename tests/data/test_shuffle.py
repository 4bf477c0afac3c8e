"""The per-worker shuffle buffer (pipeline/data/shuffle.py): what it gives for every arrival pattern."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.shuffle import RampedShuffle


def _arrivals(sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Batches of the given sizes whose rows are numbered in arrival order (a clip column of shape 2x2)."""
    out, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n)
        out.append({"id": ids, "clip": np.repeat(ids, 4).reshape(n, 2, 2),
                    "path": np.array([f"v{i}" for i in ids])})
        start += n
    return out


class _Counted:
    """An upstream that counts how many batches were pulled."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches, self.pulled = iter(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.pulled += 1
        return batch


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), max_size=12), batch_size=st.integers(1, 6),
       capacity=st.integers(0, 40), initial=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_every_row_is_given_once_in_whole_batches_and_the_rest_is_under_one_batch(sizes, batch_size, capacity,
                                                                                   initial, seed):
    out = list(RampedShuffle(_arrivals(sizes), batch_size, capacity, initial, seed))
    given_ids = np.concatenate([b["id"] for b in out]) if out else np.zeros(0, int)
    assert all(len(b["id"]) == batch_size for b in out)
    assert len(set(given_ids.tolist())) == len(given_ids)  # never twice
    assert sum(sizes) - len(given_ids) < batch_size  # only the last part-batch is dropped
    for b in out:  # the columns of a row stay together
        assert (b["clip"][:, 0, 0] == b["id"]).all()
        assert b["path"].tolist() == [f"v{i}" for i in b["id"]]
    again = list(RampedShuffle(_arrivals(sizes), batch_size, capacity, initial, seed))
    assert all((a["id"] == b["id"]).all() for a, b in zip(out, again, strict=True))  # seeded


@settings(max_examples=100, deadline=None)
@given(batch_size=st.integers(1, 8), capacity_batches=st.integers(1, 16), initial_batches=st.integers(1, 16),
       seed=st.integers(0, 2**31))
def test_the_first_batch_needs_only_the_initial_rows_and_the_buffer_fills_to_capacity(batch_size,
                                                                                    capacity_batches,
                                                                                    initial_batches, seed):
    capacity, initial = capacity_batches * batch_size, initial_batches * batch_size
    draws = 1 + capacity_batches + initial_batches
    upstream = _Counted(_arrivals([1] * (capacity + (draws + 1) * batch_size)))  # one row per pull
    buffer = RampedShuffle(upstream, batch_size, capacity, initial, seed)
    next(buffer)
    assert upstream.pulled == min(initial, capacity)  # not the whole capacity, as Ray Data's buffer needs
    for _ in range(capacity_batches + initial_batches):
        next(buffer)
    assert len(buffer.rows) + batch_size >= capacity  # the ramp reached full depth, two rows in per row out
    assert len(buffer.rows) <= capacity


def test_a_full_buffer_mixes_rows_from_far_apart_arrivals():
    sizes = [8] * 64  # a video's 8 clips arrive together, 64 videos
    out = list(RampedShuffle(_arrivals(sizes), 8, capacity=256, initial=16, seed=0))
    later = out[len(out) // 4 : len(out) // 2]  # past the ramp
    videos_per_batch = [len(set((b["id"] // 8).tolist())) for b in later]
    assert np.mean(videos_per_batch) > 5  # unmixed, each batch would be one video


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=40), batch_size=st.integers(1, 6),
       capacity=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_the_buffer_holds_few_more_batches_than_its_rows_fill(sizes, batch_size, capacity, seed):
    """Random draws leave arriving batches held by a row or two; the buffer copies its rows together before
    that costs more than twice the memory its rows need."""
    buffer = RampedShuffle(_arrivals(sizes), batch_size, capacity, 2 * batch_size, seed)
    for _ in buffer:
        held = Counter(id(batch) for batch, _ in buffer.rows)
        assert held == buffer.waiting  # every held batch counted, with its rows still waiting
        assert len(held) <= 2 * (len(buffer.rows) // batch_size + 1)


def test_rows_read_ahead_start_the_buffer_at_their_depth_without_waiting_for_more():
    upstream = _Counted(_arrivals([4] * 20))
    buffer = RampedShuffle(upstream, 4, capacity=40, initial=8, seed=0)
    buffer.start_deeper(24)  # six batches were read while the last epoch drained
    next(buffer)
    assert upstream.pulled == 6 and len(buffer.rows) == 20  # all of them mixed from the first draw
    buffer.start_deeper(400)  # never deeper than the buffer
    assert buffer.initial == 40
