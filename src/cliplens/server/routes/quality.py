"""POST /v1/quality: CLIP-IQA attribute scores and the likely distortion of uploaded images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images

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

    def work():
        from cliplens.tasks.quality import DistortionProbe, build_screener

        probe_path = svc.settings.quality_probe
        screener = svc.cached("screener", lambda: build_screener(
            svc.ref, DistortionProbe.load(probe_path) if probe_path else None))  # fmt: skip
        vectors = svc.ref.encode_images(pics)
        features = None
        if screener.probe is not None:
            features = svc.ref.load().encode_features(pics).vectors
        return screener.score(names, vectors, features)

    scores = await svc.run(work)
    return QualityListOut(scores=[QualityOut(
        name=s.path, attributes={k: round(v, 4) for k, v in s.attributes.items()},
        distortion=s.distortion, distortion_probability=round(s.distortion_probability, 4),
        distortion_source=s.distortion_source) for s in scores])  # fmt: skip
