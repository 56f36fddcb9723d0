"""POST /v1/score: CLIPScore of uploaded images for a prompt, RefCLIPScore with references."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.errors import InvalidInputError
from cliplens.server.service import service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.score import PREFIX, score_images

router = APIRouter(prefix="/v1", tags=["score"])


class ScoreOut(BaseModel):
    name: str
    cosine: float
    clip_score: float
    ref_clip_score: float | None = None


class ScoreListOut(BaseModel):
    prompt: str
    prefix: str
    scores: list[ScoreOut]
    mean_clip_score: float
    best: str


@router.post("/score", response_model=ScoreListOut)
async def score(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Candidate images.")],
    prompt: Annotated[str, Form(min_length=1, max_length=1000)],
    references: Annotated[
        list[str], Form(description="Reference captions for RefCLIPScore (repeat the field).")
    ] = [],  # noqa: B006
    prefix: Annotated[
        str,
        Form(
            max_length=200,
            description="Put before the prompt and every reference before embedding, as the "
            "CLIPScore paper's code does; a single space for the raw text (an empty form "
            "field counts as not sent).",
        ),
    ] = PREFIX,
) -> ScoreListOut:
    """CLIPScore = 2.5 * max(cos, 0) per image (Hessel et al. 2021) for "A photo depicts " +
    prompt (see `prefix`); with references, the harmonic mean with the best reference
    similarity. `best` is the top-ranked image."""
    svc = service_of(request)
    if not prompt.strip():
        raise InvalidInputError("prompt is blank; send the text the images should show")
    names, pics = await read_images(svc, images, whole=True)
    refs = references or None
    report = await svc.run(
        lambda: score_images(pics, svc.ref, prompt, refs, names=names, prefix=prefix)
    )
    out = [
        ScoreOut(
            name=s.path,
            cosine=round(s.cosine, 6),
            clip_score=round(s.clip_score, 6),
            ref_clip_score=None if s.ref_clip_score is None else round(s.ref_clip_score, 6),
        )
        for s in report.scores
    ]
    mean = round(report.mean["clip_score"], 6)
    return ScoreListOut(
        prompt=prompt, prefix=prefix, scores=out, mean_clip_score=mean, best=report.best
    )
