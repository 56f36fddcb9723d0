"""`cliplens datasets`: write small datasets to folders.

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import SeedOpt, new_app, out_folder
from cliplens.cli.output import info
from cliplens.limits import DISTORTION_LEVELS, MAX_SHAPE_SIZE, MIN_SHAPE_SIZE

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

MAX_SHAPES = 10_000_000  # images
LEVELS = f"{DISTORTION_LEVELS[0]}-{DISTORTION_LEVELS[-1]}"

app = new_app(help="Write small datasets for demos, tests and docs.", no_args_is_help=True)


@app.command("photos")
def photos(out_dir: Annotated[Path, typer.Argument(help="Folder to write into.")]) -> None:
    """Real photos shipped by scikit-image (a cat, coffee, a rocket...), as image files."""
    from cliplens.datasets.photos import write_photos

    out_folder(out_dir, "folder")
    paths = write_photos(out_dir)
    info(f"wrote {len(paths)} photos to {out_dir}")


@app.command("distortions")
def distortions(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into (one subfolder per type).")],
    levels: Annotated[
        str, typer.Option("--levels", help=f"Severities {LEVELS}, comma-separated.")
    ] = "3",
) -> None:
    """The demo photos' tiles under each distortion type: data for 'cliplens quality train'."""
    import tempfile

    from cliplens.datasets.distorted import write_distortions
    from cliplens.datasets.photos import write_photos
    from cliplens.errors import InvalidInputError

    try:
        chosen = tuple(int(x) for x in levels.split(","))
    except ValueError:
        raise InvalidInputError(f"--levels {levels}: write numbers {LEVELS}, e.g. 2,4") from None
    bad = [x for x in chosen if x not in DISTORTION_LEVELS]
    # here, though write_distortions checks them too: before the photos are written, and
    # in the words of the command line
    if bad:
        raise InvalidInputError(f"--levels {levels}: distortion level {bad[0]} must be {LEVELS}")
    out_folder(out_dir, "folder")
    with tempfile.TemporaryDirectory() as tmp:
        written = write_distortions(out_dir, write_photos(tmp), levels=chosen)
    info(f"wrote {sum(map(len, written.values()))} images in {len(written)} folders to {out_dir}")


@app.command("shapes")
def shapes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into.")],
    n: Annotated[
        int,
        typer.Option("--n", help="Training-split images (5% become val).", min=1, max=MAX_SHAPES),
    ] = 20000,
    seed: SeedOpt = 0,
    size: Annotated[
        int,
        typer.Option(
            "--size", help="Image side in pixels.", min=MIN_SHAPE_SIZE, max=MAX_SHAPE_SIZE
        ),
    ] = 64,
) -> None:
    """Captioned coloured shapes, with a held-out split of unseen (shape, colour) pairs."""
    from cliplens.cli.output import show_progress
    from cliplens.datasets.shapes import write_shapes

    out_folder(out_dir, "folder")
    counts = write_shapes(out_dir, n=n, seed=seed, size=size, progress=show_progress())
    info(f"wrote {', '.join(f'{v} {k}' for k, v in counts.items())} images to {out_dir}")


@app.command("fashion-mnist")
def fashion_mnist(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to write into (one subfolder per class).")
    ],
    split: Annotated[str, typer.Option("--split", help="train or test.")] = "test",
    per_class: Annotated[
        int | None,
        typer.Option("--per-class", help="Images per class (default: all).", min=1, max=10_000),
    ] = None,
    offset: Annotated[
        int, typer.Option("--offset", help="Skip this many per class first.", min=0, max=10_000)
    ] = 0,
    source: Annotated[
        Path | None, typer.Option("--source", help="Folder with the idx .gz files.")
    ] = None,
) -> None:
    """Fashion-MNIST from Debian's dataset-fashion-mnist, one folder of PNGs per class."""
    from cliplens.cli.output import show_progress
    from cliplens.datasets.fashion_mnist import write_fashion_mnist

    out_folder(out_dir, "folder")
    counts = write_fashion_mnist(out_dir, split, per_class, offset, source, show_progress())
    info(f"wrote {sum(counts.values())} images in {len(counts)} class folders to {out_dir}")
