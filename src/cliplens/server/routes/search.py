"""Photo and video search over the catalog or a built index: GET|POST /v1/search, GET
/v1/similar/{id}, and the files themselves, by id only: GET /v1/images/{id},
GET /v1/thumbs/{id}.

A video is one result at its best moment (`time`, with its other `moments`); its
thumbnail is the frame at a moment (`/v1/thumbs/{id}?t=SECONDS`), and /v1/images serves
the video itself, in byte ranges, so a browser can play it from that moment."""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from cliplens.catalog.db import Catalog
from cliplens.images import is_remote, open_image
from cliplens.paths import readable
from cliplens.searchable import Hit
from cliplens.server.batching import SearchQuery
from cliplens.server.files import (
    PhotoFile,
    PhotoResponse,
    open_photo,
    open_remote,
    served_type,
    served_video_type,
)
from cliplens.server.service import ErrorOut, Service, service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.search import (
    MAX_WEIGHT,  # the bound of parse_query's weights too
    page,
    parse_query,
    query_vector,
    search,
)
from cliplens.tasks.search import similar as similar_photos
from cliplens.video import VideoError, frame_at, is_video

router = APIRouter(prefix="/v1", tags=["search"])
MAX_N = 200
MAX_ID = 2**63 - 1  # catalog ids are SQLite integers
FileId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="A photo id from a result.")]
MAX_SECONDS = 1_000_000.0  # a moment's bound: longer than any video (11 days)


class Moment(BaseModel):
    """A moment of a video found by the query: seconds from its start, and its score."""

    time: float
    score: float


class SearchHit(BaseModel):
    id: int
    name: str
    path: str
    score: float
    image_url: str
    thumb_url: str  # a video's carries `?t=` of its moment: add parameters with `&`
    kind: Literal["image", "video"] = "image"
    time: float | None = None  # a video's best moment, in seconds from its start
    moments: list[Moment] = []  # a video's moments found, best first (the best included)


class SearchOut(BaseModel):
    query: str
    results: list[SearchHit]
    offset: int = 0  # of the first result in the whole list
    next_offset: int | None = None  # the next page's offset; None: this is the last page


def _seconds(t: float) -> str:
    """Seconds as a URL shows them: to the millisecond, without trailing zeros."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def _hit(hit: Hit) -> SearchHit:
    """A result as JSON can carry it: a name that is not UTF-8 shows its bytes as \\xNN
    (the files themselves are fetched by id); a video (a hit with a moment) with its
    thumbnail at that moment."""
    thumb_url = f"/v1/thumbs/{hit.id}"
    if hit.time is not None:
        thumb_url += f"?t={_seconds(hit.time)}"
    return SearchHit(
        id=hit.id,
        name=readable(Path(hit.path).name),
        path=readable(hit.path),
        score=round(hit.score, 6),
        image_url=f"/v1/images/{hit.id}",
        thumb_url=thumb_url,
        kind="image" if hit.time is None else "video",
        time=None if hit.time is None else round(hit.time, 3),
        moments=[Moment(time=round(t, 3), score=round(sc, 6)) for t, sc in hit.moments],
    )


def _hits(hits: list[Hit]) -> list[SearchHit]:
    return [_hit(h) for h in hits]


MAX_OFFSET = 10_000
MinScore = Annotated[
    float | None,
    Query(ge=-1, le=1, allow_inf_nan=False, description="Only results scoring at least this."),
]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Results to skip (paging).")]
EACH_MOMENT = (
    "Each moment of a video found is a result of its own (default: one result per video, at "
    "its best moment, with its next best in `moments`)."
)
EachMoment = Annotated[bool, Query(description=EACH_MOMENT)]


def _page(
    query: str,
    hits: list[Hit],
    n: int,
    offset: int,
    min_score: float | None,
    skip: bool = True,
) -> SearchOut:
    """A page of `n` from hits fetched `n + 1` past `offset` (one more: is there a next?),
    from the first hit (`skip`) or from hits that start at `offset` already."""
    kept = page(hits, n + 1, offset if skip else 0, min_score)
    more = len(kept) > n
    return SearchOut(
        query=query,
        results=_hits(kept[:n]),
        offset=offset,
        next_offset=offset + n if more else None,
    )


class Term(BaseModel):
    """One weighted term: a text, or a searched photo by its id."""

    text: str | None = Field(None, min_length=1, max_length=1000)
    id: int | None = Field(None, ge=0, le=MAX_ID)
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_kind(self) -> Term:
        if (self.text is None) == (self.id is None):
            raise ValueError("give a term either 'text' or 'id', not both")
        return self


class SearchRequest(BaseModel):
    terms: list[Term] = Field(min_length=1, max_length=32)
    n: int = Field(20, ge=1, le=MAX_N)
    min_score: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    each_moment: bool = Field(False, description=EACH_MOMENT)


async def _search(svc: Service, terms: list[Term], n: int, each_moment: bool) -> list[Hit]:
    """Hits for weighted terms (texts, photo ids: never paths), batched with concurrent
    queries."""
    texts = [(t.text, t.weight) for t in terms if t.text is not None]
    ids = [(t.id, t.weight) for t in terms if t.id is not None]
    query = SearchQuery(
        [text for text, _ in texts],
        [w for _, w in texts],
        [i for i, _ in ids],
        [w for _, w in ids],
        n,
        each_moment,
    )
    return await svc.batcher.search(query)


def _text_terms(q: str) -> list[Term]:
    return [Term(text=t.text, weight=t.weight) for t in parse_query(q, images=False)]


QueryText = Annotated[
    str,
    Query(
        min_length=1,
        max_length=1000,
        description='Text, with weights: "2:sunset + beach - people".',
    ),
]


@router.get("/search", response_model=SearchOut)
async def search_get(
    request: Request,
    q: QueryText,
    n: Annotated[int, Query(ge=1, le=MAX_N)] = 20,
    min_score: MinScore = None,
    offset: Offset = 0,
    each_moment: EachMoment = False,
) -> SearchOut:
    """Search the catalog with a text query; `offset` and `min_score` page through it."""
    hits = await _search(service_of(request), _text_terms(q), n + offset + 1, each_moment)
    return _page(q, hits, n, offset, min_score)


@router.post("/search", response_model=SearchOut)
async def search_post(request: Request, body: SearchRequest) -> SearchOut:
    """Search with weighted terms: texts and catalog photos (by id), e.g.
    {"terms": [{"text": "beach"}, {"id": 12, "weight": 0.5}, {"text": "people", "weight": -1}]}."""
    named = [t.text if t.text is not None else f"#{t.id}" for t in body.terms]
    label = " + ".join(f"{t.weight:g}:{name}" for t, name in zip(body.terms, named, strict=True))
    hits = await _search(
        service_of(request), body.terms, body.n + body.offset + 1, body.each_moment
    )
    return _page(label, hits, body.n, body.offset, body.min_score)


@router.post("/search/image", response_model=SearchOut)
async def search_image(
    request: Request,
    image: Annotated[UploadFile, File(description="A photo to search by.")],
    q: Annotated[
        str | None, Form(max_length=1000, description="Text to add (weights allowed).")
    ] = None,
    image_weight: Annotated[float, Form(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)] = 1.0,
    n: Annotated[int, Form(ge=1, le=MAX_N)] = 20,
    min_score: Annotated[float | None, Form(ge=-1, le=1, allow_inf_nan=False)] = None,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
    each_moment: Annotated[bool, Form(description=EACH_MOMENT)] = False,
) -> SearchOut:
    """Search by an uploaded photo, optionally with text terms."""
    svc = service_of(request)
    _, pics = await read_images(svc, [image], 1)
    terms = parse_query(q, images=False) if q and q.strip() else []
    label = " + ".join([f"{image_weight:g}:[image]", *([q] if terms else [])])

    def work() -> list[Hit]:
        searched = svc.searched()
        vec = query_vector(svc.ref, terms, images=[(pics[0], image_weight)])
        svc.model_id()  # a built index's model, not another
        return search(searched, svc.ref, vec, n + 1, offset=offset, each_moment=each_moment)

    return _page(label, await svc.run(work), n, offset, min_score, skip=False)


@router.get("/similar/{file_id}", response_model=SearchOut)
async def similar(
    request: Request,
    file_id: FileId,
    n: Annotated[int, Query(ge=1, le=MAX_N)] = 20,
    min_score: MinScore = None,
    offset: Offset = 0,
) -> SearchOut:
    """Photos most like the photo `file_id` (itself excluded)."""
    svc = service_of(request)

    def work() -> list[Hit]:
        searched = svc.searched()
        svc.model_id()  # a built index's model, not another
        return similar_photos(searched, svc.ref, file_id, n + 1, offset=offset)

    hits = await svc.run(work)
    return _page(f"similar to {file_id}", hits, n, offset, min_score, skip=False)


def _update_hint(svc: Service) -> str:
    return "cliplens index" if svc.searches == "catalog" else "cliplens build-index"


def _is_video(svc: Service, file_id: int, path: str) -> bool:
    """Whether the file is a video: as the catalog recorded it, else (a build-index row)
    by its extension, the walk's rule. Its content must then be a video container."""
    searched = svc.searched()
    if isinstance(searched, Catalog):
        row = searched.file(file_id)
        return row is not None and row.kind == "video"
    return is_video(path)


def _open(svc: Service, path: str, label: str) -> PhotoFile:
    """The file, opened with the checks of files.py for its kind: status ok in the
    catalog; on disk, no symbolic link and a regular file (its content not yet checked)."""
    if is_remote(path):
        return open_remote(path, label)
    return open_photo(path, label, _update_hint(svc))


def _label(file_id: int, video: bool) -> str:
    return f"{'video' if video else 'photo'} {file_id}"


MEDIA = {"image/*": {}, "video/*": {}}
RangeHeader = Annotated[
    str | None,
    Header(
        alias="range",
        description="One byte range (`bytes=0-1023`, `bytes=1024-`, `bytes=-512`): a 206 of "
        "those bytes; several ranges or a malformed one: the whole file.",
    ),
]


@router.get(
    "/images/{file_id}",
    response_class=Response,
    responses={
        200: {"content": MEDIA},
        206: {"description": "The range asked for", "content": MEDIA},
        416: {"model": ErrorOut, "description": "A range that starts past the file's end"},
    },
)
def image(request: Request, file_id: FileId, range_header: RangeHeader = None) -> Response:
    """The original file of a photo or a video, typed by its content; one byte range of it
    where the request asks (a browser seeking in a video does)."""
    svc = service_of(request)
    path = svc.searched().servable(file_id)
    video = _is_video(svc, file_id, path)
    photo = _open(svc, path, _label(file_id, video))
    try:
        if video:
            media_type = served_video_type(photo)
        else:
            media_type = served_type(photo, svc.settings.max_megapixels)
        cache_control = {"Cache-Control": "private, max-age=3600"}
        return PhotoResponse(photo, media_type, cache_control, range_header)
    except BaseException:
        photo.close()
        raise


class _Thumbs:
    """JPEG thumbnails kept in memory, least recently used first out."""

    def __init__(self, size: int) -> None:
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
            return self.items.get(key)

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def _thumbnail(photo: PhotoFile, side: int, max_megapixels: float) -> bytes:
    """A JPEG of the photo, from the file already open, if /v1/images would serve it."""
    served_type(photo, max_megapixels)
    img = open_image(photo.file, min_size=side, max_megapixels=max_megapixels, label=photo.label)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return _jpeg(img)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# One video decoded at a time, so that a page of video results does not start a dozen
# FFmpeg decoders, each with its threads, at once. (FFmpeg's log stays off: with a PyAV
# log level set, its decoding threads take the GIL to log, and concurrent decodes
# deadlocked; see video.require_av.)
_DECODING = threading.Lock()
_FD_FOLDERS = ("/proc/self/fd", "/dev/fd")  # a path per open descriptor


def _video_thumbnail(photo: PhotoFile, seconds: float, side: int) -> bytes:
    """A JPEG of the video's frame at `seconds`, if /v1/images would serve the video: only
    a served container reaches FFmpeg, which would otherwise follow what it finds (a
    playlist names other files). FFmpeg reads the very file opened and checked, through
    its descriptor (/proc/self/fd), or a copy of an object-store video."""
    served_video_type(photo)
    try:
        with _video_source(photo) as source, _DECODING:
            img = frame_at(source, seconds, side)
    except VideoError as e:
        raise VideoError(photo.label, e.reason) from None
    return _jpeg(img)


@contextmanager
def _video_source(photo: PhotoFile) -> Iterator[str]:
    """A path FFmpeg can open that is the photo's file itself: its descriptor's (Linux's
    /proc/self/fd, the BSDs' and macOS's /dev/fd), or (an object-store video, or neither
    folder) a temporary copy of its bytes."""
    fd = photo.file.fileno() if photo.version is not None else None
    folder = next((d for d in _FD_FOLDERS if Path(d).is_dir()), None)
    if fd is not None and folder is not None:
        yield f"{folder}/{fd}"
        return
    with tempfile.NamedTemporaryFile(suffix=".video") as copy:
        shutil.copyfileobj(photo.file, copy)
        copy.flush()
        yield copy.name


def thumbnail_bytes(svc: Service, file_id: int, size: int, t: float | None = None) -> bytes:
    """The JPEG thumbnail of a served photo, or of a video's frame at `t` seconds (default:
    its first frame, always one of its moments), from the server's cache or made now."""
    path = svc.searched().servable(file_id)
    video = _is_video(svc, file_id, path)
    label = _label(file_id, video)
    photo = None if is_remote(path) else open_photo(path, label, _update_hint(svc))
    at = round(t or 0.0, 3) if video else None  # a photo has one picture, whatever `t`
    key = (file_id, path if photo is None else photo.version, size, at)
    cache = svc.cached("thumbs", lambda: _Thumbs(512))
    try:
        data = cache.get(key)
        if data is None:
            if photo is None:  # an object-store photo is read only now
                photo = open_remote(path, label)
            if at is not None:
                data = _video_thumbnail(photo, at, size)
            else:
                data = _thumbnail(photo, size, svc.settings.max_megapixels)
            cache.put(key, data)
    finally:
        if photo is not None:
            photo.close()
    return data


MomentQuery = Annotated[
    float | None,
    Query(
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="For a video: the moment shown, in seconds from its start (default: its "
        "first frame). A photo has one picture and ignores it.",
    ),
]


@router.get(
    "/thumbs/{file_id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}}
)
def thumb(
    request: Request,
    file_id: FileId,
    size: Annotated[int, Query(ge=16, le=1024)] = 256,
    t: MomentQuery = None,
) -> Response:
    """A JPEG thumbnail of a photo, or of a video's frame at `t`, at most `size` pixels on
    its long side.

    A file on disk is opened (and checked as a file) on every request and keyed by its
    (device, inode, size, mtime) (and a video's moment): a hit was made from that very
    file, so its content is not identified again, and a changed file is a new key. An
    object-store photo is keyed by its URI, and read only on a miss."""
    data = thumbnail_bytes(service_of(request), file_id, size, t)
    cache_control = {"Cache-Control": "private, max-age=3600"}
    return Response(data, media_type="image/jpeg", headers=cache_control)
