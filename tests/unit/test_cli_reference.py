"""The command-line reference (docs/reference/cli.md) matches the Typer app both ways; the
API reference (docs/reference/api.md) names every public name of `cliplens`; the route
table of docs/http-api.md matches the server's OpenAPI schema both ways."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import typer
from typer._click import Command

import cliplens
from cliplens.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "reference" / "cli.md"
API_MD = ROOT / "docs" / "reference" / "api.md"
HTTP_MD = ROOT / "docs" / "http-api.md"


def _app_commands() -> dict[str, set[str]]:
    """'cliplens moderate check' -> the names of its arguments and options."""
    found: dict[str, set[str]] = {}

    def visit(command: Command, path: str) -> None:
        names = set()
        for p in command.params:
            if not getattr(p, "hidden", False):
                names |= (
                    set(p.opts + p.secondary_opts) if p.param_type_name != "argument" else {p.name}
                )
        found[path] = names
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                visit(sub, f"{path} {name}")

    visit(typer.main.get_command(app), "cliplens")
    return found


def _documented_commands() -> dict[str, set[str]]:
    """The same, read from the reference: `## cliplens ...` sections and their `- `names``."""
    found: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in CLI_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = found.setdefault(line[3:].strip(), set())
        elif current is not None and (m := re.match(r"- `([^`]+)`(?::|$| )", line)):
            spec = m.group(1)
            if spec.startswith("-"):  # "-k, --top-k <int range>", "--multi-label / --no-x"
                current |= {t for t in re.split(r"[\s,/]+", spec) if t.startswith("-")}
            else:  # an argument: "paths..."
                current.add(spec.split()[0].rstrip(".").lower())
    return found


def test_every_command_and_option_is_in_the_reference():
    documented = _documented_commands()
    for path, names in _app_commands().items():
        assert path in documented, f"docs/reference/cli.md lacks `{path}`: run make docs"
        missing = names - documented[path]
        assert not missing, f"docs/reference/cli.md: `{path}` lacks {sorted(missing)}"


def test_the_reference_lists_nothing_that_no_longer_exists():
    commands = _app_commands()
    for path, names in _documented_commands().items():
        assert path in commands, f"docs/reference/cli.md lists `{path}`, which is gone"
        extra = names - commands[path]
        assert not extra, f"docs/reference/cli.md: `{path}` lists {sorted(extra)}, gone"


def test_the_committed_reference_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("gen_cli", CLI_MD.parent / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    assert gen_cli.render() == CLI_MD.read_text(encoding="utf-8"), (
        "docs/reference/cli.md is out of date: run make docs (or docs/reference/gen_cli.py)"
    )


def test_the_api_reference_names_every_public_name():
    text = API_MD.read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: cliplens\.[\w.]+\.(\w+)$", text, flags=re.M))
    public = set(cliplens.__all__) - {"__version__"}
    assert not public - documented, f"api.md lacks {sorted(public - documented)}"
    assert not documented - public, f"api.md names {sorted(documented - public)}, not public"


def test_the_http_api_page_lists_every_route_and_no_other():
    def norm(path: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", path)

    schema = cliplens.create_app(cliplens.ServerSettings(model="offline")).openapi()
    served = {(m.upper(), norm(p)) for p, ops in schema["paths"].items() for m in ops}
    text = HTTP_MD.read_text(encoding="utf-8")
    route = r"`(GET|POST|PUT|DELETE) (/(?:openai/)?v1/[^`?\s]+)"
    listed = {(m, norm(p)) for m, p in re.findall(route, text)}
    assert not served - listed, f"docs/http-api.md lacks {sorted(served - listed)}"
    assert not listed - served, f"docs/http-api.md lists {sorted(listed - served)}, not served"


def _help(args: list[str]) -> str:
    """`cliplens ARGS --help` as a 500-column terminal shows it (nothing wraps)."""
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "500"})
    assert done.exit_code == 0, done.output
    return done.output


def test_help_prints_every_word_of_every_help_text():
    """Every command's help and every option's help appear in its --help whole: square
    brackets (`[tiny-shapes]`) are not taken for markup and dropped."""
    import inspect

    commands = typer.main.get_command(app)
    for path in _app_commands():
        command = commands
        for part in path.split()[1:]:
            command = command.commands[part]
        # Markdown's code and emphasis marks are styles on the terminal, not characters
        shown = re.sub(
            r"[`*]", "", " ".join(re.sub(r"[│╭╮╰╯─]", " ", _help(path.split()[1:])).split())
        )
        texts = [inspect.cleandoc(command.help or "")]
        texts += [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            for word in text.split():
                assert re.sub(r"[`*]", "", word) in shown, (path, word)
    assert "[tiny-shapes]" in _help(["train", "clip"])


def test_the_list_of_commands_shows_each_first_paragraph_on_one_line():
    """A docstring's line breaks are not kept in the list of commands."""
    import inspect

    commands = typer.main.get_command(app).commands
    listing = _help([]).splitlines()
    for name, command in commands.items():
        first = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
        row = next(line for line in listing if line.startswith(f"│ {name} "))
        assert first in " ".join(row.split()), (name, row)
