"""clip-retrieval's back-end API (`serve --clip-retrieval`, server/routes/clip_retrieval.py).

With its own client: `ClipClient` from the clip-retrieval package (installed without its
dependencies; the module file is loaded by itself, since the package's `__init__` imports
its whole back end), unmodified, against a real server on loopback, with the offline
model over scikit-image's photos. In-process: the shapes, the options, the errors, and
the deduplication against clip-retrieval's own code, run from its installed source."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import importlib.util
import io
import json
import shutil
import textwrap
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from cliplens.server.routes.clip_retrieval import first_of_each_group
from tests_helpers import calm_policy, live_server

TOKEN = "s3cret"


def clip_retrieval_file(name: str) -> Path:
    path = importlib.metadata.distribution("clip-retrieval").locate_file(f"clip_retrieval/{name}")
    return Path(str(path))


def clip_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "clip_client", clip_retrieval_file("clip_client.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos) -> Path:
    """The photos, and an exact copy of the cat (a near-duplicate for `deduplicate`)."""
    folder = tmp_path_factory.mktemp("library")
    for p in photos.iterdir():
        shutil.copy(p, folder / p.name)
    shutil.copy(photos / "cat.jpg", folder / "cat-copy.jpg")
    return folder


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, library) -> Path:
    db = tmp_path_factory.mktemp("clip-retrieval") / "photos.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef("offline"), [library], workers=0)
    return db


@pytest.fixture(scope="module")
def settings(catalog) -> ServerSettings:
    return ServerSettings(model="offline", db=catalog, clip_retrieval=True)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def knn(client, **fields):
    body = {"modality": "image", "num_images": 10, "indice_name": "photos"} | fields
    # as clip-front sends it: JSON in a text/plain body
    return client.post(
        "/knn-service", content=json.dumps(body), headers={"Content-Type": "text/plain"}
    )


def names(rows) -> list[str]:
    return [Path(r["image_path"]).name for r in rows if "image_path" in r]


def test_clip_client_searches_by_text_image_and_embedding(settings, library, offline, tmp_path):
    """ClipClient, unmodified, over a real server with a token (which its routes do not
    take): with all its defaults (deduplicate, safety model, violence detector, aesthetic
    score 9 at weight 0.5), and with its filters off."""
    module = clip_client()
    app = create_app(replace(settings, token=TOKEN))
    with live_server(app, settings) as port:
        url = f"http://127.0.0.1:{port}/knn-service"
        defaults = module.ClipClient(url=url, indice_name="photos")
        assert defaults.deduplicate and defaults.use_safety_model and defaults.aesthetic_score == 9
        # the default policy was set for ViT-B/32 and flags most of these photos under the
        # offline model (calm_policy says which): the answer is a shorter list, not an error
        answered = defaults.query(text="a photo of a cat")
        assert isinstance(answered, list) and len(answered) < 8
        assert all(set(row) >= {"id", "similarity"} for row in answered)

        client = module.ClipClient(
            url=url,
            indice_name="photos",
            deduplicate=False,
            use_safety_model=False,
            use_violence_detector=False,
        )
        by_text = client.query(text="a photo of a cat")
        assert names(by_text)[:2] in (["cat.jpg", "cat-copy.jpg"], ["cat-copy.jpg", "cat.jpg"])
        first = by_text[0]
        assert set(first) == {"id", "similarity", "image_path", "image"}  # no url: a token
        thumb = Image.open(io.BytesIO(base64.b64decode(first["image"])))
        assert thumb.format == "JPEG" and max(thumb.size) == 384
        sims = [r["similarity"] for r in by_text]
        assert sims == sorted(sims, reverse=True)

        by_image = client.query(image=str(library / "rocket.jpg"))
        assert names(by_image)[0] == "rocket.jpg"
        assert by_image[0]["similarity"] >= 0.999

        vector = offline.encode_texts(["a photo of a cat"])[0]
        by_vector = client.query(embedding_input=vector.tolist())
        assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]

        # the token still guards cliplens's own routes; the clip-retrieval ones take none
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/v1/search?q=cat", timeout=30).status_code == 401
        assert requests.get(f"{base}/indices-list", timeout=30).json() == ["photos"]

    # with a calm policy, the defaults answer every photo but the cat's copy
    calm = create_app(replace(settings, policy=str(calm_policy(tmp_path))))
    with live_server(calm, settings) as port:
        url = f"http://127.0.0.1:{port}/knn-service"
        rows = module.ClipClient(url=url, indice_name="photos").query(text="a photo of a cat")
        assert len(rows) == 7 and names(rows)[0] in ("cat.jpg", "cat-copy.jpg")
        assert "url" in rows[0]  # no token: the photo's URL, which serves it
        assert requests.get(rows[0]["url"], timeout=30).status_code == 200


def test_results_have_metadata_for_the_first_num_images_only(client):
    r = knn(client, text="a rocket", num_images=3, num_result_ids=8)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 8
    assert all({"image_path", "image", "url"} <= set(row) for row in rows[:3])
    assert all(set(row) == {"id", "similarity"} for row in rows[3:])
    assert rows[0]["url"].endswith(f"/v1/images/{rows[0]['id']}")
    assert client.get(rows[0]["url"]).status_code == 200  # no token: the URL serves the photo


def test_rows_past_the_thumbnail_limit_carry_paths_only(client, monkeypatch):
    from cliplens.server.routes import clip_retrieval

    monkeypatch.setattr(clip_retrieval, "MAX_THUMBS", 2)  # clip-front's download asks 10,000
    rows = knn(client, text="a rocket", num_images=10_000, num_result_ids=10_000).json()
    assert len(rows) == 8  # every photo
    assert all("image" in row for row in rows[:2])
    assert all(set(row) == {"id", "similarity", "image_path", "url"} for row in rows[2:])


def test_metadata_by_id_as_knn_gives_it(client):
    rows = knn(client, text="a rocket", num_images=1, num_result_ids=5).json()
    ids = [row["id"] for row in rows]
    r = client.post(
        "/metadata", content=json.dumps({"ids": [*ids, 10**9], "indice_name": "photos"})
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["id"] for g in got] == ids  # an unknown id is left out
    assert got[0]["metadata"]["image_path"] == rows[0]["image_path"]
    assert got[0]["metadata"]["image"] == rows[0]["image"]


def test_deduplicate_keeps_the_best_of_each_group(client):
    plain = names(knn(client, text="a photo of a cat", num_images=9).json())
    assert {"cat.jpg", "cat-copy.jpg"} <= set(plain)
    deduped = names(knn(client, text="a photo of a cat", num_images=9, deduplicate=True).json())
    assert len(deduped) == len(plain) - 1
    assert deduped == [
        n for n in plain if n != plain[max(plain.index("cat.jpg"), plain.index("cat-copy.jpg"))]
    ]


def reference_dedup() -> object:
    """clip-retrieval's own `get_non_uniques` and `connected_components`, taken from its
    installed clip_back.py (which cannot be imported without its whole back end)."""
    import faiss

    tree = ast.parse(clip_retrieval_file("clip_back.py").read_text())
    knn_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KnnService")
    wanted = {"get_non_uniques", "connected_components"}
    methods = [n for n in knn_class.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {m.name for m in methods} == wanted
    source = "class Reference:\n" + textwrap.indent(
        "\n".join(ast.unparse(m) for m in methods), "    "
    )
    namespace = {"faiss": faiss, "np": np, "defaultdict": defaultdict}
    exec(compile(source, "clip_back.py", "exec"), namespace)
    return namespace["Reference"]()


@pytest.mark.parametrize("seed", range(6))
def test_deduplication_removes_what_clip_retrieval_removes(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 32))
    rows = centres[rng.integers(0, 12, 300)] + rng.normal(scale=0.12 + 0.02 * seed, size=(300, 32))
    vectors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    removed = set(reference_dedup().get_non_uniques(vectors))
    assert 0 < len(removed) < 300
    ours = first_of_each_group(vectors, 0.94, block=64)
    assert {i for i in range(300) if not ours[i]} == removed


def policy_file(tmp_path, offline, library) -> Path:
    """A policy for which the cat is violent and the rocket is unsafe: thresholds half
    way between each photo's cosine to its concept and the next photo's."""
    vectors = {
        p.name: v
        for p, v in zip(
            sorted(library.iterdir()), offline.encode_images(sorted(library.iterdir())), strict=True
        )
    }
    lines = ["name: test", "categories:"]
    for category, photo, text in [
        ("violence", "cat.jpg", "a cat"),
        ("sexual", "rocket.jpg", "a rocket"),
    ]:
        concept = offline.encode_texts([text])[0]
        scores = sorted(((float(v @ concept), n) for n, v in vectors.items()), reverse=True)
        top = [s for s, n in scores if n.startswith(photo.split(".")[0])][-1]
        rest = max(s for s, n in scores if not n.startswith(photo.split(".")[0]))
        assert top > rest
        lines += [
            f"  {category}:",
            f"    - text: {text}",
            f"      threshold: {(top + rest) / 2:.4f}",
        ]
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_safety_and_violence_flags_drop_what_the_policy_flags(settings, tmp_path, offline, library):
    policy = policy_file(tmp_path, offline, library)
    with TestClient(create_app(replace(settings, policy=str(policy)))) as c:

        def found(**flags) -> set[str]:
            return set(names(knn(c, text="a photo", num_images=10, **flags).json()))

        everything = found()
        assert {"cat.jpg", "cat-copy.jpg", "rocket.jpg"} <= everything
        assert found(use_violence_detector=True) == everything - {"cat.jpg", "cat-copy.jpg"}
        assert found(use_safety_model=True) == everything - {"rocket.jpg"}
        both = found(use_violence_detector=True, use_safety_model=True)
        assert both == everything - {"cat.jpg", "cat-copy.jpg", "rocket.jpg"}


def test_the_aesthetic_pair_changes_nothing_unless_the_server_mixes_it(client, settings, offline):
    from cliplens.server.routes.clip_retrieval import AESTHETIC_PROMPTS

    text = "a photo of a coffee cup"
    plain = knn(client, text=text, num_images=10).json()
    asked = knn(client, text=text, num_images=10, aesthetic_score=9, aesthetic_weight=0.5).json()
    assert asked == plain
    with TestClient(create_app(replace(settings, clip_retrieval_aesthetic=True))) as c:
        mixed = knn(c, text=text, num_images=10, aesthetic_score=9, aesthetic_weight=0.5).json()
        # clip-front's blank fields are no aesthetic term at all
        blank = knn(c, text=text, num_images=10, aesthetic_score="", aesthetic_weight="").json()
    assert [r["similarity"] for r in blank] == [r["similarity"] for r in plain]
    assert [r["similarity"] for r in mixed] != [r["similarity"] for r in plain]
    q = offline.encode_texts([text])[0]
    best = offline.encode_texts(AESTHETIC_PROMPTS["best"]).mean(0)
    want = q + 0.5 * best / np.linalg.norm(best)
    want /= np.linalg.norm(want)
    assert set(names(mixed)) == set(names(plain))  # the same photos, in another order
    for row in mixed[:3]:
        photo = offline.encode_images([Path(row["image_path"])])[0]
        assert row["similarity"] == pytest.approx(float(photo @ want), abs=2e-3)


@pytest.mark.parametrize(
    ("fields", "status", "kind", "words"),
    [
        ({"modality": "text", "text": "a cat"}, 400, "invalid_input", "modality 'text'"),
        ({}, 400, "invalid_input", "exactly one of"),
        ({"text": "a cat", "embedding_input": [0.1] * 384}, 400, "invalid_input", "exactly one of"),
        ({"image": "not base64!"}, 400, "invalid_input", "not base64"),
        ({"image": base64.b64encode(b"hello").decode()}, 415, "not_an_image", "image"),
        ({"embedding_input": [0.1, 0.2]}, 400, "invalid_input", "give 384 finite numbers"),
        ({"embedding_input": [0.0] * 384}, 400, "invalid_input", "not all zero"),
        ({"text": "a cat", "indice_name": "laion5B"}, 404, "unknown_index", "'photos'"),
        ({"text": "a cat", "num_images": 0}, 422, "invalid_request", "num_images"),
        ({"text": "a cat", "aesthetic_score": 12}, 422, "invalid_request", "aesthetic_score"),
        (
            {"image_url": "http://127.0.0.1:9/cat.jpg"},
            403,
            "url_fetch_disabled",
            "--allow-url-fetch",
        ),
    ],
)
def test_bad_requests_get_one_line_errors(client, fields, status, kind, words):
    body = {"modality": "image", "num_images": 10, "indice_name": "photos"} | fields
    r = client.post("/knn-service", content=json.dumps(body))
    assert r.status_code == status, r.text
    assert r.json()["error"] == kind and words in r.json()["detail"], r.json()


def test_a_body_that_is_not_json_is_refused(client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = client.post("/knn-service", content=raw)
        assert r.status_code == 400 and r.json()["error"] == "invalid_input", r.text


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/cat.jpg", "not a public address"),
        ("http://localhost:9/cat.jpg", "not a public address"),
        ("http://10.0.0.1/cat.jpg", "not a public address"),
        ("http://169.254.169.254/latest/meta-data/", "not a public address"),
        ("http://[::1]:9/cat.jpg", "not a public address"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_an_image_url_to_the_servers_own_network_is_refused(settings, url, why):
    """Fetching allowed: an address of the server's own network is still never fetched
    (refused before any connection; redirects: tests/unit/test_fetch.py)."""
    with TestClient(create_app(replace(settings, allow_url_fetch=True))) as c:
        r = knn(c, image_url=url)
        assert r.status_code == 400 and why in r.json()["detail"], r.text


def test_the_routes_exist_only_when_asked_for_and_allow_the_fronts_origin(settings):
    with TestClient(create_app(replace(settings, clip_retrieval=False))) as c:
        assert c.get("/indices-list").status_code == 404
    origin = "http://127.0.0.1:5173"
    with TestClient(create_app(replace(settings, cors_origins=(origin,)))) as c:
        r = c.get("/indices-list", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        r = knn(c, text="a cat")
        assert r.status_code == 200
