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
        start = "start it with --captioner DIR (from 'cliplens caption train')"
        detail = f"this server has no captioner; {start}"
        raise ApiError(404, "no_captioner", detail)
    names, pics = await read_images(svc, images)

    def work() -> list[str]:
        # heavy: torch loads only when a caption is asked for, not when the server starts
        from cliplens.captioning.model import CaptionOptions, caption, load_captioner

        captioner = svc.cached("captioner", lambda: load_captioner(folder))
        # rerank N: the best of N candidates (greedy and unrestricted samples, seed 0)
        return caption(captioner, pics, CaptionOptions(rerank=max(1, rerank)), svc.ref)

    texts = await svc.run(work)
    found = [CaptionOut(name=n, caption=t) for n, t in zip(names, texts, strict=True)]
    return CaptionListOut(captions=found)
