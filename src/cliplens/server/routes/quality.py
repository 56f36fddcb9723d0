"""POST /v1/quality: CLIP-IQA attribute scores and the likely distortion of uploaded images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.quality import build_screener, screen

router = APIRouter(prefix="/v1", tags=["quality"])


class QualityOut(BaseModel):
    name: str
    attributes: dict[str, float]
    distortion: str
    distortion_probability: float
    distortion_source: str


class QualityListOut(BaseModel):
    scores: list[QualityOut]


@router.post("/quality", response_model=QualityListOut)
async def quality(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Images to score.")],
) -> QualityListOut:
    """Scores in [0, 1] per attribute (quality, sharpness, noisiness...). Files that do not
    decode are refused with the reason (the integrity check)."""
    svc = service_of(request)
    names, pics = await read_images(svc, images)

    def make_screener():
        return build_screener(svc.ref, svc.settings.quality_probe)

    def work():
        screener = svc.cached("screener", make_screener)
        return screen(pics, svc.ref, screener=screener, names=names).scores

    scores = await svc.run(work)
    return QualityListOut(scores=[_out(s.to_dict()) for s in scores])


def _out(scores: dict) -> QualityOut:
    """A score's dictionary (rounded as the CLI prints it) in the response's shape."""
    name = scores.pop("path")
    fields = ("distortion", "distortion_probability", "distortion_source")
    top = {k: scores.pop(k) for k in fields}
    return QualityOut(name=name, attributes=scores, **top)
