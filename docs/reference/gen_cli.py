"""Write the command-line reference (docs/reference/cli.md) from the Typer app.

Every command, argument and option of `cliplens`, with its help, comes from the app itself,
so the reference cannot drift from the code: `make docs` runs this script, and
tests/unit/test_cli_reference.py fails when the committed file differs from what it writes.

    python docs/reference/gen_cli.py [OUT]   # default: docs/reference/cli.md
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from typer._click import Command, Context, Parameter

from cliplens.cli.common import DefaultCommandGroup
from cliplens.cli.main import app

OUT = Path(__file__).resolve().parent / "cli.md"

HEADER = """\
# Command-line reference

Every command of `cliplens`, with its arguments and options, as `cliplens CMD --help`
prints them. This page is written from the command-line app itself by
`docs/reference/gen_cli.py` (`make docs` runs it), and a test fails when a command or an
option is missing from it or no longer exists, so do not edit it by hand.

Options whose value is a number show their range; every command also takes `--help`.
Exit codes, error messages and the rules every command follows are in
[Getting started](../getting-started.md#the-command-line).
"""

_MARKDOWN_SPECIALS = re.compile(r"([\\*_\[\]])")  # backticks stay: help text quotes code


def _text(s: str) -> str:
    """Help text as Markdown that renders as written."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(" ".join(s.split()), quote=False))


def walk(command: Command, ctx: Context) -> Iterator[tuple[Command, Context]]:
    """The command and every visible subcommand under it, depth first, in the app's order."""
    yield command, ctx
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from walk(sub, Context(sub, info_name=name, parent=ctx))


def params(command: Command) -> list[Parameter]:
    """The visible parameters a command declares (the automatic --help left out)."""
    return [p for p in command.params if not getattr(p, "hidden", False)]


def _param_line(param: Parameter, ctx: Context) -> str:
    record = param.get_help_record(ctx)
    names, help_text = record if record else (param.human_readable_name, "")
    extra = ""
    found = re.search(r"\s*(\[[^\[\]]*\])$", help_text)
    if found:
        help_text, extra = help_text[: found.start()], found.group(1)
    line = f"- `{names}`"
    if help_text.strip():
        line += f": {_text(help_text)}"
    if extra:
        line += f" `{extra}`"
    return line


def _section(command: Command, ctx: Context) -> str:
    path = ctx.command_path
    out = [f"## {path}", ""]
    help_text = command.help or command.short_help or ""
    for paragraph in help_text.split("\n\n"):
        if paragraph.strip():
            out += [_text(paragraph), ""]
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    out += ["```text", f"Usage: {usage}", "```", ""]
    subcommands = [(n, c) for n, c in getattr(command, "commands", {}).items() if not c.hidden]
    if subcommands:
        out += ["Commands:", ""]
        for name, sub in subcommands:
            anchor = f"{path} {name}".replace(" ", "-")
            summary = sub.short_help or (sub.help or "").split("\n\n")[0]
            out.append(f"- [`{name}`](#{anchor}): {_text(summary)}")
        out.append("")
        if isinstance(command, DefaultCommandGroup):
            first = subcommands[0][0]
            out += [f"`{path} ARGS` with no command name runs `{path} {first} ARGS`.", ""]
    arguments = [p for p in params(command) if p.param_type_name == "argument"]
    options = [p for p in params(command) if p.param_type_name != "argument"]
    for title, group in (("Arguments", arguments), ("Options", options)):
        if group:
            out += [f"{title}:", ""]
            out += [_param_line(p, ctx) for p in group]
            out.append("")
    return "\n".join(out)


def render() -> str:
    """The whole reference, as Markdown."""
    root = typer.main.get_command(app)
    sections = [_section(c, ctx) for c, ctx in walk(root, Context(root, info_name="cliplens"))]
    return HEADER + "\n" + "\n".join(sections)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
