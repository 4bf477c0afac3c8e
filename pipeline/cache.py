"""Objects a worker process builds once and reuses across the Ray tasks it runs (Ray reuses worker
processes): a decode helper, a ClipMaker, an epoch plan, a preprocessing child process."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ProcessCache(Generic[V]):
    """At most ``size`` objects by key (what the object depends on); the least recently used is dropped
    first, and closed when it has ``close()`` (a child process must not outlive its last use)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.size:
            _, old = self._items.popitem(last=False)
            close = getattr(old, "close", None)
            if callable(close):
                close()
        value = self._items[key] = make()
        return value

    def __len__(self) -> int:
        return len(self._items)
