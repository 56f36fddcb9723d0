"""POST /v1/moderate: flag uploaded images by similarity to the server's policy concepts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images

router = APIRouter(prefix="/v1", tags=["moderate"])


class VerdictOut(BaseModel):
    name: str
    flagged: bool
    category: str
    concept: str
    score: float
    threshold: float
    margin: float
    special_care: str | None = None
    head_probability: float | None = None


class ModerateOut(BaseModel):
    policy: str
    verdicts: list[VerdictOut]


@router.post("/moderate", response_model=ModerateOut)
async def moderate(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Images to check.")],
) -> ModerateOut:
    """Judge images against the policy the server was started with (--policy)."""
    svc = service_of(request)
    names, pics = await read_images(svc, images)

    def work():
        from cliplens.tasks.moderate import build_moderator
        from cliplens.tasks.policy import load_policy

        moderator = svc.cached("moderator", lambda: build_moderator(
            load_policy(svc.settings.policy), svc.ref))  # fmt: skip
        return moderator.judge(names, svc.ref.encode_images(pics))

    verdicts = await svc.run(work)
    out = []
    for v in verdicts:
        d = v.to_dict()
        d["name"] = d.pop("path")
        out.append(VerdictOut(**d))
    return ModerateOut(policy=svc.settings.policy, verdicts=out)
