"""threaded.imap: order, and a caller that stops does not wait for every item."""
import threading
import time

import pytest

from iqa_jax.data import threaded


def test_results_in_order_with_a_bounded_window():
  started, lock = [], threading.Lock()

  def fn(x):
    with lock:
      started.append(x)
    time.sleep(0.001 * (x % 3))  # finish out of order
    return x * x

  it = threaded.imap(fn, range(100), threads=4, ahead=8)
  assert [next(it) for _ in range(3)] == [0, 1, 4]
  time.sleep(0.05)
  assert len(started) <= 3 + 8  # no more than `ahead` beyond what was taken
  assert list(it) == [x * x for x in range(3, 100)]


def test_an_error_or_a_stop_cancels_the_rest():
  ran = []

  def fn(x):
    ran.append(x)
    if x == 2:
      raise KeyboardInterrupt
    time.sleep(0.01)
    return x

  t0 = time.time()
  with pytest.raises(KeyboardInterrupt):
    list(threaded.imap(fn, range(10_000), threads=2, ahead=4))
  assert time.time() - t0 < 2 and len(ran) <= 2 + 4 + 2  # 10,000 x 10 ms had it waited
