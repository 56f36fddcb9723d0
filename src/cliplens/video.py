"""Videos (mp4, mov, webm, mkv, avi...) through PyAV (FFmpeg): their moments, as frames.

A video is searched by its moments: frames taken where the picture changes (a new scene),
never closer than `VideoSampling.min_gap` seconds and never further apart than
`max_gap`, each cropped for the model like a photo and stored with its time under the
video's file row (catalog/frames.py). The first frame is always one.

How a change is seen: a decoded frame at least `min_gap` after the last moment is shrunk
to a 16x16 grey thumbnail (by FFmpeg's scaler, in the frame's own memory) and compared
with the last moment's; a mean absolute difference above `change` (0-1 of full scale,
0.1 by default) is a new view. Between the 91 pairs of 14 scikit-image photos the
difference is 0.077 at least, 0.13 at the 5th percentile and 0.25 at the median; grain of
+-4 levels makes 0.001. So a cut between two unlike shots is seen, one between two
look-alikes may not be (the next `max_gap` moment then catches it), and a pan yields a
moment each time it has moved on enough.

Damaged videos get the typed errors photos get (`VideoError`): no video stream, nothing
decodable, or frames that end well before the length the container states (a file cut
short). PyAV is optional (the `video` extra) and imported only when a video is read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.errors import DependencyMissingError, ImageError

if TYPE_CHECKING:
    from PIL import Image

    from cliplens.preprocess import Preprocessing

logger = logging.getLogger(__name__)

_NAMES = ".mp4 .m4v .mov .qt .webm .mkv .avi .3gp .mts .m2ts .wmv .mpg .mpeg .ogv"
VIDEO_EXTENSIONS: frozenset[str] = frozenset(_NAMES.split())
INSTALL = "pip install 'cliplens[video]'"
_THUMB = 16  # side of the grey thumbnails compared to find a new view


class VideoError(ImageError):
    """A video could not be read: `reason` says why (no video stream, damaged, cut short)."""


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video become its searchable moments.

    Why: a phone clip is one to a few shots; a moment per new view (at most one per
    `min_gap` seconds) finds "the dog jumping into the lake" without embedding every frame,
    and one every `max_gap` seconds keeps a long single shot searchable along its length.
    `change` is how different (mean absolute difference of 16x16 grey thumbnails, 0-1) a
    frame must look from the last moment kept to be a new view; `max_frames` caps the
    moments of one video. Frames no other frame refers to (most B-frames) are not decoded
    unless `all_frames`: that halves the decoding of a phone's H.264, and a cut is then
    seen at most a frame or two late.

    >>> import cliplens
    >>> sampling = cliplens.VideoSampling(min_gap=0.5, max_gap=5.0)
    >>> cliplens.update_catalog(cliplens.open_catalog(), cliplens.ModelRef(), ["clips/"],
    ...                         video=sampling)
    """

    min_gap: float = 1.0
    max_gap: float = 10.0
    change: float = 0.1
    max_frames: int = 2000
    all_frames: bool = False

    def __post_init__(self) -> None:
        from cliplens.errors import InvalidInputError

        if not (0 < self.min_gap <= self.max_gap) or not math.isfinite(self.max_gap):
            raise InvalidInputError(
                f"video frame gaps {self.min_gap} to {self.max_gap} s: give 0 < `min_gap` "
                "<= `max_gap`, in seconds"
            )
        if not (0 < self.change < 1):
            raise InvalidInputError(f"video `change` {self.change}: give a number in (0, 1)")
        if not (1 <= self.max_frames <= 100_000):
            raise InvalidInputError(
                f"video `max_frames` {self.max_frames}: give a number from 1 to 100000"
            )


@dataclass
class VideoFrames:
    """A video's moments: times in milliseconds from its start and the model's crops
    (uint8, F x H x W x 3), with the video's length in seconds."""

    times_ms: list[int]
    crops: np.ndarray
    duration: float


def is_video(path: str | PurePath) -> bool:
    """Whether a file is a video, by its extension (the walk's rule for every format)."""
    return PurePath(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av() -> Any:
    """PyAV, or DependencyMissingError naming the extra to install."""
    try:
        import av  # optional: the `video` extra
    except ImportError:
        raise DependencyMissingError(f"videos need PyAV; install it with {INSTALL}") from None
    # FFmpeg's log stays off (PyAV's default): a Python log callback, called from FFmpeg's
    # decoding threads, can deadlock videos read in several threads at once
    return av


def available() -> bool:
    """Whether videos can be read here (PyAV installed)."""
    try:
        require_av()
    except DependencyMissingError:
        return False
    return True


def read_moments(
    path: str,
    prep: Preprocessing,
    sampling: VideoSampling | None = None,
    at_ms: Sequence[int] | None = None,
) -> VideoFrames:
    """The video's moments, cropped for the model: chosen by `sampling`, or (`at_ms`) the
    frames at those times, as a video already sampled for another model is read again.
    VideoError when it cannot be read whole."""
    av = require_av()
    sampling = sampling or VideoSampling()
    times: list[int] = []
    crops: list[np.ndarray] = []
    with _opened(path) as (container, stream):
        # stored times are read again from every frame, so each lands on the frame it
        # was (sampled with or without the frames no other refers to, whatever is asked)
        if not sampling.all_frames and at_ms is None:
            stream.codec_context.skip_frame = "NONREF"
        duration = _stated_duration(container, stream)
        pick = _Picker(sampling, at_ms)
        last_t = 0.0
        for t, frame in _frames(path, container, stream):
            last_t = t
            try:  # FFmpeg's scaler on a frame it cannot convert (an odd pixel format)
                crop = prep.crop(_upright(frame, prep.resize_size)) if pick(t, frame) else None
            except av.error.FFmpegError as e:
                why = f"its frame at {t:.1f} s cannot be converted: {_why(e)}"
                raise VideoError(path, why) from None
            if crop is not None:
                times.append(round(t * 1000))
                crops.append(crop)
                if at_ms is None and len(times) >= sampling.max_frames:
                    break
                if at_ms is not None and not pick.wanted:  # every stored time read
                    break
        else:
            _check_whole(path, last_t, duration, stream)
    if not times:
        raise VideoError(path, "no frame of the video could be decoded")
    return VideoFrames(times, np.stack(crops), duration or last_t)


def frame_at(path: str, seconds: float, max_side: int) -> Image.Image:
    """The upright frame shown at `seconds` (the last one at or before it), at most
    `max_side` pixels on its long side: a video's thumbnail at a moment."""
    av = require_av()
    with _opened(path) as (container, stream):
        target = max(0.0, seconds)
        start = float(stream.start_time or 0) * float(stream.time_base or 0)
        try:
            container.seek(int((start + target) / stream.time_base), stream=stream)
            found = _shown_at(path, container, stream, target)
        except av.error.FFmpegError:
            found = None
        if found is None:  # a seek that lands past the moment or after every key frame
            container.seek(0)  # (MPEG-TS, MPEG-PS): read from the start
            found = _shown_at(path, container, stream, target, from_start=True)
        if found is None:
            raise VideoError(path, f"no frame at {seconds:.1f} s")
        image = _upright(found, None)
    image.thumbnail((max_side, max_side))
    return image


def _shown_at(
    path: str, container: Any, stream: Any, target: float, from_start: bool = False
) -> Any | None:
    """The last frame decoded at or before `target` seconds, from where the container
    stands; None if none decodes, or (after a seek, not `from_start`) if the first comes
    later. From the start, the first frame stands for times before it."""
    found = None
    for t, frame in _frames(path, container, stream):
        if t > target + 1e-3 and (found is not None or not from_start):
            return found
        found = frame
    return found


class _Picker:
    """Decides, frame by frame, which become moments (see the module's words)."""

    def __init__(self, sampling: VideoSampling, at_ms: Sequence[int] | None) -> None:
        self.s = sampling
        self.wanted = sorted(at_ms) if at_ms is not None else None
        self.last_t: float | None = None
        self.last_thumb: np.ndarray | None = None

    def __call__(self, t: float, frame: Any) -> bool:
        if self.wanted is not None:  # the first frame at or after each stored time
            if self.wanted and t * 1000 >= self.wanted[0] - 0.5:
                while self.wanted and t * 1000 >= self.wanted[0] - 0.5:
                    self.wanted.pop(0)
                return True
            return False
        if self.last_t is not None:
            since = t - self.last_t
            if since < self.s.min_gap:
                return False
            thumb = _thumb(frame)
            changed = np.abs(thumb - self.last_thumb).mean() > self.s.change
            if not changed and since < self.s.max_gap:
                return False
            self.last_thumb = thumb
        else:
            self.last_thumb = _thumb(frame)
        self.last_t = t
        return True


def _thumb(frame: Any) -> np.ndarray:
    small = frame.reformat(width=_THUMB, height=_THUMB, format="gray")
    return small.to_ndarray().astype(np.float32) / 255.0


def _upright(frame: Any, short_side: int | None) -> Image.Image:
    """The frame as an RGB image turned as it is shown (the stream's display rotation),
    shrunk by FFmpeg's scaler to `short_side` on its short side first when larger."""
    w, h = frame.width, frame.height
    if short_side and min(w, h) > short_side:
        scale = short_side / min(w, h)
        w, h = max(short_side, round(w * scale)), max(short_side, round(h * scale))
        frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
    image = frame.to_image()
    turn = round((frame.rotation or 0) / 90) % 4  # counterclockwise quarter turns
    if turn:
        from PIL import Image

        transpose = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180)
        image = image.transpose(
            Image.Transpose.ROTATE_270 if turn == 3 else transpose[turn]  # type: ignore[arg-type]
        )
    return image


@contextmanager
def _opened(path: str) -> Iterator[tuple[Any, Any]]:
    """The container and its first video stream, closed on leaving; VideoError when the
    file is not a readable video."""
    av = require_av()
    try:
        container = av.open(path, "r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(path, f"not a readable video ({_why(e)})") from None
    except OSError as e:
        raise VideoError(path, f"cannot read: {e.strerror or e}") from None
    try:
        streams = container.streams.video
        if not streams:
            raise VideoError(path, "the file holds no video stream")
        stream = streams[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for its codec
            raise VideoError(path, "no decoder for the video's codec in this FFmpeg (PyAV's)")
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _frames(path: str, container: Any, stream: Any) -> Iterator[tuple[float, Any]]:
    """(seconds from the stream's start, frame), in presentation order as decoded."""
    av = require_av()
    base = float(stream.time_base) if stream.time_base else 0.0
    start = stream.start_time or 0
    rate = float(stream.average_rate or 0) or 30.0
    n = 0
    try:
        for frame in container.decode(stream):
            timed = frame.pts is not None and base
            t = max(0.0, (frame.pts - start) * base) if timed else n / rate
            n += 1
            yield t, frame
    except av.error.FFmpegError as e:
        if n == 0:
            raise VideoError(path, f"damaged video: {_why(e)}") from None
        raise VideoError(path, f"damaged video after {n} frames: {_why(e)}") from None


def _stated_duration(container: Any, stream: Any) -> float | None:
    """The length the file states for the video, in seconds: the stream's; in Matroska
    and WebM, which state none, the track's DURATION tag; else the container's, but only
    where the video is its one stream (with a longer audio track, the container's length
    is the audio's, and the video would look cut short)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tagged = _clock_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if tagged is not None:
        return tagged
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def _clock_seconds(text: str | None) -> float | None:
    """'00:01:23.500000000' (Matroska's DURATION tag) in seconds; None if it is not one."""
    parts = (text or "").strip().split(":")
    if len(parts) != 3:
        return None
    try:
        h, m, sec = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    total = h * 3600 + m * 60 + sec
    return total if total > 0 and math.isfinite(total) else None


def _check_whole(path: str, last_t: float, duration: float | None, stream: Any) -> None:
    """VideoError when the frames end well before the stated length (a file cut short):
    more than a second and 5% of it missing."""
    if not duration:
        return
    rate = float(stream.average_rate or 0) or 30.0
    missing = duration - (last_t + 1 / rate)
    if missing > max(1.0, 0.05 * duration):
        raise VideoError(
            path, f"truncated: its frames end at {last_t:.1f} s of the {duration:.1f} s it states"
        )


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.split(": '")[0].strip().rstrip(".").lower() or type(e).__name__
