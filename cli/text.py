"""Text a person reads: counts with the right plural, long lines broken where they read well.

Every command's output fits the console width (80 columns in a log file or a
pipe); the helpers here break lines on purpose, at a separator, with the
continuation indented, instead of leaving the terminal to cut them anywhere.
"""
from __future__ import annotations

import re


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``, ``1,017 images`` (thousands separated)."""
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{count:,} {word}"


def wrap_parts(parts: list[str], width: int, separator: str = "  ", indent: str = "  ") -> list[str]:
    """``parts`` joined by ``separator`` into lines of at most ``width`` characters where possible.

    A line breaks only between parts; continuation lines start with ``indent``.
    A single part longer than the width stays whole on its own line.
    """
    lines: list[str] = []
    line = ""
    for part in parts:
        if not line:
            line = (indent if lines else "") + part
        elif len(line) + len(separator) + len(part) <= width:
            line += separator + part
        else:
            lines.append(line)
            line = indent + part
    if line:
        lines.append(line)
    return lines


def wrap_listing(text: str, width: int, first: str = "", indent: str = "  ") -> list[str]:
    """A long listing such as a genotype string, broken only after the comma that ends an item.

    An item ends at ``)`` or ``]`` followed by ``, `` (the edges of a genotype,
    ``range(2, 6)``); ``first`` starts the first line. Joining the lines with
    a space after removing the indents gives ``first + text`` back.
    """
    items = re.split(r"(?<=[)\]]), ", text)
    parts = [item + "," for item in items[:-1]] + items[-1:]
    if first:
        parts[0] = first + parts[0]
    return wrap_parts(parts, width, separator=" ", indent=indent)
