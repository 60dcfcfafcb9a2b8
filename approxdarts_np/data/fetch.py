"""Download the full CIFAR-10 data set: stream, verify the MD5, extract safely and atomically.

``fetch_cifar10(dest)`` leaves ``dest/cifar-10-batches-py`` with the official
python-version batches, or nothing at all: the archive is streamed into a
temporary file inside ``dest``, its MD5 compared with the published one, its
members extracted into a temporary folder inside ``dest`` (regular files and
folders only, every path checked to stay inside that folder), and the finished
folder renamed into place in one step. Every temporary file and folder is
removed again, whatever fails.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from approxdarts_np.data.cifar import ARCHIVE_FOLDER, REQUIRED_FILES, missing_files
from approxdarts_np.errors import UserError

#: The official "CIFAR-10 python version" archive (https://www.cs.toronto.edu/~kriz/cifar.html).
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Its MD5 as published on that page.
PUBLISHED_MD5 = "c58f30108f718f92721af3b95e74349a"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_SECONDS = 60.0

#: ``progress(stage, done, total)``: stage ``"download"`` counts bytes (total from
#: Content-Length, or None), stage ``"extract"`` counts extracted files (total None).
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class FetchResult:
    """Where the batches are, and whether this call downloaded them (False: already present)."""

    path: Path
    downloaded: bool
    archive_bytes: int = 0
    md5: str = ""


def fetch_cifar10(dest: str | Path, url: str = DEFAULT_URL, md5: str = PUBLISHED_MD5,
                  progress: ProgressCallback | None = None, force: bool = False,
                  timeout: float = _TIMEOUT_SECONDS) -> FetchResult:
    """Download, verify and extract the CIFAR-10 archive into ``dest/cifar-10-batches-py``.

    An existing complete folder is kept and reported (``downloaded=False``)
    unless ``force``; an existing incomplete one is an error unless ``force``,
    which replaces either only after the new copy is complete. Network errors,
    an MD5 mismatch, and an archive that is unsafe or lacks the batch files
    raise :class:`UserError`, leaving ``dest`` as it was.
    """
    expected_md5 = md5.strip().lower()
    if len(expected_md5) != 32 or any(c not in "0123456789abcdef" for c in expected_md5):
        raise UserError(f"MD5 must be 32 hexadecimal digits, got {md5!r}")
    dest = Path(dest).expanduser()
    target = dest / ARCHIVE_FOLDER
    if target.exists() and not force:
        if not target.is_dir():
            raise UserError(f"{target} exists and is not a folder; remove it or use --force")
        missing = missing_files(target)
        if not missing:
            return FetchResult(path=target, downloaded=False)
        raise UserError(f"{target} exists but is incomplete (missing {', '.join(missing)}); "
                        f"remove it or use --force")
    created_dest = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest}: {exc.strerror or exc}") from exc

    archive = _temporary_file(dest)
    staging: Path | None = None
    succeeded = False
    try:
        size, actual_md5 = _download(url, archive, timeout, progress)
        if actual_md5 != expected_md5:
            raise UserError(f"MD5 mismatch for {url}: expected {expected_md5}, got {actual_md5}; "
                            f"the download was discarded")
        staging = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=dest))
        _extract_safely(archive, staging, progress)
        extracted = staging / ARCHIVE_FOLDER
        missing = missing_files(extracted) if extracted.is_dir() else list(REQUIRED_FILES)
        if missing:
            raise UserError(f"archive from {url} has no {ARCHIVE_FOLDER}/{missing[0]} "
                            f"(missing {', '.join(missing)})")
        try:
            _move_into_place(extracted, target, staging)
        except OSError as exc:
            raise UserError(f"cannot move the extracted batches to {target}: {_reason(exc)}") from exc
        succeeded = True
        return FetchResult(path=target, downloaded=True, archive_bytes=size, md5=actual_md5)
    finally:
        archive.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created_dest and not succeeded:
            _remove_if_empty(dest)


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder this call created, if nothing else was put in it meanwhile."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _temporary_file(folder: Path) -> Path:
    """A new empty file in ``folder`` whose name marks it as an unfinished download."""
    try:
        handle, name = tempfile.mkstemp(prefix=".cifar10-download-", suffix=".tar.gz", dir=folder)
    except OSError as exc:
        raise UserError(f"cannot write into {folder}: {exc.strerror or exc}") from exc
    os.close(handle)
    return Path(name)


def _download(url: str, path: Path, timeout: float,
              progress: ProgressCallback | None) -> tuple[int, str]:
    """Stream ``url`` into ``path``; return the byte count and the MD5 hex digest."""
    digest = hashlib.md5()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, path.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress is not None:
                progress("download", 0, total)
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress("download", done, total)
        if total is not None and done != total:
            raise UserError(f"download failed: {url}: the connection closed after {done:,} "
                            f"of {total:,} bytes")
    except urllib.error.HTTPError as exc:
        raise UserError(f"download failed: {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UserError(f"download failed: {url}: {_reason(exc.reason)}") from exc
    except TimeoutError as exc:
        raise UserError(f"download failed: {url}: timed out after {timeout:g} s") from exc
    except http.client.HTTPException as exc:  # e.g. the connection closed before Content-Length
        raise UserError(f"download failed: {url}: {type(exc).__name__}") from exc
    except ValueError as exc:  # malformed URL or unknown scheme
        raise UserError(f"download failed: {url}: {exc}") from exc
    except OSError as exc:  # connection reset mid-stream, disk full, ...
        raise UserError(f"download failed: {url}: {_reason(exc)}") from exc
    return done, digest.hexdigest()


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _extract_safely(archive: Path, folder: Path, progress: ProgressCallback | None) -> None:
    """Extract the regular files and folders of a tar.gz into ``folder``, refusing anything else.

    Refused (the whole archive, with a UserError): absolute paths, paths with
    ``..``, and members that are neither regular files nor folders (links,
    devices, FIFOs). Permissions come from ``folder``'s defaults, not the archive.
    """
    root = folder.resolve()
    count = 0
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                relative = _safe_relative_path(member)
                target = root.joinpath(*relative.parts) if relative.parts else root
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isreg() members always have a file
                    raise UserError(f"archive member {member.name!r} has no data")
                with source, target.open("xb") as out:
                    shutil.copyfileobj(source, out, _CHUNK_BYTES)
                count += 1
                if progress is not None:
                    progress("extract", count, None)
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"{archive.name}: not a readable tar.gz archive ({exc})") from exc
    except FileExistsError as exc:
        raise UserError(f"archive lists {exc.filename} twice; refusing it") from exc
    except OSError as exc:
        raise UserError(f"cannot extract into {folder}: {_reason(exc)}") from exc


def _safe_relative_path(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's path, checked to be relative, without ``..``, and a file or folder."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\"):
        raise UserError(f"archive member {name!r} has an absolute path; refusing the archive")
    if ".." in path.parts or "\\" in name:
        raise UserError(f"archive member {name!r} points outside the archive; refusing the archive")
    if not (member.isreg() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise UserError(f"archive member {name!r} is a {kind}; refusing the archive")
    return PurePosixPath(*[part for part in path.parts if part != "."])


def _move_into_place(extracted: Path, target: Path, staging: Path) -> None:
    """Rename ``extracted`` to ``target``; an existing ``target`` is swapped out first."""
    if target.exists() or target.is_symlink():
        retired = staging / "previous"
        os.replace(target, retired)
        try:
            os.replace(extracted, target)
        except OSError:
            os.replace(retired, target)
            raise
    else:
        os.replace(extracted, target)
