"""`cliplens models`: which models exist, which are cached, and what each one is."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import typer

from cliplens.cli.common import new_app
from cliplens.cli.output import Format, print_csv, print_json, print_table

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

app = new_app(help="List models and show their details.", invoke_without_command=True)

FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]


class SortKey(str, enum.Enum):
    imagenet = "imagenet"
    params = "params"
    name = "name"


# the listing's columns: a ModelEntry field each, and its heading in a table
_COLUMNS = {
    "name": "name",
    "resolution": "px",
    "params_m": "params (M)",
    "imagenet_pct": "ImageNet %",
    "average_pct": "avg %",
}


def _cell(value: Any) -> str:
    """A figure as a table shows it: one decimal (JSON keeps the table's precision)."""
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


@app.callback()
def list_models(
    ctx: typer.Context,
    cached: Annotated[
        bool, typer.Option("--cached", help="Only models ready to use offline.")
    ] = False,
    search: Annotated[
        str | None,
        typer.Option("--search", metavar="TEXT", help="Only names holding TEXT (any case)."),
    ] = None,
    sort: Annotated[
        SortKey | None,
        typer.Option(
            "--sort",
            help="imagenet: best zero-shot ImageNet first; params: smallest first; "
            "name: A to Z (default: open_clip's order).",
        ),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """List known model names (offline, and every open_clip ARCH:TAG) with their input
    size, parameters and open_clip's zero-shot figures, marking what is cached."""
    if ctx.invoked_subcommand is not None:
        return
    from cliplens.models.zoo import FIGURES_NOTE, FIGURES_SOURCE, known_models
    from cliplens.settings import get_settings

    entries = known_models(search, cached_only=cached, sort=sort.value if sort else None)
    if fmt is Format.json:
        print_json([e.to_dict() for e in entries])
        return
    if fmt is Format.csv:
        header = list(entries[0].to_dict()) if entries else ["name"]
        print_csv(header, [list(e.to_dict().values()) for e in entries])
        return
    rows = [
        [_cell(getattr(e, field)) for field in _COLUMNS]
        + ["yes" if e.cached else "", "default" if e.default else ""]
        for e in entries
    ]
    title = f"{len(entries)} models; cache: {get_settings().model_cache}"
    print_table([*_COLUMNS.values(), "cached", ""], rows, title=title)
    print(f"Figures: {FIGURES_SOURCE}. {FIGURES_NOTE}")
    print(
        "Other forms: hf-hub:ORG/NAME, local:PATH (a checkpoint), ARCH:PATH (a state dict), "
        "transformers:ORG/NAME or FOLDER (CLIP, SigLIP, SigLIP2 in transformers' format), "
        "multilingual:NAME or TEXT_FOLDER+IMAGE_MODEL (a multilingual text tower)."
    )


@app.command("info")
def model_info(
    name: Annotated[str, typer.Argument(help="A model name, e.g. offline or ViT-B-32:openai.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Show a model's embedding size, preprocessing, size, open_clip's zero-shot figures,
    cache path and engines."""
    from cliplens.models.zoo import describe_engines, describe_model

    details = describe_model(name).to_dict() | describe_engines(name)
    if fmt is Format.json:
        print_json(details)
    elif fmt is Format.csv:
        print_csv(["field", "value"], list(details.items()))
    else:
        print_table(["field", "value"], [(k, v) for k, v in details.items()], title=details["name"])
