"""Options shared by commands, and turning PATHS arguments into image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import typer.core

from cliplens.errors import ImageError, ImageNotFoundError
from cliplens.settings import DEFAULT_MODEL

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model name: offline, ARCH:TAG, hf-hub:ORG/NAME, local:PATH.",
        envvar="CLIPLENS_MODEL",
        show_default=DEFAULT_MODEL,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best available).")
]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32, bf16 or fp16 (default: fastest safe one).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")]
MegapixelsOpt = Annotated[
    float | None,
    typer.Option(
        "--max-megapixels", help="Skip images larger than this (decompression-bomb guard)."
    ),
]


def collect_images(paths: list[Path]) -> tuple[list[Path], list[ImageError]]:
    """Files as given and image files under folders; a missing path is a failure, not fatal."""
    from cliplens.images import iter_image_files

    files: dict[Path, None] = {}  # ordered, each file once
    missing: list[ImageError] = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            missing.append(ImageNotFoundError(str(path), "no such file or folder"))
            continue
        files.update(dict.fromkeys(iter_image_files([path])))
    return list(files), missing


TemplatesOpt = Annotated[
    str,
    typer.Option(
        "--templates", help="Zero-shot prompt templates: default, imagenet, photo, none or a FILE."
    ),
]
DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db", help="Catalog file (default: CLIPLENS_HOME/catalog.db).", envvar="CLIPLENS_DB"
    ),
]


def read_catalog(db: Path | None):
    """The catalog to reuse embeddings from (--db, or the default one), if it exists."""
    from cliplens.store.catalog import Catalog, default_db_path

    path = db or default_db_path()
    return Catalog(path, readonly=True) if path.exists() else None


def embed_paths(model, files, db: Path | None, max_megapixels: float | None = None,
                features: bool = False):  # fmt: skip
    """Embed files, taking unchanged ones from the catalog (--db, or the default one when it
    exists) so a folder already indexed is not encoded again."""
    from cliplens.cli.output import show_progress
    from cliplens.tasks.embed import embed_files

    return embed_files(model, files, read_catalog(db), progress=show_progress(),
                       max_megapixels=max_megapixels, features=features)  # fmt: skip


def embed_labelled(ref, files, labels, db, max_megapixels, features):
    """(vectors, labels) of the files that could be read; the others are warned about."""
    from cliplens.cli.output import warn

    done = embed_paths(ref, files, db, max_megapixels, features=features)
    for failure in done.failures:
        warn(f"{failure} (skipped)")
    by_path = dict(zip([str(Path(f).resolve()) for f in files], labels, strict=True))
    return done.vectors, [by_path[p] for p in done.paths]


class DefaultCommandGroup(typer.core.TyperGroup):
    """A command group whose first command runs when no subcommand is named:
    `cliplens moderate PHOTOS` is `cliplens moderate check PHOTOS`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)
