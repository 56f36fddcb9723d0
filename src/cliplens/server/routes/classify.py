"""POST /v1/classify: zero-shot classification of uploaded images among labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel

from cliplens.server.service import service_of
from cliplens.server.uploads import read_images
from cliplens.tasks.classify import TEMPLATE_SETS, parse_labels
from cliplens.tasks.classify import classify as run_classify

router = APIRouter(prefix="/v1", tags=["classify"])


class LabelScore(BaseModel):
    label: str
    score: float


class ImageLabels(BaseModel):
    name: str
    labels: list[LabelScore]


class ClassifyOut(BaseModel):
    predictions: list[ImageLabels]
    multi_label: bool
    threshold: float | None


@router.post("/classify", response_model=ClassifyOut)
async def classify(
    request: Request,
    images: Annotated[list[UploadFile], File(description="Images to classify.")],
    labels: Annotated[str, Form(description="Comma-separated labels.")],
    templates: Annotated[
        str,
        Form(description="'default', 'imagenet', 'photo', 'none', or templates joined by '|'."),
    ] = "default",
    top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
    multi_label: Annotated[bool, Form()] = False,
) -> ClassifyOut:
    svc = service_of(request)
    names, pics = await read_images(svc, images)
    label_list = parse_labels(labels)
    # a set name or literal templates: never a file on the server
    spec = templates if templates in TEMPLATE_SETS else templates.split("|")
    options = {"top_k": top_k, "multi_label": multi_label}
    result = await svc.run(lambda: run_classify(svc.ref, pics, label_list, spec, **options))
    out = [
        ImageLabels(name=n, labels=[LabelScore(label=lb, score=sc) for lb, sc in p.labels])
        for n, p in zip(names, result.predictions, strict=True)
    ]
    return ClassifyOut(predictions=out, multi_label=result.multi_label, threshold=result.threshold)
