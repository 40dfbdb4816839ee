"""The `qvl` command line: the typer app, its commands (one module per group) and `main()`.

Commands stay thin: parse flags, call one function, render the result. Heavy modules
(torch, transformers, the hub SDKs, the HTTP server) are imported inside the commands that
need them, never at the top of a cli module.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from qwenvl_cli import __version__, render, settings
from qwenvl_cli.cli import batch, chat, models, serve, specs
from qwenvl_cli.errors import EXIT_FAILURE, QvlError, translate

APP_HELP = """qvl: launch, chat with and serve the Qwen2-VL vision-language models.

[bold]Examples[/bold]

  qvl chat --image photo.jpg "What is in this picture?"
  qvl chat -s 7 -f awq                   an interactive chat (/help lists its commands)
  qvl list-specs                         every model spec in the catalogue
  qvl resolve -s 7 -f awq                which checkpoint `launch -s 7 -f awq` would use
  qvl resolve -s auto                    the largest spec that fits the GPUs, and its memory
  qvl download -s 7 -f awq               fetch it into the Hugging Face (or ModelScope) cache
  qvl cached                             what is in the caches
  qvl launch -s 2                        serve it (OpenAI API) in the background
  qvl list                               the launched models; qvl terminate UID stops one
"""

app = typer.Typer(
    name="qvl", help=APP_HELP, rich_markup_mode="rich", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """qvl: launch, chat with and serve the Qwen2-VL vision-language models."""


# The order of --help: the catalogue, the caches, serving, chat, batch.
for group in (specs, models, serve, chat, batch):
    group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every expected failure into one line + a hint."""
    try:
        # standalone_mode=False: click hands option-parsing errors here instead of printing a
        # boxed panel, so they read like every other error (one line + a hint, exit 2).
        code = app(args=argv, prog_name="qvl", standalone_mode=False)
    except SystemExit:
        raise
    except typer.TyperException as exc:  # click's errors (typer vendors click): bad usage
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `qvl`: its help, as before
            typer.echo(exc.format_message(), err=True)
        else:
            render.error(_usage_message(exc), _usage_hint(exc))
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C / Ctrl-D at a confirmation prompt
        render.stderr_console().print("[dim]interrupted[/dim]")
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001 - the one place errors are rendered
        if isinstance(exc, KeyboardInterrupt):
            render.stderr_console().print("[dim]interrupted[/dim]")
            sys.exit(130)
        error = translate(exc)
        if settings.debug():
            raise
        if error is None:
            error = QvlError(f"unexpected error: {type(exc).__name__}: {exc}",
                             "rerun with QVL_DEBUG=1 to see the traceback, and report it")
        render.error(error.message, error.hint)
        sys.exit(getattr(error, "exit_code", EXIT_FAILURE))
    sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: typer.TyperException) -> str:
    """click's message on one line ("No such option: --sise Did you mean --size?")."""
    return " ".join(exc.format_message().split())


def _usage_hint(exc: typer.TyperException) -> str:
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "qvl"
    return f"run `{path} --help` to see its arguments and options"
