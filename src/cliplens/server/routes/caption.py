"""POST /v1/caption: captions for uploaded images, from the server's captioner (--captioner)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import ApiError, service_of
from cliplens.server.uploads import read_images

router = APIRouter(prefix="/v1", tags=["caption"])


class CaptionOut(BaseModel):
    name: str
    caption: str


class CaptionListOut(BaseModel):
    captions: list[CaptionOut]


@router.post("/caption", response_model=CaptionListOut)
async def caption(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Images to caption.")],
    rerank: Annotated[
        int, Form(ge=0, le=64, description="Sample N candidates; CLIP picks the best (0: greedy).")
    ] = 0,
) -> CaptionListOut:
    svc = service_of(request)
    folder = svc.settings.captioner
    if folder is None:
        raise ApiError(404, "no_captioner", "this server has no captioner; start it with "
                       "--captioner DIR (from 'cliplens caption train')")  # fmt: skip
    names, pics = await read_images(svc, images)

    def work():
        from cliplens.caption.model import check_encoder, load_captioner, read_config

        def build():
            check_encoder(read_config(folder), svc.ref.info.model_id, svc.ref.name)
            return load_captioner(folder)

        captioner = svc.cached("captioner", build)
        vectors = svc.ref.encode_images(pics)
        if rerank > 1:
            return captioner.generate_reranked(vectors, svc.ref.encode_texts, candidates=rerank,
                                               top_p=1.0, seed=0)  # fmt: skip
        return captioner.generate(vectors)

    texts = await svc.run(work)
    return CaptionListOut(captions=[CaptionOut(name=n, caption=t)
                                    for n, t in zip(names, texts, strict=True)])  # fmt: skip
