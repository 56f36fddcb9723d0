"""POST /v1/quality: CLIP-IQA attribute scores and the likely distortion of uploaded images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.quality import IqaMode, PromptSet, build_screener, screen

router = APIRouter(prefix="/v1", tags=["quality"])


class QualityOut(BaseModel):
    name: str
    attributes: dict[str, float]
    distortion: str
    distortion_probability: float
    distortion_source: str


class QualityListOut(BaseModel):
    scores: list[QualityOut]
    iqa: IqaMode | None  # how the images were seen; None when there were none to score
    prompts: PromptSet | None


@router.post("/quality", response_model=QualityListOut)
async def quality(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Images to score.")],
    iqa: Annotated[
        IqaMode | None,
        Form(
            description="How CLIP-IQA sees an image: faithful (the paper's: the whole image; "
            "OpenAI-layout ResNets only, their default) or crop (the model's centre crop; "
            "every other model's default)."
        ),
    ] = None,
    prompts: Annotated[
        PromptSet,
        Form(
            description="Attribute prompts: attributes (the paper's six pairs) or clipiqa "
            "(pyiqa's five-pair quality score)."
        ),
    ] = "attributes",
) -> QualityListOut:
    """Scores in [0, 1] per attribute (quality, sharpness, noisiness...), as
    `cliplens quality check` gives them. Files that do not decode are refused with the
    reason (the integrity check)."""
    svc = service_of(request)
    names, pics = await read_images(svc, images)

    def make_screener():
        return build_screener(svc.ref, svc.settings.quality_probe, iqa=iqa, prompts=prompts)

    def work():
        # one screener per way of seeing and prompt set, built on first use
        screener = svc.cached(f"screener:{iqa}:{prompts}", make_screener)
        return screen(pics, svc.ref, screener=screener, names=names)

    found = await svc.run(work)
    scores = [_out(s.to_dict()) for s in found.scores]
    return QualityListOut(scores=scores, iqa=found.iqa, prompts=found.prompts)


def _out(scores: dict) -> QualityOut:
    """A score's dictionary (rounded as the CLI prints it) in the response's shape."""
    name = scores.pop("path")
    fields = ("distortion", "distortion_probability", "distortion_source")
    top = {k: scores.pop(k) for k in fields}
    return QualityOut(name=name, attributes=scores, **top)
