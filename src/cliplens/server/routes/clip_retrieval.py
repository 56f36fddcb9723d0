"""clip-retrieval's back-end API (`serve --clip-retrieval`): GET /indices-list,
POST /knn-service and POST /metadata, with the request and response shapes of
clip_retrieval/clip_back.py 2.45.0, so that its `ClipClient` and its web front end
clip-front search this server's photos unmodified.

What each of clip-retrieval's options does here:

- `text`, `image` (the file's bytes, base64), `embedding_input` (a vector of the model's
  dimension; normalised first, so similarities are cosines), and `image_url`, fetched
  only with `--allow-url-fetch` and then only from public addresses (server/fetch.py).
- `modality`: "image" only. clip-retrieval can also search an index of captions; a photo
  catalog has none, so "text" is refused.
- `num_result_ids` rows come back (at most `MAX_RESULT_IDS`), the first `num_images` of
  them with their metadata: `image_path`, `image` (a JPEG thumbnail, base64, `THUMB_SIDE`
  px on its long side, where clip-retrieval sends the whole file re-encoded; the first
  `MAX_THUMBS` rows only), and `url` (this server's GET /v1/images/{id}) where the server
  has no token. There are no captions.
- `deduplicate`: clip-retrieval's rule, kept exactly: results whose vectors have cosine
  >= 0.94 are linked, and of each connected group only the best-ranked stays.
- `use_safety_model`, `use_violence_detector`: the server's moderation policy (`--policy`)
  judges each result's stored vector; a result flagged in the policy's "violence" or
  "gore" categories is dropped for the first, in any other category for the second.
- `aesthetic_score` (0-9) and `aesthetic_weight`: clip-retrieval adds the mean embedding of
  LAION images with that aesthetic rating, times the weight, to the query. Those means
  exist for two OpenAI models only. By default the pair changes nothing here: the stand-in
  measured, the model's own embedding of aesthetic prompts (`AESTHETIC_PROMPTS`) mixed
  from the worst to the best by the score and added as clip-retrieval adds its means,
  ranked originals above their distorted copies less often than no term at all (0.586
  against 0.629 at ClipClient's 9 and 0.5, on the offline model; benchmarks/RESULTS.md),
  and ClipClient sends that pair with every query. `serve --clip-retrieval-aesthetic`
  turns the term on, for a model where it helps.
- `use_mclip`: accepted and without effect; the served model encodes every text.

clip-front sends its JSON as text/plain (a "simple" cross-origin request, without a
preflight), so these routes read the body as JSON whatever its type. Neither client can
send a token: these routes take none (the server warns at start when it has one).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from cliplens.errors import ClipLensError, InvalidInputError
from cliplens.images import open_image_bytes
from cliplens.paths import readable
from cliplens.searchable import Hit
from cliplens.server.fetch import fetch
from cliplens.server.routes.search import thumbnail_bytes
from cliplens.server.service import ApiError, ErrorOut, Service, service_of
from cliplens.tasks.moderate import Moderator, build_moderator
from cliplens.tasks.policy import load_policy
from cliplens.tasks.search import Term, query_vector, weighted_sum

router = APIRouter(tags=["clip-retrieval"])
FETCH_REFUSED = {403: {"model": ErrorOut, "description": "image_url without --allow-url-fetch"}}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The body's schema for the OpenAPI document (the routes read the body themselves, to
    take clip-front's text/plain; any content type is accepted)."""
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}}
    return {"requestBody": {**schema, "required": True}}


MAX_RESULT_IDS = 10_000
MAX_THUMBS = 500  # rows of one answer with a thumbnail: each may decode a 12 MP photo
MAX_METADATA_IDS = MAX_THUMBS
THUMB_SIDE = 384
DEDUP_COSINE = 0.94  # clip-retrieval's threshold
VIOLENCE_CATEGORIES = frozenset({"violence", "gore"})
AESTHETIC_PROMPTS = {
    "best": ["a beautiful photo", "a high quality photo", "a stunning, professional photo"],
    "worst": ["an ugly photo", "a low quality photo", "a blurry, badly taken photo"],
}


def _blank_is_none(value: Any) -> Any:
    """clip-front sends "" for an aesthetic score or weight it has not set."""
    return None if value == "" else value


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send more than is used

    text: str | None = Field(None, max_length=1000)
    image: str | None = Field(None, description="The image file's bytes, base64.")
    image_url: str | None = Field(None, max_length=2000)
    embedding_input: list[float] | None = Field(None, max_length=8192)
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=MAX_RESULT_IDS)
    num_result_ids: int | None = Field(None, ge=1, le=MAX_RESULT_IDS)
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        None, ge=0, le=9
    )
    aesthetic_weight: Annotated[float | None, BeforeValidator(_blank_is_none)] = Field(
        None, ge=0, le=10, allow_inf_nan=False
    )


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(max_length=MAX_METADATA_IDS)
    indice_name: str | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The body as JSON whatever its content type (clip-front's is text/plain)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"the body is not JSON ({type(e).__name__}); send JSON") from e
    if not isinstance(data, dict):
        raise InvalidInputError("the body is not a JSON object; send the documented fields")
    return model.model_validate(data)


def index_name(svc: Service) -> str:
    """The one name this server answers to: its catalog's or its built index's."""
    return svc.searched_name or "cliplens"


def _check_index(svc: Service, name: str | None) -> None:
    if name is not None and name != index_name(svc):
        raise ApiError(
            404, "unknown_index", f"no index '{name[:100]}'; this server has '{index_name(svc)}'"
        )


@router.get("/indices-list", response_model=list[str])
def indices_list(request: Request) -> list[str]:
    """The names of what can be searched (one: the catalog or the built index served)."""
    return [index_name(service_of(request))]


@router.post("/knn-service", openapi_extra=_json_body(KnnRequest), responses=FETCH_REFUSED)
async def knn_service(request: Request) -> list[dict[str, Any]]:
    """Nearest photos to a text, an image, an image URL or an embedding."""
    svc = service_of(request)
    body = await _body(request, KnnRequest)
    _check_index(svc, body.indice_name)
    if body.modality == "text":
        raise InvalidInputError(
            "modality 'text' searches an index of captions, which a photo catalog has not; "
            "send modality 'image'"
        )
    given = [body.text, body.image, body.image_url, body.embedding_input]
    if sum(x is not None and x != "" for x in given) != 1:
        raise InvalidInputError("send exactly one of text, image, image_url, embedding_input")
    image = await _image(svc, body)
    n = body.num_result_ids or body.num_images
    base = str(request.base_url).rstrip("/")

    def work() -> list[Hit]:
        searched = svc.searched()
        vec = _query(svc, body, image)
        return _filtered(svc, searched.search(vec, n, svc.model_id()), body)

    def rows(hits: list[Hit]) -> list[dict[str, Any]]:
        out = []
        for i, hit in enumerate(hits):
            row: dict[str, Any] = {"id": hit.id, "similarity": round(hit.score, 6)}
            if i < body.num_images:
                row |= _metadata(svc, hit, base, thumbnail=i < MAX_THUMBS)
            out.append(row)
        return out

    hits = await svc.run(work)  # the model's part; thumbnails without its lock
    return await _in_thread(rows, hits)


@router.post("/metadata", openapi_extra=_json_body(MetadataRequest))
async def metadata(request: Request) -> list[dict[str, Any]]:
    """The metadata of results by id, as /knn-service gives its first rows."""
    svc = service_of(request)
    body = await _body(request, MetadataRequest)
    _check_index(svc, body.indice_name)
    base = str(request.base_url).rstrip("/")

    def work() -> list[dict[str, Any]]:
        searched = svc.searched()
        out = []
        for photo_id in body.ids:
            path = searched.path_of(photo_id)
            if path is not None:
                hit = Hit(path, 0.0, photo_id)
                out.append({"id": photo_id, "metadata": _metadata(svc, hit, base)})
        return out

    return await _in_thread(work)  # no model: files and thumbnails only


async def _image(svc: Service, body: KnnRequest) -> Any:
    """The query image, decoded with the checks every upload gets, or None."""
    if body.image:
        try:
            data = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidInputError("image: not base64; send the file's bytes in base64") from e
        label = "image"
    elif body.image_url:
        if not svc.settings.allow_url_fetch:
            raise ApiError(
                403,
                "url_fetch_disabled",
                "image_url: this server does not fetch URLs (start it with --allow-url-fetch); "
                "send the image itself as 'image'",
            )
        limit = int(svc.settings.max_upload_mb * 1024 * 1024)
        data = await _in_thread(
            fetch, body.image_url, max_bytes=limit, timeout_s=svc.settings.url_fetch_timeout_s
        )
        label = "image_url"
    else:
        return None
    prep = await _in_thread(lambda: svc.ref.info.preprocessing)
    return await _in_thread(
        open_image_bytes,
        data,
        label,
        min_size=prep.resize_size,
        max_megapixels=svc.settings.max_megapixels,
    )


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def _query(svc: Service, body: KnnRequest, image: Any) -> np.ndarray:
    if body.embedding_input is not None:
        vec = np.asarray(body.embedding_input, np.float32)
        dim = svc.ref.info.dim
        if vec.shape != (dim,) or not np.isfinite(vec).all() or not np.linalg.norm(vec) > 0:
            raise InvalidInputError(
                f"embedding_input: give {dim} finite numbers, not all zero (the model's dimension)"
            )
        vec = vec / np.linalg.norm(vec)
    elif image is not None:
        vec = query_vector(svc.ref, [], images=[(image, 1.0)])
    else:
        vec = query_vector(svc.ref, [Term(1.0, text=body.text)])
    aesthetic = body.aesthetic_score is not None and body.aesthetic_weight
    if aesthetic and svc.settings.clip_retrieval_aesthetic:
        score, weight = int(body.aesthetic_score or 0), float(body.aesthetic_weight or 0)
        vec = weighted_sum([vec, aesthetic_direction(svc, score)], [1.0, weight])
    return vec


def aesthetic_direction(svc: Service, score: int) -> np.ndarray:
    """The unit direction for an aesthetic score 0-9: the embedding of the worst prompts
    at 0, of the best at 9, mixed linearly between."""

    def build() -> tuple[np.ndarray, np.ndarray]:
        best = svc.ref.encode_texts(AESTHETIC_PROMPTS["best"]).mean(0)
        worst = svc.ref.encode_texts(AESTHETIC_PROMPTS["worst"]).mean(0)
        return best / np.linalg.norm(best), worst / np.linalg.norm(worst)

    best, worst = svc.cached("aesthetic", build)
    return weighted_sum([best, worst], [score / 9, 1 - score / 9])


def _filtered(svc: Service, hits: list[Hit], body: KnnRequest) -> list[Hit]:
    """The hits less near-duplicates and what the policy flags, as asked."""
    if not hits or not (body.deduplicate or body.use_safety_model or body.use_violence_detector):
        return hits
    searched, model_id = svc.searched(), svc.model_id()
    vectors = np.stack([searched.vector(int(h.id or 0), model_id) for h in hits])
    keep = np.ones(len(hits), bool)
    if body.deduplicate:
        keep &= first_of_each_group(vectors, DEDUP_COSINE)
    if body.use_safety_model or body.use_violence_detector:
        moderator = svc.cached(
            "moderator", lambda: build_moderator(load_policy(svc.settings.policy), svc.ref)
        )
        violent, other = flagged(moderator, vectors)
        if body.use_violence_detector:
            keep &= ~violent
        if body.use_safety_model:
            keep &= ~other
    return [h for h, k in zip(hits, keep, strict=True) if k]


def first_of_each_group(vectors: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """A mask keeping, of each group of rows linked by cosine >= threshold (connected
    components), the first row only: clip-retrieval's deduplication."""
    parent = np.arange(len(vectors))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T
        for r, c in zip(*np.nonzero(sims >= threshold), strict=True):
            a, b = find(int(r) + start), find(int(c))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the group's root is its first row
    return np.array([find(i) == i for i in range(len(vectors))], bool)


def flagged(moderator: Moderator, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged in a violence category, flagged in any other) per row, by the policy's
    concepts with their thresholds (and its trained head, in the head's category)."""
    scores, thresholds, _ = moderator.margins(vectors)
    over = scores > thresholds
    is_violent = np.array([c in VIOLENCE_CATEGORIES for c in moderator.categories], bool)
    violent = (over & is_violent).any(1)
    other = (over & ~is_violent).any(1)
    head = moderator.policy.head
    if moderator.head is not None and head is not None:
        hit = moderator.head.probability(vectors) >= head.threshold
        if head.category in VIOLENCE_CATEGORIES:
            violent |= hit
        else:
            other |= hit
    return violent, other


def _metadata(svc: Service, hit: Hit, base: str, thumbnail: bool = True) -> dict[str, Any]:
    """A result's metadata as clip-retrieval gives it: its path, a thumbnail (a video's:
    its frame at the moment found), and a URL to the photo where a client can fetch it
    without a token."""
    meta: dict[str, Any] = {"image_path": readable(hit.path)}
    if svc.settings.token is None:
        meta["url"] = f"{base}/v1/images/{hit.id}"
    if not thumbnail:
        return meta
    try:
        data = thumbnail_bytes(svc, int(hit.id or 0), THUMB_SIDE, hit.time)  # a video's moment
    except (ApiError, ClipLensError, OSError):
        return meta  # a photo gone or not served: its row stays, without an image
    meta["image"] = base64.b64encode(data).decode("ascii")
    return meta
