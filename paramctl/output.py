"""The one place that prints: rows to table / TSV / CSV / JSON / JSONL, notes to stderr.

Commands hand over rows (dicts keyed by column name). Whether standard output is a terminal is
decided here once (`PARAMCTL_TTY=1|0` overrides it, for tests and for `watch`-style use).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

FORMATS = ("table", "tsv", "csv", "json", "jsonl")

# C0 and C1 controls, DEL, and the bidirectional overrides/isolates that reorder text on screen
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\\\\]")


def escape(text: str, backslash: bool = True) -> str:
    """TEXT with control and bidi characters (and backslash) as visible escapes: one safe line.

    BACKSLASH False leaves backslashes as they are: a message quotes the PATTERN the user typed
    (`'fc\\.weight'`) once, as typed, and its control characters are escaped all the same."""

    def repl(m: re.Match[str]) -> str:
        c = m.group()
        if c == "\\":
            return "\\\\" if backslash else c
        named = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
        return named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _UNSAFE.sub(repl, text)


def stdout_is_terminal() -> bool:
    forced = os.environ.get("PARAMCTL_TTY")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stdout.isatty()


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def resolve(fmt: str | None) -> str:
    return fmt or ("table" if stdout_is_terminal() else "tsv")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return shape_text(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return escape(str(value))


def _human(column: str, value: Any) -> str:
    if column == "nbytes" and isinstance(value, int):
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool) and column != "name":
        return f"{value:,}"
    return _plain(value)


Highlight = Callable[[dict[str, Any], str], "str | None"]


def emit(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    fmt: str | None,
    footer: dict[str, Any] | None = None,
    title: str | None = None,
    highlight: Highlight | None = None,
) -> None:
    """Write ROWS to standard output in FMT (default: table on a terminal, else TSV).

    FOOTER (totals) and HIGHLIGHT (row, column -> rich style, for problem values) only
    decorate the table.
    """
    fmt = resolve(fmt)
    out = sys.stdout
    title = redact_urls(title) if title else title
    if fmt == "json":
        count = 0
        out.write("[")
        for row in rows:
            out.write(
                ("," if count else "") + "\n  " + json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False)
            )
            count += 1
        out.write("\n]\n" if count else "]\n")
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")
    elif fmt == "tsv":
        for row in rows:
            out.write("\t".join(_plain(row.get(c)) for c in columns) + "\n")
    elif fmt == "csv":
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_plain(row.get(c)) for c in columns])
    else:
        _table(list(rows), columns, footer, title, highlight)


def _table(
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    footer: dict[str, Any] | None,
    title: str | None,
    highlight: Highlight | None,
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_footer=footer is not None, box=None, pad_edge=False)
    for c in columns:
        sample = next((r[c] for r in rows if r.get(c) is not None), None)
        numeric = isinstance(sample, (int, float)) and not isinstance(sample, bool)
        foot = Text(_human(c, footer[c]) if footer and c in footer else "", style="bold")
        table.add_column(Text(c, style="bold"), footer=foot, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(Text(_human(c, row.get(c)), style=(highlight and highlight(row, c)) or "") for c in columns))
    # on a terminal the table fits its width; piped or redirected (`-f table > report.txt`), it is
    # never cut at rich's default of 80 columns
    console = Console(file=sys.stdout, soft_wrap=False, width=None if stdout_is_terminal() else 1 << 16)
    if title:  # a line of its own: a table narrower than a long path would wrap it
        console.print(Text(escape(title), style="dim"), soft_wrap=True)
    console.print(table)


def emit_record(record: dict[str, Any], fmt: str | None) -> None:
    """Write one key/value record (info): a two-column table, `key\\tvalue` lines, or a JSON object."""
    fmt = resolve(fmt)
    if fmt in ("json", "jsonl"):
        text = json.dumps(record, ensure_ascii=False, indent=2 if fmt == "json" else None)
        sys.stdout.write(text + "\n")
        return
    rows = [{"key": k, "value": _record_value(v)} for k, v in record.items()]
    emit(rows, ["key", "value"], fmt)


def _record_value(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{_plain(k)}: {_record_value(v)}" for k, v in value.items())
    if isinstance(value, list) and not all(isinstance(v, int) for v in value):
        return ", ".join(_record_value(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _plain(value)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def quoted(text: str) -> str:
    """TEXT (a pattern or name the user typed) quoted for a message, once: no repr() doubling of
    its backslashes."""
    return f"'{text}'"


def note(message: str) -> None:
    """A note or warning for the person at the terminal: standard error, never standard output."""
    click.echo(f"paramctl: {escape(redact_urls(message), backslash=False)}", err=True)


def error(message: str) -> None:
    click.echo(f"paramctl: error: {escape(redact_urls(message), backslash=False)}", err=True)


_URL_SECRETS = re.compile(
    r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"]*@)?([^\s'\"?]*?)(?:\?[^\s'\"]*?)?(?=:\s|:$|[\s'\"]|$)"
)


def redact_urls(text: str) -> str:
    """TEXT with every URL's user information and query string (tokens, signatures) left out."""
    return _URL_SECRETS.sub(r"\1\2", text) if "://" in text else text
