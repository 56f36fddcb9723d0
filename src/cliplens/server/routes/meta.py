"""GET /v1/health (no token needed) and GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from cliplens import __version__
from cliplens.searchable import SearchableKind
from cliplens.server.service import service_of

public = APIRouter(prefix="/v1", tags=["meta"])
router = APIRouter(prefix="/v1", tags=["meta"])


class Health(BaseModel):
    status: str
    version: str
    model: str
    model_loaded: bool
    catalog: bool  # the catalog file exists
    searches: SearchableKind  # what search reads: the catalog, or a build-index folder
    searchable: bool  # there is something to search
    auth: bool


@public.get("/health", response_model=Health)
def health(request: Request) -> Health:
    svc = service_of(request)
    return Health(
        status="ok",
        version=__version__,
        model=svc.ref.name,
        model_loaded=svc.ref.loaded,
        catalog=svc.db.exists(),
        searches=svc.searches,
        searchable=svc.searchable(),
        auth=svc.settings.token is not None,
    )


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
    """The model this server uses, and the models whose embeddings it searches (the
    catalog's, or the built index's one)."""
    svc = service_of(request)
    info = await svc.run(lambda: svc.ref.info)
    stored = [CatalogModel(model_id=m, dim=d, embeddings=n) for m, d, n in svc.stored_models()]
    return ModelsOut(
        model=svc.ref.name,
        model_id=info.model_id,
        dim=info.dim,
        catalog=stored,
        captioner=svc.settings.captioner is not None,
    )
