"""Options shared by commands, bounds for every number a user can pass, checks of output
paths before any work starts, and turning PATHS arguments into image files."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core

# typer >= 0.26 parses with its own copy of click: its types raise the usage errors that
# cli/main.py turns into exit 2 (click's own FloatRange would raise another class)
from typer._click.types import FloatRange

from cliplens.errors import ImageError, ImageNotFoundError, InvalidInputError
from cliplens.limits import MAX_EPOCHS, MAX_LR, MAX_MINUTES, MAX_SEED
from cliplens.settings import DEFAULT_MODEL

if TYPE_CHECKING:
    from cliplens.models.encoder import Encoder
    from cliplens.tasks.embed import Embedded

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

# ------------------------------------------------------------------ number bounds

MAX_BATCH = 4096  # images or captions per batch
MAX_TOP_K = 1000  # labels, classes or results shown per image
MAX_MEGAPIXELS = 1000.0  # a decoded image of 1000 MP already takes 3 GB
MAX_COUNT = 1_000_000_000  # counts that the data bounds anyway (results kept, files...)

# Library messages name parameters as `name` (errors.name_params); the CLI shows the
# running command's flag of that name. Where a library parameter has another name than the
# command's option, the command lists it here: {"serve": {"timeout_s": "--timeout"}}.
PARAM_FLAGS: dict[str, dict[str, str]] = {}


def library_names(command: str, **flags: str) -> None:
    """Register how `command` (e.g. "quality train") shows library parameters."""
    PARAM_FLAGS.setdefault(command, {}).update(flags)


class FiniteFloat(FloatRange):
    """A float in a range that is also finite: click's FloatRange lets nan through (every
    comparison with nan is false) and, without a bound, inf too."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = value if isinstance(value, float) else None
        if number is None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; give one in {self._range()}", param, ctx)
        return super().convert(number, param, ctx)

    def _range(self) -> str:
        return self._describe_range() if (self.min, self.max) != (None, None) else "-inf<x<inf"


SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed of the random draws.")
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, max=MAX_EPOCHS)]
LrOpt = Annotated[
    float,
    typer.Option("--lr", help="Learning rate.", click_type=FiniteFloat(0, MAX_LR, min_open=True)),
]
MaxMinutesOpt = Annotated[
    float | None,
    typer.Option(
        "--max-minutes",
        help="Stop (checkpoint and save) after this long.",
        click_type=FiniteFloat(0, MAX_MINUTES, min_open=True),
    ),
]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model name: offline, ARCH:TAG, hf-hub:ORG/NAME, local:PATH, "
        "transformers:ORG/NAME, multilingual:NAME (see cliplens models).",
        envvar="CLIPLENS_MODEL",
        show_default=DEFAULT_MODEL,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best available).")
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="fp32, bf16, fp16, or int8 (OpenVINO; a checked, quantised network) "
        "(default: fastest safe one).",
    ),
]


def _set_engine(value: str | None) -> str | None:
    """The engine for this run, as CLIPLENS_ENGINE (ModelRef's default, and what child
    processes inherit); checked here so a typo is a usage error."""
    if value is None:
        return None
    from cliplens.models.openvino import parse_engine  # torch-free

    try:
        engine = parse_engine(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    os.environ["CLIPLENS_ENGINE"] = engine.value
    return engine.value


EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="auto, torch or openvino: what runs the image tower on CPU (auto: OpenVINO "
        "where installed and measured faster).",
        envvar="CLIPLENS_ENGINE",
        callback=_set_engine,
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", help="Images per batch.", min=1, max=MAX_BATCH),
]
BatchSizeOpt = Annotated[  # BatchOpt with a default of the command's own
    int,
    typer.Option(
        "--batch-size", "-b", help="Images per batch (pairs, in training).", min=1, max=MAX_BATCH
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Leave out files and folders matching this gitignore pattern, e.g. "
        "'node_modules/' or '*.tmp' (repeatable; .cliplensignore files apply too).",
    ),
]
MegapixelsOpt = Annotated[
    float | None,
    typer.Option(
        "--max-megapixels",
        help="Skip images larger than this (decompression-bomb guard).",
        click_type=FiniteFloat(0, MAX_MEGAPIXELS, min_open=True),
    ),
]

# ------------------------------------------------------------------ input images


def collect_images(
    paths: list[Path], exclude: list[str] | None = None
) -> tuple[list[Path], list[ImageError]]:
    """Files as given and image files under folders, less what `exclude` (gitignore
    patterns) and `.cliplensignore` files leave out; a missing path, a symlink loop or an
    unreadable path is a failure of that path (`iter_image_files` raises ImageNotFoundError
    for it), not of the run."""
    from cliplens.exclusions import exclusions
    from cliplens.images import iter_image_files

    rules = exclusions(exclude)
    files: dict[Path, None] = {}  # ordered, each file once
    missing: list[ImageError] = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            missing.append(ImageNotFoundError(str(path), "no such file or folder"))
            continue
        try:
            found = list(iter_image_files([path], exclude=rules))
        except ImageError as e:
            missing.append(e)
            continue
        files.update(dict.fromkeys(found))
    return list(files), missing


def no_images(paths: list[Path]) -> InvalidInputError:
    """The error of a run given paths that hold no image at all (empty folders, or files
    of other kinds), naming them."""
    shown = ", ".join(map(str, paths[:3])) + (
        f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    )
    return InvalidInputError(
        f"no images under {shown or 'the paths given'} (extensions: jpg, png, webp, heic, "
        "dng, ...); give image files or folders that hold them"
    )


# ------------------------------------------------------------------ output paths


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (a link counts, broken or not)."""
    p = path.absolute()
    while not (p.exists() or p.is_symlink()) and p.parent != p:
        p = p.parent
    return p


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be created in `folder`, or None: os.access, then a real attempt (for
    root os.access says yes whatever the mode, and some places refuse only when tried)."""
    import tempfile  # here, not at the top: every `cliplens` run imports this module

    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        Path(tempfile.mkdtemp(prefix=".cliplens-write-check-", dir=folder)).rmdir()
    except OSError as e:
        return (e.strerror or type(e).__name__).lower()
    return None


def _folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (made into) a folder we write in, or None."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link"
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        anchor = path
    else:
        anchor = _nearest_existing(path)
        if not anchor.is_dir():
            return f"{anchor} is a file, so no folder can be made inside it"
    reason = _unwritable(anchor)
    return f"cannot write in {anchor} ({reason})" if reason else None


def out_folder(path: Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be made or written: an existing
    file, a path under a file, a broken link, a read-only place. Nothing is created."""
    problem = _folder_problem(path)
    if problem:
        raise InvalidInputError(
            f"{what} {path}: {problem}; give a folder you can write to (made if missing)"
        )


def out_file(path: Path, what: str, suffixes: Collection[str] = ()) -> None:
    """Refuse, before any work, an output file that cannot be written: an existing folder, a
    name without one of `suffixes`, a parent that cannot be made or written."""
    if path.is_dir():
        example = path / f"out{next(iter(suffixes), '')}"
        raise InvalidInputError(f"{what} {path} is a folder; give a file name such as {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        *most, last = suffixes
        names = f"{', '.join(most)} or {last}" if most else last
        raise InvalidInputError(f"{what} {path}: name a {names} file")
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{what} {path} cannot be overwritten (permission denied)")
    problem = _folder_problem(path.parent)
    if problem:
        raise InvalidInputError(
            f"{what} {path}: {problem}; give a file in a folder you can write to"
        )


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
    from cliplens.catalog.db import Catalog, default_db_path

    path = db or default_db_path()
    return Catalog(path, readonly=True) if path.exists() else None


def embed_paths(
    model: Encoder,
    files: Sequence[Path],
    db: Path | None,
    max_megapixels: float | None = None,
    features: bool = False,
) -> Embedded:
    """Embed files, taking unchanged ones from the catalog (--db, or the default one when it
    exists) so a folder already indexed is not encoded again."""
    from cliplens.cli.output import show_progress
    from cliplens.tasks.embed import embed_files

    return embed_files(
        model,
        files,
        read_catalog(db),
        progress=show_progress(),
        max_megapixels=max_megapixels,
        features=features,
    )


def new_app(**kwargs: Any) -> typer.Typer:
    """A command group whose help texts are read as Markdown (backticks are code): Rich's
    own markup would take a bracketed part of a help text (`[tiny-shapes]`) for a style
    and drop it, and keep a docstring's line breaks in the list of commands."""
    return typer.Typer(rich_markup_mode="markdown", **kwargs)


class DefaultCommandGroup(typer.core.TyperGroup):
    """A command group whose first command runs when no subcommand is named:
    `cliplens moderate PHOTOS` is `cliplens moderate check PHOTOS`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)
