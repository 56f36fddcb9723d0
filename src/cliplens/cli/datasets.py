"""`cliplens datasets`: write small datasets to folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.output import info

app = typer.Typer(help="Write small datasets for demos, tests and docs.", no_args_is_help=True)


@app.command("photos")
def photos(out_dir: Annotated[Path, typer.Argument(help="Folder to write into.")]) -> None:
    """Real photos shipped by scikit-image (a cat, coffee, a rocket...), as image files."""
    from cliplens.datasets.photos import write_photos

    paths = write_photos(out_dir)
    info(f"wrote {len(paths)} photos to {out_dir}")
