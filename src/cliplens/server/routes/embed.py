"""POST /v1/embed: texts and/or images to unit vectors in the model's space."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.errors import InvalidInputError
from cliplens.server.service import service_of
from cliplens.server.uploads import read_images

router = APIRouter(prefix="/v1", tags=["embed"])


class EmbedOut(BaseModel):
    model_id: str
    dim: int
    texts: list[list[float]]
    images: list[list[float]]
    image_names: list[str]


@router.post("/embed", response_model=EmbedOut)
async def embed(
    request: Request,
    texts: Annotated[list[str], Form(description="Texts to embed (repeat the field).")] = [],  # noqa: B006
    images: Annotated[list[UploadFile], File(description="Images to embed.")] = [],  # noqa: B006
) -> EmbedOut:
    svc = service_of(request)
    if not texts and not images:
        raise InvalidInputError("nothing to embed; send 'texts' fields and/or 'images' files")
    if len(texts) > 256:
        raise InvalidInputError(f"{len(texts)} texts in one request; send at most 256")
    names, pics = await read_images(svc, images) if images else ([], [])

    def work():
        t = svc.ref.encode_texts(texts).tolist() if texts else []
        i = svc.ref.encode_images(pics).tolist() if pics else []
        return t, i

    t, i = await svc.run(work)
    info = svc.ref.info
    return EmbedOut(model_id=info.model_id, dim=info.dim, texts=t, images=i, image_names=names)
