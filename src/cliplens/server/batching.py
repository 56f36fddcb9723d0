"""Concurrent text searches, answered in batches.

While the model is busy with one batch, new queries queue; the next batch takes all of them
(up to `max_batch`): their texts are encoded in one call and the vectors are searched once
for all of them (one matrix product, or one faiss call). Each query still gets its own
result or its own error. Queries alone in the queue are answered as they come, with no added wait.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np


@dataclass
class Query:
    texts: list[str]
    text_weights: list[float]
    ids: list[int]
    id_weights: list[float]
    n: int


class SearchBatcher:
    def __init__(self, service: Any, max_batch: int = 32) -> None:
        self.service, self.max_batch = service, max_batch
        self._queue: list[tuple[Query, asyncio.Future]] = []
        self._task: asyncio.Task | None = None  # held: the loop keeps only weak references

    async def search(self, query: Query) -> list[Any]:
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

    def _answer(self, queries: list[Query]) -> list[Any]:
        """In the worker thread, holding the model: hits or an error per query."""
        from cliplens.tasks.search import weighted_sum

        svc = self.service
        photos = svc.photos
        texts = list(dict.fromkeys(t for q in queries for t in q.texts))
        encoded = dict(zip(texts, svc.ref.encode_texts(texts), strict=True)) if texts else {}
        vectors: list[np.ndarray] = []
        answers: list[Any] = []
        for q in queries:
            try:
                parts = [encoded[t] for t in q.texts] + [photos.embedding(i) for i in q.ids]
                vectors.append(weighted_sum(parts, q.text_weights + q.id_weights))
                answers.append(None)
            except Exception as e:  # bad terms, unknown id: that request's own error
                answers.append(e)
        ok = [i for i, a in enumerate(answers) if a is None]
        if ok:
            n = max(queries[i].n for i in ok)
            found = photos.search_many(np.stack(vectors), n)
            for i, hits in zip(ok, found, strict=True):
                answers[i] = hits[: queries[i].n]
        return answers
