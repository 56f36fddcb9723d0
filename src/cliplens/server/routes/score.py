"""POST /v1/score: CLIPScore of uploaded images for a prompt, RefCLIPScore with references."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.errors import InvalidInputError
from cliplens.server.service import service_of
from cliplens.server.uploads import read_images

router = APIRouter(prefix="/v1", tags=["score"])


class ScoreOut(BaseModel):
    name: str
    cosine: float
    clip_score: float
    ref_clip_score: float | None = None


class ScoreListOut(BaseModel):
    prompt: str
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
) -> ScoreListOut:
    """CLIPScore = 2.5 * max(cos, 0) per image (Hessel et al. 2021); with references, the
    harmonic mean with the best reference similarity. `best` is the top-ranked image."""
    from cliplens.tasks.score import clip_score, cosine, ref_clip_score

    svc = service_of(request)
    if not prompt.strip():
        raise InvalidInputError("prompt is blank; send the text the images should show")
    names, pics = await read_images(svc, images)

    def work():
        img = svc.ref.encode_images(pics)
        txt = svc.ref.encode_texts([prompt])
        refs = svc.ref.encode_texts(references) if references else None
        return img, txt, refs

    img, txt, refs = await svc.run(work)
    cos, clip = cosine(img, txt[0]), clip_score(img, txt[0])
    refscore = ref_clip_score(img, txt[0], [refs] * len(img))[1] if refs is not None else None
    out = [ScoreOut(name=n, cosine=round(float(c), 6), clip_score=round(float(s), 6),
                    ref_clip_score=None if refscore is None else round(float(refscore[i]), 6))
           for i, (n, c, s) in enumerate(zip(names, cos, clip, strict=True))]  # fmt: skip
    return ScoreListOut(prompt=prompt, scores=out, mean_clip_score=round(float(clip.mean()), 6),
                        best=names[int(cos.argmax())])  # fmt: skip
