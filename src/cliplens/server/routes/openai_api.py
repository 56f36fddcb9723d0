"""OpenAI's embeddings API under /openai/v1, so that the `openai` package (and what is
built on it) embeds texts and images with the served model unmodified:
`openai.OpenAI(base_url="http://HOST:PORT/openai/v1", api_key=TOKEN)`.

- `POST /openai/v1/embeddings`: `model` is the served model's name or its model_id (else
  404 `model_not_found`); `input` a string or a list of 1 to `MAX_TEXTS` non-empty
  strings (token-id arrays are refused: the server tokenizes for its own model);
  `encoding_format` "float" or "base64" (little-endian float32 bytes, as the client
  decodes them); `dimensions` only the model's own (vectors are not cut); `user` is
  ignored; unknown fields are ignored. `modality` extends the API as the `infinity`
  embedding server does: "text" (the default) or "image", each input then an image as a
  `data:image/...;base64,...` URI (the server fetches no URL), decoded with the checks
  and limits of uploads (`--max-megapixels`, `--max-files` images a request, the body
  limit `--max-upload-mb`). The vectors are POST /v1/embed's: unit rows, same decoding.
- `GET /openai/v1/models` and `GET /openai/v1/models/{model}`: the served model.

Usage: `prompt_tokens` counts each text's tokens as the model's tokenizer makes them for
its text tower (start and end tokens included, padding not, cut at the context length),
with the exported text tower's tokenizer (models.onnx_text; `cliplens index` and
`search` export it) or else the backend's own (`TorchEncoder.token_counts`). A backend
that offers no count (the OpenVINO engine without an export) counts 0. Which way counts
is decided once per server. An image counts 0 tokens: it is not tokenized.
`total_tokens` equals `prompt_tokens`.

Errors on every path under /openai/ come in OpenAI's shape (app.py), with the statuses
the client maps to its exceptions: {"error": {"message", "type", "param", "code"}}, type
"invalid_request_error" below 500 and "server_error" from 500; `code` is the cliplens
error kind ("invalid_api_key" for a missing or wrong token, "model_not_found", ...), and
a body that does not fit the schema is a 400 (OpenAI's status for it), not a 422.

The schema (/openapi.json) documents these routes with their OpenAI-shaped errors.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel

from cliplens.images import open_image_bytes
from cliplens.models.info import ModelInfo
from cliplens.models.ref import ModelRef
from cliplens.server.service import ApiError, Service, service_of

PREFIX = "/openai/v1"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str  # "invalid_request_error" below 500, "server_error" from 500
    param: str | None = None
    code: str | None = None


class OpenAIErrorOut(BaseModel):
    """Every error under /openai/, in OpenAI's shape."""

    error: OpenAIErrorDetail


OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorOut, "description": what}
    for code, what in [
        (400, "Bad input, a body that does not fit the schema included: the message says how"),
        (401, "Missing or wrong api_key (the server's token)"),
        (404, "Not the served model"),
        (408, "The request body stalled"),
        (413, "Body or image too large"),
        (415, "Not an image, or an unsupported format"),
        (500, "A failure of the server"),
        (501, "An optional part is not installed"),
        (503, "Busy past the time limit, or the model unavailable"),
    ]
}
router = APIRouter(prefix=PREFIX, tags=["openai"], responses=OPENAI_ERRORS)

MAX_TEXTS = 256  # as POST /v1/embed
ROUTES = f"POST {PREFIX}/embeddings and GET {PREFIX}/models"
TokenCounter = Callable[[list[str]], list[int]]


class OpenAIError(ApiError):
    """A refusal that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, kind: str, detail: str, param: str | None) -> None:
        super().__init__(status, kind, detail)
        self.param = param


def _refused(detail: str, param: str = "input") -> OpenAIError:
    return OpenAIError(400, "invalid_input", detail, param)


class EmbeddingsIn(BaseModel):
    model: str
    input: Any  # checked by `_inputs`, for messages that say what to send instead
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] = "text"


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cliplens"


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


@router.post("/embeddings", response_model=EmbeddingsOut)
async def embeddings(request: Request, body: EmbeddingsIn) -> EmbeddingsOut:
    svc = service_of(request)
    info = await _served(svc, body.model)
    image = body.modality == "image"
    items = _inputs(body.input, svc.settings.max_files if image else MAX_TEXTS, image)
    if body.dimensions is not None and body.dimensions != info.dim:
        raise _refused(
            f"dimensions {body.dimensions}: this model's vectors have {info.dim} "
            f"dimensions and are not cut; send {info.dim} or leave dimensions out",
            "dimensions",
        )
    if image:
        prep = info.preprocessing
        decode = partial(_decode_images, items, prep.resize_size, svc.settings.max_megapixels)
        pictures = await anyio.to_thread.run_sync(decode)
        vectors, tokens = await svc.run(svc.ref.encode_images, pictures), 0
    else:

        def work() -> tuple[np.ndarray, int]:
            count = svc.cached("openai:token-counter", lambda: _token_counter(svc.ref))
            return svc.ref.encode_texts(items), (sum(count(items)) if count else 0)

        vectors, tokens = await svc.run(work)
    as_base64 = body.encoding_format == "base64"
    data = [
        Embedding(index=i, embedding=_base64(row) if as_base64 else row.tolist())
        for i, row in enumerate(np.asarray(vectors, dtype=np.float32))
    ]
    usage = Usage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingsOut(data=data, model=body.model, usage=usage)


@router.get("/models", response_model=ModelsOut)
async def models(request: Request) -> ModelsOut:
    svc = service_of(request)
    return ModelsOut(data=[_model(request, svc.ref.name)])


@router.get("/models/{model:path}", response_model=ModelOut)
async def one_model(request: Request, model: str) -> ModelOut:
    await _served(service_of(request), model)
    return _model(request, model)


def _model(request: Request, name: str) -> ModelOut:
    return ModelOut(id=name, created=request.app.state.started)


async def _served(svc: Service, model: str) -> ModelInfo:
    """The served model's info, where `model` names it (by name or model_id)."""
    info: ModelInfo = await anyio.to_thread.run_sync(lambda: svc.ref.info)
    if model not in (svc.ref.name, info.model_id):
        asked = json.dumps(model[:200], ensure_ascii=False)
        raise OpenAIError(
            404,
            "model_not_found",
            f"model {asked} is not served here; this server serves "
            f'"{svc.ref.name}" (model_id "{info.model_id}"): see GET {PREFIX}/models',
            "model",
        )
    return info


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", dict: "an object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return "an array" if isinstance(value, list) else _JSON_TYPES.get(type(value), "a value")


def _is_token_ids(value: list[Any]) -> bool:
    def ints(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    return all(ints(x) for x in value) or all(
        isinstance(x, list) and all(ints(y) for y in x) for x in value
    )


def _inputs(value: Any, most: int, image: bool) -> list[str]:
    """`input` as a list of strings, or a 400 that says what to send."""
    what = "images as data: URIs" if image else "strings"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _refused(
            f"input is {_json_type(value)}; send a string or a list of 1 to {most} {what}"
        )
    if not items:
        raise _refused(f"input is an empty list; send 1 to {most} {what}")
    if _is_token_ids(items):
        raise _refused(
            "input holds token ids; this server tokenizes for its own model: send the "
            "texts as strings"
        )
    if len(items) > most:
        setting = " (--max-files)" if image else ""
        raise _refused(f"input holds {len(items)} items; send at most {most} a request{setting}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _refused(f"input[{i}] is {_json_type(item)}; send {what}")
        if not item:
            raise _refused(f"input[{i}] is empty; send a non-empty string")
    return items


def _image_bytes(item: str, i: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI, or a 400 that says why not."""
    send = "send the image itself as a data: URI (data:image/jpeg;base64,...)"
    head, comma, payload = item.partition(",")
    if head[:5].lower() != "data:":
        if "://" in item[:20]:
            raise _refused(f"input[{i}] is a URL; this server fetches none: {send}")
        raise _refused(f"input[{i}] is not a data: URI; {send}")
    media, *params = head[5:].split(";")
    if not comma or not media.strip().lower().startswith("image/"):
        kind = f"of {media.strip()[:40]!r}" if media.strip() else "without an image type"
        raise _refused(f"input[{i}] is a data: URI {kind}, not an image; {send}")
    if "base64" not in (p.strip().lower() for p in params):
        raise _refused(f"input[{i}] is a data: URI without ';base64'; {send}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _refused(f"input[{i}]: what follows 'base64,' is not base64; {send}") from None


def _decode_images(items: list[str], min_size: int, max_megapixels: float) -> list[Any]:
    """Decoded as uploads are (server/uploads.py), each failure naming its input."""
    return [
        open_image_bytes(
            _image_bytes(item, i),
            f"`input`[{i}]",
            min_size=min_size,
            max_megapixels=max_megapixels,
        )
        for i, item in enumerate(items)
    ]


def _base64(row: np.ndarray) -> str:
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")


def _token_counter(ref: ModelRef) -> TokenCounter | None:
    """How many tokens the model's text tower sees for each text (start and end tokens
    included, padding not), or None where the backend gives no way to count them.

    The exported text tower's tokenizer first (no torch: checked at export to give the
    backend's own ids), else the backend's count; loads the model only where no export
    exists, which encoding the texts does then anyway."""
    fast = ref.fast_text()
    if fast is not None:
        return lambda texts: fast.token_ids(texts)[1].sum(axis=1).tolist()
    counts = getattr(ref.load(), "token_counts", None)
    if counts is None or counts(["a"]) is None:
        return None
    return lambda texts: counts(texts) or [0] * len(texts)
