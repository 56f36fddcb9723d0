"""Opening a photo for GET /v1/images and /v1/thumbs: on disk, only a regular file reached
through no symbolic link; on disk or in an object store, only as the image format its
content shows.

A catalog or a build-index folder records whatever the walk found, so a link planted in an
indexed folder (`passwd.jpg -> /etc/passwd`), a page named `.png`, or a photo replaced
after indexing must not become a way to read other files or to serve script to a browser.
So a local path must be absolute and normalised, every component is opened without
following a link (`O_NOFOLLOW` from the root down: the open is the check, so nothing can
be swapped for a link in between), and the opened file must be regular (`fstat`, not the
path).
Then, local or remote, `images.identify` must find one of the formats in SERVED in its
first bytes, with the megapixel cap every image gets; a video's first bytes must start one
of the containers in VIDEOS_SERVED (`served_video_type`). The Content-Type is that
format's, never the extension's; every response also says `nosniff` (app.py).

A browser seeks in a video by asking for byte ranges, so `PhotoResponse` answers one
`Range: bytes=...` with a 206 of those bytes (several ranges, or one it cannot parse: the
whole file, which HTTP allows), and one that starts past the end with a 416.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cliplens.errors import EmptyImageError, NotAnImageError
from cliplens.images import identify
from cliplens.paths import readable
from cliplens.server.service import ApiError

# the formats served, with the type a browser knows them by (MPO: a JPEG with extra frames)
SERVED: dict[str, str] = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
    "JPEG2000": "image/jp2",
    "PPM": "image/x-portable-anymap",
}
# the video containers served: a browser plays MP4 and WebM (and what it can of the rest);
# the others are there for thumbnails (camcorders' MPEG-TS, DVDs' MPEG-PS, Windows' ASF)
VIDEOS_SERVED = ("MP4", "QuickTime", "WebM", "Matroska", "AVI", "MPEG-TS", "MPEG-PS", "ASF", "Ogg")
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
# ISO BMFF brands of still images (HEIF, AVIF): an `ftyp` box that is no video
_IMAGE_BRANDS = frozenset(
    b"mif1 msf1 heic heix heim heis hevc hevx avif avis avci jpeg".split()  # 4 bytes each
)
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_DOC_TYPE = 0x4282  # the EBML header's DocType element
_HEAD = 4096  # bytes read to type a video: its container's header is in the first few
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


@dataclass
class PhotoFile:
    """An opened photo, checked as a file (not yet by content): read it from `file`, then
    close it. `version` is (dev, inode, size, mtime_ns) for a file on disk, None for an
    object-store photo."""

    file: BinaryIO
    label: str  # "photo 12 (/the/path)", for messages
    size: int
    version: tuple[int, int, int, int] | None

    def close(self) -> None:
        self.file.close()


def open_photo(path: str, label: str, update: str) -> PhotoFile:
    """`path` opened as a regular file reached through no link, or a 404 ApiError (what is
    not served, what is gone). `label` names it in messages ("photo 12"); `update` is the
    command that refreshes what is searched."""
    shown = readable(path)
    if not _normalised(path):
        raise _not_served(label, shown, "is not an absolute path without '.' or '..' parts")
    try:
        fd = _open_without_links(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.lexists(path):
            gone = f"{label} is no longer on disk at {shown}"
            fix = f"run '{update}' again to update what is searched"
            raise ApiError(404, "file_missing", f"{gone}; {fix}") from None
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise _not_served(label, shown, "is reached through a symbolic link") from None
        reason = (e.strerror or type(e).__name__).lower()
        raise _not_served(label, shown, f"cannot be opened ({reason})") from None
    st = os.fstat(fd)  # the opened file's, not the path's: nothing can swap it now
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_served(label, shown, "is not a regular file")
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return PhotoFile(os.fdopen(fd, "rb"), f"{label} ({shown})", st.st_size, version)


def open_remote(uri: str, label: str) -> PhotoFile:
    """An object-store photo, read whole through fsspec (it has no descriptor to keep);
    404 when it cannot be read."""
    import fsspec  # optional, and heavy: only for object-store photos

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        why = f"{label} is in the index but cannot be read ({e})"
        raise ApiError(404, "file_missing", why) from None
    return PhotoFile(io.BytesIO(data), f"{label} ({readable(uri)})", len(data), None)


def served_type(photo: PhotoFile, max_megapixels: float) -> str:
    """The Content-Type of the served format that the photo's content is (the file is left
    at its start); NotAnImageError (415) for anything else, whatever its name says,
    ImageTooLargeError (413) above the cap."""
    try:
        found = identify(photo.file, photo.label, SERVED, max_megapixels=max_megapixels)
    except NotAnImageError as e:
        raise NotAnImageError(e.path, f"{e.reason}; served: {', '.join(SERVED)} only") from e
    if found not in SERVED:  # a plugin that names its format otherwise
        raise NotAnImageError(photo.label, f"{found or 'unnamed'} images are not served")
    return SERVED[found]


def served_video_type(photo: PhotoFile) -> str:
    """The Content-Type of the video container the file's first bytes start (the file is
    left at its start); NotAnImageError (415) for anything else, whatever its name says."""
    try:
        head = photo.file.read(_HEAD)
    finally:
        photo.file.seek(0)
    if not head:
        raise EmptyImageError(photo.label, "the file is empty")
    found = video_type(head)
    if found is None:
        served = ", ".join(VIDEOS_SERVED)
        why = "its content is no video container that is served"
        raise NotAnImageError(photo.label, f"{why}; served videos: {served} only")
    return found


def video_type(head: bytes) -> str | None:
    """The Content-Type of the video container `head` (a file's first bytes) starts, or
    None: ISO BMFF (an `ftyp` box first; brand `qt  ` is QuickTime, still-image brands are
    none), EBML by its DocType (WebM, else Matroska, its default), RIFF AVI, MPEG-TS (a
    sync byte every 188 bytes, or every 192 in a camcorder's M2TS), an MPEG-PS pack
    header, ASF's header object, an Ogg page."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if len(brand) < 4 or brand in _IMAGE_BRANDS:
            return None
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    if head[:4] == _EBML_MAGIC:
        doc = _ebml_doc_type(head)
        if doc == "webm":
            return "video/webm"
        return "video/x-matroska" if doc in (None, "matroska") else None
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    for first, packet in ((0, 188), (4, 192)):  # TS, and M2TS's 4-byte time codes
        syncs = head[first : first + 3 * packet : packet]
        if len(syncs) == 3 and syncs == b"GGG":  # 0x47, three packets running
            return "video/mp2t"
    if head[:4] == b"\x00\x00\x01\xba":
        return "video/mpeg"
    if head[:16] == _ASF_GUID:
        return "video/x-ms-asf"
    if head[:4] == b"OggS":
        return "video/ogg"
    return None


def _ebml_doc_type(head: bytes) -> str | None:
    """The DocType of the EBML header at the start of `head` ("webm", "matroska"...), None
    where the header names none (or is cut off within `head`)."""
    header = _vint(head, 4)
    if header is None:
        return None
    pos = 4 + header[1]
    end = min(len(head), pos + header[0])
    while pos < end:
        element = _vint(head, pos, marker=True)
        size = _vint(head, pos + element[1]) if element else None
        if element is None or size is None:
            return None
        pos += element[1] + size[1]
        if element[0] == _DOC_TYPE:
            return head[pos : pos + size[0]].rstrip(b"\0").decode("ascii", "replace")
        pos += size[0]
    return None


def _vint(data: bytes, pos: int, marker: bool = False) -> tuple[int, int] | None:
    """The EBML variable-length integer at `pos` as (value, its length in bytes), None
    where it is cut off or invalid; `marker` keeps the length bits (as element ids do)."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 9 - data[pos].bit_length()
    if pos + length > len(data):
        return None
    value = data[pos] if marker else data[pos] & ((1 << (8 - length)) - 1)
    for byte in data[pos + 1 : pos + length]:
        value = value << 8 | byte
    return value, length


def _normalised(path: str) -> bool:
    """Absolute, with no '.', '..' or empty part (nor a NUL): the form the walk below
    expects. Links are the walk's to refuse, so no lstat of each component here."""
    plain = "//" not in path and "\0" not in path
    return plain and Path(path).is_absolute() and os.path.normpath(path) == path


def _not_served(label: str, shown: str, why: str) -> ApiError:
    rule = (
        "only regular image and video files in the indexed folders, reached without a link, "
        "are served"
    )
    return ApiError(404, "not_served", f"{label} ({shown}) {why}; {rule}")


def _open_without_links(path: str) -> int:
    """A read-only descriptor of `path`, opened one component at a time from the root
    without following a link (ELOOP or ENOTDIR where one is met)."""
    if os.open not in os.supports_dir_fd or not _NOFOLLOW:  # no openat: the path, resolved
        if os.path.realpath(path) != path:
            raise OSError(errno.ELOOP, "a symbolic link on the way", path)
        return os.open(path, _FLAGS | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    root, *names = Path(path).parts  # absolute and normalised (`_normalised`)
    if root != os.sep or not names:
        raise OSError(errno.ENOENT, "not an absolute file path", path)
    folder = os.open(os.sep, _FLAGS | os.O_DIRECTORY)
    try:
        for name in names[:-1]:
            inner = os.open(name, _FLAGS | os.O_DIRECTORY | _NOFOLLOW, dir_fd=folder)
            os.close(folder)
            folder = inner
        # O_NONBLOCK: a FIFO opens at once (and fstat refuses it) instead of waiting for a writer
        return os.open(names[-1], _FLAGS | _NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    finally:
        os.close(folder)


class RangeNotSatisfiableError(ApiError):
    """A byte range that starts past the end of the file (416), with the `Content-Range`
    that tells the client the file's size."""

    def __init__(self, label: str, size: int) -> None:
        fits = f"ask for bytes 0 to {size - 1}" if size else "the file is empty"
        super().__init__(416, "range_not_satisfiable", f"{label} has {size} bytes; {fits}")
        self.headers = {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"}


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.ASCII | re.IGNORECASE)
_HUGE = 10**18  # a position past any file: longer numbers are not parsed (int's digit limit)


def byte_range(header: str | None, size: int, label: str) -> tuple[int, int] | None:
    """The one range `header` asks for, as (first, last) byte positions within the file,
    or None for the whole file: no header, several ranges, another unit or a malformed
    one (HTTP lets a server ignore what it does not parse). RangeNotSatisfiableError for a
    range that starts at or past the end (or asks for the last 0 bytes)."""
    match = _RANGE.fullmatch(header) if header else None
    if match is None or match.groups() == ("", ""):
        return None
    first, last = (None if not g else int(g) if len(g) < 19 else _HUGE for g in match.groups())
    if first is None:  # "-n": the last n bytes
        if not last or not size:
            raise RangeNotSatisfiableError(label, size)
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None  # invalid: ignored, as HTTP says
    if first >= size:
        raise RangeNotSatisfiableError(label, size)
    return first, size - 1 if last is None else min(last, size - 1)


class PhotoResponse(Response):
    """The checked file's bytes from the file already open (never the path again): all of
    them, or (206) the one range `range_header` asks for (`byte_range`)."""

    def __init__(
        self,
        photo: PhotoFile,
        media_type: str,
        headers: dict[str, str],
        range_header: str | None = None,
    ) -> None:
        span = byte_range(range_header, photo.size, photo.label)
        status = 200 if span is None else 206
        headers = {**headers, "Accept-Ranges": "bytes"}
        super().__init__(None, status_code=status, media_type=media_type, headers=headers)
        self.photo = photo
        self.start, last = (0, photo.size - 1) if span is None else span
        self.length = last - self.start + 1
        self.headers["content-length"] = str(self.length)
        if span is not None:
            self.headers["content-range"] = f"bytes {self.start}-{last}/{photo.size}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        file = self.photo.file
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if self.start:
                await anyio.to_thread.run_sync(file.seek, self.start)
            left = self.length
            while True:  # never more than fstat said: a file growing meanwhile stays whole
                chunk = await anyio.to_thread.run_sync(file.read, min(_CHUNK, left))
                left -= len(chunk)
                done = not chunk or left <= 0
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if done:
                    break
        finally:
            file.close()
