"""Entry point: one Typer app; cliplens errors become one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from cliplens.cli import (
    caption,
    catalog,
    classify,
    datasets,
    distributed,
    generate,
    models,
    moderate,
    probe,
    quality,
    score,
    search,
    serve,
    train,
)
from cliplens.cli.common import PARAM_FLAGS, new_app
from cliplens.errors import ClipLensError, name_params
from cliplens.paths import readable

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).


def _new_app() -> typer.Typer:
    return new_app(
        name="cliplens",
        help="CLIP toolkit: zero-shot classification, photo search, moderation and more.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )


# the top-level commands (the groups are added below)
COMMANDS: dict[str, Callable[..., None]] = {
    "classify": classify.classify_command,
    "index": search.index_command,
    "search": search.search_command,
    "similar": search.similar_command,
    "duplicates": search.duplicates_command,
    "score": score.score_command,
    "rerank": score.rerank_command,
    "generate": generate.generate_command,
    "serve": serve.serve_command,
    "embed-dataset": distributed.embed_dataset_command,
    "build-index": distributed.build_index_command,
}
app = _new_app()
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(catalog.app, name="catalog")
app.add_typer(moderate.app, name="moderate")
app.add_typer(quality.app, name="quality")
app.add_typer(caption.app, name="caption")
app.add_typer(train.app, name="train")
app.add_typer(probe.app, name="probe")
app.add_typer(models.app, name="models")
app.add_typer(datasets.app, name="datasets")


def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from cliplens import __version__

        typer.echo(__version__)
        raise typer.Exit()


app.callback()(_root)


def _app_for(args: list[str]) -> typer.Typer:
    """The app that runs `args`: for a top-level command, one holding only that command.
    Building every command's parser costs 0.16 s a run (typer reads each signature), a
    third of a one-shot search; groups, help and errors use the whole app."""
    if not args or args[0] not in COMMANDS:
        return app
    one = _new_app()
    one.command(args[0])(COMMANDS[args[0]])
    one.callback()(_root)
    return one


def _usage_line(e: ClickException) -> str:
    """A click usage error as one line: the message, then where to look for help."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None and e.exit_code == 2:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _flag_namer(argv: list[str]) -> Callable[[str], str | None]:
    """Names a library parameter as the invoked command's option (`max_megapixels` ->
    --max-megapixels, `timeout_s` -> --timeout) or argument (FOLDER)."""
    command = typer.main.get_command(app)
    path: list[str] = []
    for token in argv:
        commands = getattr(command, "commands", None)
        if token.startswith("-") or not commands or token not in commands:
            break
        command = commands[token]
        path.append(token)
    names: dict[str, str] = dict(PARAM_FLAGS.get(" ".join(path), {}))
    for param in getattr(command, "params", []):
        if param.opts and param.opts[0].startswith("-"):
            names.setdefault(param.name, max(param.opts, key=len))
        else:
            names.setdefault(param.name, param.name.upper())
    return lambda name: names.get(name) or ("--" + name.replace("_", "-"))


def _make_streams_lossless() -> None:
    """File names that are not UTF-8 go to stdout as their own bytes (so `--format paths`
    feeds xargs the real names) and to stderr as \\xNN escapes, never as a crash."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a stream that cannot change
                reconfigure(errors=errors)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of a traceback for every error: 2 for bad
    usage, the error's own code (1 or 2) for cliplens errors, 130 when interrupted."""
    _make_streams_lossless()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # without standalone mode click returns the exit code of typer.Exit instead of exiting
        code = _app_for(args)(args=args, prog_name="cliplens", standalone_mode=False)
    except ClipLensError as e:
        message = name_params(str(e), _flag_namer(args))
        print(f"error: {readable(message)}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NoArgsIsHelpError as e:  # a bare group: its help is the answer
        e.show()
        return 2
    except ClickException as e:  # typer's own click: usage errors
        print(f"error: {readable(_usage_line(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if os.environ.get("CLIPLENS_DEBUG"):
            raise
        detail = readable(" ".join(f"{type(e).__name__}: {e}".split()))
        print(f"error: unexpected {detail} (CLIPLENS_DEBUG=1 shows where)", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def run() -> None:
    """The `cliplens` command: `main`, one collection, then exit without more.

    While the interpreter tears its modules down at exit, the cycle collector passes over
    every object again and again: 50-60 ms of a one-shot query's 0.5 s here (numpy,
    onnxruntime, typer and the catalog loaded). One collection first finalizes what the
    command left in reference cycles (a catalog's SQLite connection closes, which merges
    its write-ahead log into the file), then `gc.freeze()` moves everything that is left
    out of the collector's reach. atexit handlers, thread joins and the closing of files
    run as usual. Only in the process's own entry point: `main` called in-process keeps
    its collector."""
    code = main()
    gc.collect()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
