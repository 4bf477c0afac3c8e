"""The per-process cache: built once per key, the least recently used dropped and closed past its size."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cache import ProcessCache


class Closable:
    def __init__(self, key: int) -> None:
        self.key, self.closed = key, False

    def close(self) -> None:
        self.closed = True


@given(st.integers(1, 4), st.lists(st.integers(0, 6), max_size=40))
def test_the_cache_keeps_at_most_size_objects_and_closes_exactly_the_dropped_ones(size, keys):
    cache: ProcessCache[Closable] = ProcessCache(size)
    made: list[Closable] = []

    def make(key: int) -> Closable:
        made.append(Closable(key))
        return made[-1]

    recent: list[int] = []  # the keys a least-recently-used cache of this size holds, oldest first
    for key in keys:
        got = cache.get(key, lambda key=key: make(key))
        assert got.key == key and not got.closed
        if key in recent:
            recent.remove(key)
        recent = (recent + [key])[-size:]
        assert len(cache) == len(recent) <= size
    live = {id(obj) for key in recent for obj in made if obj.key == key and not obj.closed}
    assert len(live) == len(recent)  # one live object per kept key, every other one closed
    assert sum(not obj.closed for obj in made) == len(recent)


def test_a_size_below_one_is_refused():
    with pytest.raises(ValueError, match="size must be >= 1"):
        ProcessCache(0)
