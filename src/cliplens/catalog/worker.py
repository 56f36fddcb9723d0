"""The work done per file when decoding for a catalog or shards: hash, open, orient,
downscale, crop.

Kept free of torch so that worker processes start fast and stay small. The indexer runs
`decode_file` in worker processes (set up once by `init_worker`, see
`cliplens.decode_ahead.process_pool`); embed-dataset's Ray tasks call
`CropDecoder.read` on local paths and object-store URIs alike.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cliplens.errors import ImageError, NotAnImageError
from cliplens.images import is_remote, open_image, open_image_bytes
from cliplens.preprocess import Preprocessing
from cliplens.video import is_video

if TYPE_CHECKING:
    from cliplens.catalog.db import FileKind
    from cliplens.video import VideoSampling

FileJob = tuple[str, int, int]  # path, size and mtime_ns as the scan found them


@dataclass
class Decoded:
    """One file after decoding: its hash and crop, or why it could not be read. A video's
    `crop` holds its moments' crops (F x H x W x 3) and `times_ms` their times."""

    path: str
    size: int
    mtime_ns: int
    hash: str | None = None
    crop: np.ndarray | None = None  # uint8 HWC; None when the hash already has an embedding
    error: str | None = None
    seconds: float = 0.0
    kind: FileKind = "image"
    times_ms: list[int] | None = None

    @property
    def n_crops(self) -> int:
        if self.crop is None:
            return 0
        return len(self.crop) if self.kind == "video" else 1


@dataclass(frozen=True)
class CropDecoder:
    """Hashes a file and, unless its content is already embedded (`known`), decodes it to
    the model's uint8 crop; a video (by its extension) to its moments' crops, sampled by
    `video` or at the times another model embedded (`sampled`, by content hash).
    Unreadable files come back with `error`, never raised."""

    prep: Preprocessing
    max_megapixels: float | None = None
    known: frozenset[str] = frozenset()
    video: VideoSampling | None = None
    sampled: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __call__(self, job: FileJob) -> Decoded:
        """A scanned local file, keeping the size and mtime the scan found."""
        path, size, mtime_ns = job
        return self._decode_local(path, size, mtime_ns)

    def read(self, path: str) -> Decoded:
        """A local path or an object-store URI (its bytes read through fsspec), sized by
        the bytes read; size 0 when it cannot be read."""
        if not is_remote(path):
            return self._decode_local(path, None, 0)
        import fsspec  # only for URIs: local files never need it

        start = time.perf_counter()
        out = Decoded(path, 0, 0)
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            out.error = f"cannot read: {e.strerror or e}"
            return out
        out.size, out.hash = len(data), hashlib.sha256(data).hexdigest()
        try:
            image = open_image_bytes(
                data, path, min_size=self._min_size, max_megapixels=self.max_megapixels
            )
            out.crop = self.prep.crop(image)
        except ImageError as e:
            out.error = e.reason
        out.seconds = time.perf_counter() - start
        return out

    def _decode_local(self, path: str, size: int | None, mtime_ns: int) -> Decoded:
        """`size` None: the bytes hashed."""
        start = time.perf_counter()
        out = Decoded(path, size or 0, mtime_ns)
        try:
            out.hash, n_bytes = content_hash(path)
            out.size = n_bytes if size is None else size
            if is_video(path):
                out.kind = "video"
                if out.hash not in self.known:
                    self._read_video(out)
            elif out.hash not in self.known:
                image = open_image(
                    path, min_size=self._min_size, max_megapixels=self.max_megapixels
                )
                out.crop = self.prep.crop(image)
        except ImageError as e:
            out.error = e.reason
        except OSError as e:
            out.error = f"cannot read: {e.strerror or e}"
        out.seconds = time.perf_counter() - start
        return out

    def _read_video(self, out: Decoded) -> None:
        from cliplens.video import read_moments  # PyAV: only where a video is read

        assert out.hash is not None
        at = self.sampled.get(out.hash)
        moments = read_moments(out.path, self.prep, self.video, at_ms=at)
        out.crop, out.times_ms = moments.crops, moments.times_ms

    @property
    def _min_size(self) -> int:
        return self.prep.resize_size  # JPEGs decode at a reduced scale down to this


def content_hash(path: str) -> tuple[str, int]:
    """The sha256 of a file's bytes, and how many there were. A path that is not a regular
    file (a FIFO, a device named like a photo) raises NotAnImageError without blocking:
    it is opened non-blocking and checked before it is read."""
    h = hashlib.sha256()
    n = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:  # noqa: PTH123 (hot path: no Path object per file)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAnImageError(path, "not a regular file")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


_decoder: CropDecoder | None = None  # this worker's, set by init_worker


def init_worker(decoder: CropDecoder) -> None:
    """Set up a decoder process (or the indexer itself, decoding without workers)."""
    global _decoder
    _decoder = decoder


def decode_file(job: FileJob) -> Decoded:
    """Hash a file and, unless its content is already embedded, decode it to a model crop."""
    assert _decoder is not None, "init_worker was not called"
    return _decoder(job)
