"""Decoding ahead: batches in input order, a bounded number decoding ahead, on any pool."""

from __future__ import annotations

import os
import threading

import pytest

from cliplens.decode_ahead import INLINE, decode_ahead, decode_batch, process_pool, thread_pool


def _square(x: int) -> int:
    return x * x


def _pid(_: int) -> int:
    return os.getpid()


def _setup(value: int) -> None:
    os.environ["CLIPLENS_TEST_WORKER"] = str(value)


def _worker_value(_: int) -> str:
    return os.environ.get("CLIPLENS_TEST_WORKER", "")


@pytest.mark.parametrize("batch_size", [1, 3, 10, 25])
def test_batches_come_in_input_order(batch_size: int) -> None:
    items = list(range(23))
    with thread_pool(4) as pool:
        batches = list(decode_ahead(items, _square, batch_size, pool))
    assert [start for start, _ in batches] == list(range(0, 23, batch_size))
    assert [v for _, batch in batches for v in batch] == [x * x for x in items]
    assert all(len(b) <= batch_size for _, b in batches)


def test_no_items_no_batches() -> None:
    assert list(decode_ahead([], _square, 4, INLINE)) == []


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_only_the_next_batches_are_submitted(ahead: int) -> None:
    """While the caller holds batch i, nothing past batch i + ahead has been decoded."""
    decoded: list[int] = []
    lock = threading.Lock()

    def record(x: int) -> int:
        with lock:
            decoded.append(x)
        return x

    bs = 2
    with thread_pool(2) as pool:
        for start, _ in decode_ahead(list(range(20)), record, bs, pool, ahead=ahead):
            with lock:
                assert max(decoded) < start + bs * (ahead + 1)


def test_process_pool_sets_up_each_worker_and_keeps_order() -> None:
    with process_pool(2, _setup, (7,)) as pool:
        values = decode_batch(list(range(6)), _worker_value, pool)
        pids = decode_batch(list(range(6)), _pid, pool)
    assert values == ["7"] * 6
    assert os.getpid() not in pids
    assert os.environ.get("CLIPLENS_TEST_WORKER") is None  # set up in the workers only


def test_inline_pool_decodes_here() -> None:
    assert decode_batch([1, 2, 3], _square) == [1, 4, 9]
    assert decode_batch([0], _pid) == [os.getpid()]
