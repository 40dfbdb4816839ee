"""Rendering of results for the terminal: tables on stdout, status and errors on stderr.

Commands compute plain data and hand it here; nothing in this module decides anything.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def stdout_console():
    from rich.console import Console

    # Piped output is not wrapped at 80 columns: `qvl list-specs | less -S` stays readable.
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 240)


def stderr_console():
    from rich.console import Console

    # soft_wrap: an error stays one line however long, so it can be grepped and copied.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def status(message: str) -> None:
    """One status line on stderr (dim), never on stdout."""
    stderr_console().print(f"[dim]{message}[/dim]", markup=True)


def note(message: str) -> None:
    """A dim status line on stderr, taken literally (no markup) and never wrapped."""
    stderr_console().print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def warn(message: str) -> None:
    stderr_console().print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


def error(message: str, hint: str | None) -> None:
    console = stderr_console()  # one line each, never wrapped at the console width
    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    if hint:
        console.print(f"[dim]hint: {escape(hint)}[/dim]", soft_wrap=True)


# Cells at most this long never wrap (sizes, states, formats); longer ones (repo ids, paths)
# fold at the column's width, so a narrow terminal wraps them, not the short ones letter by letter.
SHORT_CELL = 16


def table(columns: list[str], rows: list[list[str]], title: str | None = None, fold_constant: bool = False) -> None:
    """A table on stdout that fits the terminal. ``fold_constant``: a column with the same value
    on every row (of two or more) is left out and said once under the table ("engines: transformers")."""
    from rich import box
    from rich.table import Table

    rows = [[str(c) for c in row] for row in rows]
    columns, rows, constant = fold_constant_columns(columns, rows) if fold_constant else (columns, rows, [])
    tbl = Table(title=title, box=box.SIMPLE_HEAD, show_lines=False, header_style="bold", pad_edge=False)
    for i, col in enumerate(columns):
        longest = max([len(r[i]) for r in rows] + [0])
        short = longest <= SHORT_CELL
        tbl.add_column(col, overflow="fold", no_wrap=short, min_width=min(len(col), SHORT_CELL) if short else None)
    for row in rows:
        tbl.add_row(*[escape(c) for c in row])
    console = stdout_console()
    console.print(tbl)
    if constant:  # wrapped at word boundaries, like prose
        console.print(escape("on every row: " + ", ".join(f"{name} {value}" for name, value in constant)),
                      soft_wrap=False)


def fold_constant_columns(columns: list[str], rows: list[list[str]]
                          ) -> tuple[list[str], list[list[str]], list[tuple[str, str]]]:
    """(the columns that vary, their rows, [(name, value)] of those with one value on every row)."""
    if len(rows) < 2:
        return columns, rows, []
    same = [i for i in range(len(columns)) if len({r[i] for r in rows}) == 1]
    keep = [i for i in range(len(columns)) if i not in same]
    return ([columns[i] for i in keep], [[r[i] for i in keep] for r in rows],
            [(columns[i], rows[0][i]) for i in same])


def key_values(pairs: list[tuple[str, str]], title: str | None = None) -> None:
    from rich.table import Table

    tbl = Table(title=title, show_header=False, box=None, pad_edge=False)
    tbl.add_column(style="bold")
    tbl.add_column(overflow="fold")
    for key, value in pairs:
        tbl.add_row(escape(key), escape(str(value)))
    stdout_console().print(tbl)


def fit_cells(row: dict[str, Any], shown: bool) -> list[str]:
    """The `list-specs --fit` cells: '~18.6 GiB' and 'yes' / 'no' / '?'."""
    if not shown:
        return []
    size = row.get("memory_bytes")
    fits = {True: "yes", False: "no"}.get(row.get("fits"), "?")
    return ["?" if size is None else f"~{size / (1 << 30):.1f} GiB", fits]


class _NoSpinner:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def spinner(message: str, quiet: bool = False):
    """A spinner on stderr while something slow runs (nothing when quiet or not a terminal)."""
    console = stderr_console()
    if quiet or not console.is_terminal:
        if not quiet:
            status(message + " ...")
        return _NoSpinner()
    return console.status(f"[dim]{escape(message)} ...[/dim]", spinner="dots")
