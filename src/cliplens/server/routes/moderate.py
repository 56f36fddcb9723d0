"""POST /v1/moderate: flag uploaded images by similarity to the server's policy concepts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.moderate import build_moderator
from cliplens.tasks.moderate import moderate as judge_images
from cliplens.tasks.policy import load_policy

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
        moderator = svc.cached(
            "moderator", lambda: build_moderator(load_policy(svc.settings.policy), svc.ref)
        )
        return judge_images(pics, svc.ref, moderator=moderator, names=names).verdicts

    verdicts = await svc.run(work)
    return ModerateOut(policy=svc.settings.policy, verdicts=[_out(v.to_dict()) for v in verdicts])


def _out(verdict: dict) -> VerdictOut:
    """A verdict's dictionary (rounded as the CLI prints it), named by its upload."""
    return VerdictOut(name=verdict.pop("path"), **verdict)
