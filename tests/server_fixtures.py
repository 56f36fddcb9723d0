"""The catalog, settings and client that the server's test modules share (imported by
them as fixtures), and the helpers they check responses with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory, tiny_model_dir, photos) -> Path:
    db = tmp_path_factory.mktemp("server") / "catalog.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(f"local:{tiny_model_dir}"), [photos], workers=0)
    return db


@pytest.fixture(scope="module")
def settings(tiny_model_dir, catalog_db) -> ServerSettings:
    return ServerSettings(model=f"local:{tiny_model_dir}", db=catalog_db, precision="fp32")


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def app_with(settings: ServerSettings, **changes) -> TestClient:
    return TestClient(create_app(replace(settings, **changes)))


def error_of(response, status: int, kind: str) -> str:
    """The detail of an error response, checked to have this status and kind."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == kind, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


def upload(path: Path, field: str = "images"):
    return (field, (path.name, path.read_bytes(), "image/jpeg"))
