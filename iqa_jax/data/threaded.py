"""A function over many files in threads, in order, that stops at once when its caller does."""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def imap(fn: Callable[[T], R], items: Iterable[T], threads: int,
         ahead: int | None = None) -> Iterator[R]:
  """fn(item) for each item, computed in `threads` threads (PIL decodes without the GIL) and
  yielded in order, with at most `ahead` (default 4 per thread) submitted beyond the one yielded.

  Unlike ThreadPoolExecutor.map, which submits every item at once and whose `with` waits for all
  of them, a caller that stops (an exception, Ctrl-C, a break) waits only for the few items
  running: the rest are cancelled.
  """
  items = iter(items)
  ahead = ahead or 4 * max(threads, 1)
  pool = concurrent.futures.ThreadPoolExecutor(max(threads, 1))
  try:
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
    while pending:
      result = pending.popleft().result()
      pending.extend(pool.submit(fn, item) for item in itertools.islice(items, 1))
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
