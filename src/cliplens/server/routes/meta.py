"""GET /v1/health (no token needed) and GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from cliplens import __version__
from cliplens.server.app import service_of

public = APIRouter(prefix="/v1", tags=["meta"])
router = APIRouter(prefix="/v1", tags=["meta"])


class Health(BaseModel):
    status: str
    version: str
    model: str
    model_loaded: bool
    catalog: bool
    auth: bool


@public.get("/health", response_model=Health)
def health(request: Request) -> Health:
    svc = service_of(request)
    return Health(status="ok", version=__version__, model=svc.ref.name,
                  model_loaded=svc.ref.loaded, catalog=svc.db.exists(),
                  auth=svc.settings.token is not None)  # fmt: skip


class CatalogModel(BaseModel):
    model_id: str
    dim: int
    embeddings: int


class ModelsOut(BaseModel):
    model: str
    model_id: str
    dim: int
    catalog: list[CatalogModel]
    captioner: bool


@router.get("/models", response_model=ModelsOut)
async def models(request: Request) -> ModelsOut:
    """The model this server uses, and the models the catalog holds embeddings of."""
    svc = service_of(request)
    info = await svc.run(lambda: svc.ref.info)
    cat = svc.catalog()
    stored = [CatalogModel(model_id=m, dim=d, embeddings=n) for m, d, n in cat.models()] \
        if cat else []  # fmt: skip
    return ModelsOut(model=svc.ref.name, model_id=info.model_id, dim=info.dim, catalog=stored,
                     captioner=svc.settings.captioner is not None)  # fmt: skip
