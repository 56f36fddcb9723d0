"""`cliplens serve`: the HTTP API and the web page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_MEGAPIXELS,
    DbOpt,
    DeviceOpt,
    EngineOpt,
    FiniteFloat,
    ModelOpt,
    PrecisionOpt,
    library_names,
)
from cliplens.cli.output import info, warn
from cliplens.errors import DependencyMissingError

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

_POSITIVE = FiniteFloat(0, None, min_open=True)  # finite and > 0

# the ServerSettings field that this command names otherwise
library_names("serve", timeout_s="--timeout")


def serve_command(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; loopback unless you mean otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535)] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="CLIPLENS_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' on every route but health.",
        ),
    ] = None,
    captioner: Annotated[
        Path | None, typer.Option("--captioner", help="A captioner folder: enables /v1/caption.")
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="Moderation policy: 'default' or a YAML file.")
    ] = "default",
    quality_probe: Annotated[
        Path | None, typer.Option("--quality-probe", help="A distortion probe for /v1/quality.")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", click_type=_POSITIVE)] = 20.0,
    max_megapixels: Annotated[
        float,
        typer.Option("--max-megapixels", click_type=FiniteFloat(0, MAX_MEGAPIXELS, min_open=True)),
    ] = 40.0,
    timeout: Annotated[
        float,
        typer.Option("--timeout", click_type=_POSITIVE, help="Seconds a request may wait and run."),
    ] = 60.0,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Allow browser calls from this origin (repeatable)."),
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Search a 'cliplens build-index' folder, not the catalog."),
    ] = None,
    clip_retrieval: Annotated[
        bool,
        typer.Option(
            "--clip-retrieval",
            help="Also answer clip-retrieval's API (/knn-service...), for ClipClient and "
            "clip-front; those routes take no token.",
        ),
    ] = False,
    allow_url_fetch: Annotated[
        bool,
        typer.Option(
            "--allow-url-fetch",
            help="Let clip-retrieval's image_url make the server fetch an image (public "
            "addresses only).",
        ),
    ] = False,
    clip_retrieval_aesthetic: Annotated[
        bool,
        typer.Option(
            "--clip-retrieval-aesthetic",
            help="Mix clip-retrieval's aesthetic_score into queries as a prompt term (off: "
            "measured not to help on the offline model).",
        ),
    ] = False,
    model: ModelOpt = None,
    db: DbOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Serve the JSON API under /v1 (schema at /openapi.json, docs at /docs) and the search
    page at /. Search reads the catalog, or a build-index folder with --index. It refuses
    to start where it could not work (an empty --token, an unreadable catalog, a port in
    use), and it closes connections whose request stalls."""
    try:
        from cliplens.server import ServerSettings, create_app
        from cliplens.server.listen import bind, serve
    except ImportError as e:
        raise DependencyMissingError(
            f"the server needs its extra ({e}); pip install 'cliplens[server]'"
        ) from e
    settings = ServerSettings(
        model=model,
        db=db,
        index=index,
        token=token,
        captioner=captioner,
        policy=policy,
        quality_probe=quality_probe,
        max_upload_mb=max_upload_mb,
        max_megapixels=max_megapixels,
        timeout_s=timeout,
        cors_origins=tuple(cors_origin or ()),
        device=device,
        precision=precision,
        clip_retrieval=clip_retrieval,
        allow_url_fetch=allow_url_fetch,
        clip_retrieval_aesthetic=clip_retrieval_aesthetic,
    )
    if clip_retrieval and token is not None:
        warn(
            "--clip-retrieval: its routes take no token (its clients cannot send one); "
            "anyone who can reach the server can search the photos and see thumbnails there"
        )
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        exposed = "anyone who can reach it can search your photos"
        warn(f"serving on {host} without --token: {exposed}")
    # reads the policy, captioner and probe, and the catalog once: a bad one stops here
    app = create_app(settings)
    if index is not None:
        app.state.service.model_id()  # the index's model, not another
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    info(f"cliplens on http://{shown}:{port}/ (API docs at /docs); Ctrl+C stops it")
    serve(app, settings, sock)
