"""Reading a file that must be small: its size is checked before a byte is read."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from approxdarts_np.errors import UserError


def read_at_most(path: Path, max_bytes: int, too_large: Callable[[int], str],
                 unreadable: Callable[[str], str]) -> bytes:
    """The bytes of ``path``; UserError(``too_large(size)``) for a file over ``max_bytes`` (not read), and
    UserError(``unreadable(reason)``) when the system cannot read it."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(too_large(size))
        return path.read_bytes()
    except OSError as exc:
        raise UserError(unreadable(exc.strerror or str(exc))) from None
