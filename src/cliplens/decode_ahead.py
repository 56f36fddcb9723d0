"""Decoding ahead: batches of decoded items, in input order, while the next ones decode.

The readers that feed a network work this way: an encoder decodes its next batch in
threads while the network embeds this one (Pillow drops the GIL), the catalog indexer
decodes in worker processes while it encodes and commits, and embed-dataset's Ray tasks
decode their batch with the same per-item function. `decode_ahead` is that loop, once,
over a pool that runs one `decode(item)` at a time per worker:

    with thread_pool(8) as pool:
        for start, batch in decode_ahead(paths, decode, 32, pool):
            ...  # batch[k] is decode(paths[start + k])

Failures are the decode function's business: it returns them as values (an ImageError,
a record with an error) so that a caller decides whether they are fatal.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class Pending(Protocol[R_co]):
    """A decode submitted to a pool; `result()` waits for it."""

    def result(self) -> R_co: ...


class Pool(Protocol):
    """Runs `decode(item)` somewhere (a thread, a process, here) and hands back its result."""

    def submit(self, decode: Callable[[T], R], item: T) -> Pending[R]: ...


class _Done(Generic[R]):
    def __init__(self, value: R) -> None:
        self.value = value

    def result(self) -> R:
        return self.value


class InlinePool:
    """Decodes in the calling thread, at once: for one core, tests and Ray's own tasks."""

    def submit(self, decode: Callable[[T], R], item: T) -> Pending[R]:
        return _Done(decode(item))


INLINE = InlinePool()


class _AsyncResult(Generic[R]):
    def __init__(self, result: Any) -> None:
        self._result = result

    def result(self) -> R:
        return self._result.get()


class _ProcessPool:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def submit(self, decode: Callable[[T], R], item: T) -> Pending[R]:
        return _AsyncResult(self._pool.apply_async(decode, (item,)))


@contextmanager
def thread_pool(workers: int) -> Iterator[Pool]:
    """`workers` threads; for decoders that release the GIL (Pillow does)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        yield executor


@contextmanager
def process_pool(
    workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...] = ()
) -> Iterator[Pool]:
    """`workers` processes (forked on Linux), each set up by `initializer(*initargs)` and
    killed by the kernel when this process dies. `decode` must be a module-level function.

    Once this process runs a thread pool that a forked child must not inherit (an
    OpenVINO network: `mark_fork_unsafe`), workers come from a fork server instead: a child
    forked from a process that had compiled a tower spun at full CPU, growing to 9.7 GB, and
    never decoded. The fork server is a fresh interpreter, so its children inherit no
    threads."""
    method = "fork" if sys.platform == "linux" else "spawn"
    if method == "fork" and _fork_unsafe:
        method = "forkserver"
    context = mp.get_context(method)
    setup = (initializer, *initargs)
    with context.Pool(workers, initializer=_start_worker, initargs=setup) as pool:
        yield _ProcessPool(pool)


_fork_unsafe = False


def mark_fork_unsafe() -> None:
    """Say that this process now runs threads a forked child must not inherit."""
    global _fork_unsafe
    _fork_unsafe = True


def _start_worker(initializer: Callable[..., None], *initargs: Any) -> None:
    die_with_parent()
    initializer(*initargs)


def die_with_parent() -> None:
    """On Linux, ask the kernel to kill this worker when its parent dies: a SIGKILLed
    parent cannot stop its pool, and the workers would linger on their task queue."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl here: the pool's own shutdown must do
        pass


def decode_batch(items: Sequence[T], decode: Callable[[T], R], pool: Pool = INLINE) -> list[R]:
    """`decode` of every item, in order (on `pool`, at once when it has several workers)."""
    return [pending.result() for pending in [pool.submit(decode, item) for item in items]]


def decode_ahead(
    items: Sequence[T],
    decode: Callable[[T], R],
    batch_size: int,
    pool: Pool,
    ahead: int = 1,
) -> Iterator[tuple[int, list[R]]]:
    """(start, [decode(items[start]), ...]) for each batch of `batch_size` items, in order,
    with the next `ahead` batches decoding on `pool` while the caller works on this one.

    Nothing is submitted beyond those: a consumer that stops (or is killed) loses at most
    the batches in flight.
    """
    starts = deque(range(0, len(items), batch_size))
    in_flight: deque[tuple[int, list[Pending[R]]]] = deque()
    while True:
        while starts and len(in_flight) <= ahead:
            start = starts.popleft()
            chunk = items[start : start + batch_size]
            in_flight.append((start, [pool.submit(decode, item) for item in chunk]))
        if not in_flight:
            return
        start, pending = in_flight.popleft()
        yield start, [p.result() for p in pending]
