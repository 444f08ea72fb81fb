"""The formats paramctl reads and writes, as the registry knows them: `formats`."""

from __future__ import annotations

from paramctl import output
from paramctl.cli import cli, output_options

COLUMNS = ["format", "description", "extensions", "writes", "urls", "layout"]


@cli.command("formats")
@output_options
def formats_command(fmt: str | None) -> None:
    """List the checkpoint formats: name (for --to), what it is, output extensions, whether
    paramctl writes it, whether it reads it at a URL, and the axis order its fans follow.

    \b
    Example:
      paramctl formats
      paramctl formats --format json
    """
    from paramctl.formats import formats

    rows = [
        {
            "format": f.name,
            "description": f.description,
            "extensions": " ".join(f.extensions) or "-",
            "writes": "yes" if f.save is not None else "no",
            "urls": "yes" if f.remote else "no",
            "layout": f.layout,
        }
        for f in sorted(formats(), key=lambda f: f.name)
    ]
    output.emit(rows, COLUMNS, fmt)
