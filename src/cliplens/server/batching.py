"""Concurrent text searches, answered in batches.

While the model is busy with one batch, new queries queue; the next batch takes all of them
(up to `max_batch`): their texts are encoded in one call and the vectors are searched once
for all of them (one matrix product, or one faiss call). Each query still gets its own
result or its own error. Queries alone in the queue are answered as they come, with no added wait.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import numpy as np

from cliplens.searchable import Hit
from cliplens.tasks.search import search_many, weighted_sum

if TYPE_CHECKING:
    from cliplens.server.service import Service


@dataclass
class SearchQuery:
    """One search: weighted texts and weighted photo ids, how many results, and whether
    each moment of a video is a result of its own."""

    texts: list[str]
    text_weights: list[float]
    ids: list[int]
    id_weights: list[float]
    n: int
    each_moment: bool = False


Answer = list[Hit] | Exception  # what one query of a batch gets


class SearchBatcher:
    """Queues concurrent searches and answers each waiting batch in one model call."""

    def __init__(self, service: Service, max_batch: int = 32) -> None:
        self.service, self.max_batch = service, max_batch
        self._queue: list[tuple[SearchQuery, asyncio.Future[list[Hit]]]] = []
        self._task: asyncio.Task | None = None  # held: the loop keeps only weak references

    async def search(self, query: SearchQuery) -> list[Hit]:
        """The hits for one query, batched with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((query, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        timeout = self.service.settings.timeout_s
        try:
            with anyio.fail_after(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            raise self.service.timed_out() from None

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            results: list[Answer]
            try:
                results = await self.service.run(self._answer, [q for q, _ in batch])
            except Exception as e:  # the batch as a whole failed (timeout, model)
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _answer(self, queries: list[SearchQuery]) -> list[Answer]:
        """In the worker thread, holding the model: hits or an error per query."""
        svc = self.service
        searched = svc.searched()
        texts = list(dict.fromkeys(t for q in queries for t in q.texts))
        encoded = dict(zip(texts, svc.ref.encode_texts(texts), strict=True)) if texts else {}
        vectors: list[np.ndarray] = []
        answers: list[Answer | None] = []
        for q in queries:
            try:
                model_id = svc.model_id()
                stored = [searched.vector(i, model_id) for i in q.ids]
                parts = [encoded[t] for t in q.texts] + stored
                vectors.append(weighted_sum(parts, q.text_weights + q.id_weights))
                answers.append(None)
            except Exception as e:  # bad terms, unknown id: that request's own error
                answers.append(e)
        ok = [i for i, a in enumerate(answers) if a is None]  # vectors[j] is ok[j]'s
        for each_moment in (False, True):  # one pass for each way of listing videos
            group = [j for j, i in enumerate(ok) if queries[i].each_moment == each_moment]
            if not group:
                continue
            n = max(queries[ok[j]].n for j in group)
            stacked = np.stack([vectors[j] for j in group])
            found = search_many(searched, svc.ref, stacked, n, each_moment=each_moment)
            for j, hits in zip(group, found, strict=True):
                answers[ok[j]] = hits[: queries[ok[j]].n]
        return [a for a in answers if a is not None]
