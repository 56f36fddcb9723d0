"""`cliplens models`: which models exist, which are cached, and what each one is."""

from __future__ import annotations

from typing import Annotated

import typer

from cliplens.cli.output import Format, print_csv, print_json, print_table

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

app = typer.Typer(help="List models and show their details.", invoke_without_command=True)

FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]


@app.callback()
def list_models(
    ctx: typer.Context,
    cached: Annotated[
        bool, typer.Option("--cached", help="Only models ready to use offline.")
    ] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """List known model names (offline, and every open_clip ARCH:TAG), marking what is cached."""
    if ctx.invoked_subcommand is not None:
        return
    from cliplens.models.zoo import known_models
    from cliplens.settings import get_settings

    entries = [e for e in known_models() if e.cached or not cached]
    if fmt is Format.json:
        print_json([e.to_dict() for e in entries])
    elif fmt is Format.csv:
        print_csv(["name", "cached", "default"], [(e.name, e.cached, e.default) for e in entries])
    else:
        rows = [
            (e.name, "yes" if e.cached else "", "default" if e.default else "") for e in entries
        ]
        title = f"{len(entries)} models; cache: {get_settings().model_cache}"
        print_table(["name", "cached", ""], rows, title=title)
        print("Other forms: hf-hub:ORG/NAME, local:PATH (a checkpoint), ARCH:PATH (a state dict).")


@app.command("info")
def model_info(
    name: Annotated[str, typer.Argument(help="A model name, e.g. offline or ViT-B-32:openai.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Show a model's embedding size, preprocessing, size, cache path and engines."""
    from cliplens.models.zoo import describe_engines, describe_model

    details = describe_model(name).to_dict() | describe_engines(name)
    if fmt is Format.json:
        print_json(details)
    elif fmt is Format.csv:
        print_csv(["field", "value"], list(details.items()))
    else:
        print_table(["field", "value"], [(k, v) for k, v in details.items()], title=details["name"])
