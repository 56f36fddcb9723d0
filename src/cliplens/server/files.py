"""Opening a photo on disk for GET /v1/images and /v1/thumbs: only a regular file reached
through no symbolic link, and only as the image format its content shows.

A catalog or a build-index folder records whatever the walk found, so a link planted in an
indexed folder (`passwd.jpg -> /etc/passwd`), a page named `.png`, or a photo replaced
after indexing must not become a way to read other files or to serve script to a browser.
So the path must already be its own real path, every component is opened without
following a link (`O_NOFOLLOW` from the root down, so a folder swapped for a link after
the check changes nothing), the opened file must be regular (`fstat`, not the path), and
Pillow must identify one of the formats in SERVED from its first bytes. The Content-Type
is that format's, never the extension's; every response also says `nosniff` (app.py).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cliplens.paths import readable
from cliplens.server.app import ApiError

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
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


@dataclass
class PhotoFile:
    """An opened, checked photo: read it from `file` (at offset 0), then close it."""

    file: BinaryIO
    media_type: str
    size: int
    version: tuple[int, int, int, int]  # (dev, inode, size, mtime_ns): keys cached thumbnails

    def read(self) -> bytes:
        with self.file:
            return self.file.read()


def open_photo(path: str, label: str, update: str) -> PhotoFile:
    """`path` opened for serving, or an ApiError (404 for what is not served, 415 for what is
    not an image). `label` names it in messages ("photo 12"); `update` is the command that
    refreshes what is searched."""
    shown = readable(path)
    if os.path.realpath(path) != path:
        raise _not_served(label, shown, "is reached through a symbolic link")
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
    file = os.fdopen(fd, "rb")
    try:
        media_type = _image_type(file, label, shown)
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return PhotoFile(
        file, media_type, st.st_size, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    )


def _not_served(label: str, shown: str, why: str) -> ApiError:
    rule = "only regular image files in the indexed folders, reached without a link, are served"
    return ApiError(404, "not_served", f"{label} ({shown}) {why}; {rule}")


def _open_without_links(path: str) -> int:
    """A read-only descriptor of `path`, opened one component at a time from the root
    without following a link (ELOOP or ENOTDIR where one is met)."""
    if os.open not in os.supports_dir_fd or not _NOFOLLOW:  # no openat: the last one only
        return os.open(path, _FLAGS | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    root, *names = Path(path).parts  # realpath(path) == path: absolute, normalised
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


def _image_type(file: BinaryIO, label: str, shown: str) -> str:
    """The Content-Type of the image format Pillow identifies from the file's content."""
    from PIL import Image

    from cliplens.images import _register_plugins

    _register_plugins()  # HEIC/AVIF through pillow-heif, where installed
    Image.init()
    formats = [f for f in SERVED if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file, formats=formats)  # reads the header only
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"{label} ({shown}) is too large to serve") from None
    except Exception as e:  # UnidentifiedImageError, or a plugin's own failure: not served
        what = f"{label} ({shown}) is not an image in a served format ({', '.join(SERVED)})"
        raise ApiError(415, "not_an_image", f"{what}, whatever its name says") from e
    return SERVED[image.format or ""]


class PhotoResponse(Response):
    """The checked file's bytes from the descriptor already open (never the path again)."""

    def __init__(self, photo: PhotoFile, headers: dict[str, str]) -> None:
        super().__init__(None, media_type=photo.media_type, headers=headers)
        self.photo = photo
        self.headers["content-length"] = str(photo.size)

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
            left = self.photo.size
            while True:  # never more than fstat said: a file growing meanwhile stays whole
                chunk = await anyio.to_thread.run_sync(file.read, min(_CHUNK, left))
                left -= len(chunk)
                done = not chunk or left <= 0
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if done:
                    break
        finally:
            file.close()
