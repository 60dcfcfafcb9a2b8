"""`approxdarts-np data` commands."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from approxdarts_np.data.cifar import load_cifar10
from approxdarts_np.data.fetch import DEFAULT_URL, PUBLISHED_MD5, fetch_cifar10
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.text import plural, wrap_parts

app = typer.Typer(no_args_is_help=True)


@app.command()
@user_errors
def fetch(
    dest: Path = typer.Option(Path("data"), "--dest", help="Folder to put cifar-10-batches-py in."),
    url: str = typer.Option(DEFAULT_URL, "--url", help="Where to download the archive from."),
    md5: str = typer.Option(PUBLISHED_MD5, "--md5", help="Expected MD5 of the archive."),
    force: bool = typer.Option(False, "--force", help="Download again even if the folder is complete."),
) -> None:
    """Download the full CIFAR-10 python-version archive, verify its MD5 and extract it."""
    with _FetchProgress() as progress:
        result = fetch_cifar10(dest, url=url, md5=md5, progress=progress.update, force=force)
    if result.downloaded:
        _echo([f"CIFAR-10 ready in {result.path}", f"({result.archive_bytes:,} bytes, MD5 {result.md5} verified);",
               f"pass --data-dir {result.path}"])
    else:
        _echo([f"CIFAR-10 already present in {result.path};", "nothing downloaded (use --force to fetch it again)"])


def _echo(parts: list[str]) -> None:
    """One statement in parts, broken between them where it is wider than the terminal (80 columns in a file)."""
    for line in wrap_parts(parts, shutil.get_terminal_size().columns, separator=" "):
        typer.echo(line)


@app.command()
@user_errors
def info(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                            help="CIFAR-10 folder (default: the bundled sample)."),
) -> None:
    """Read and validate a CIFAR-10 folder and print what it holds."""
    data = load_cifar10(data_dir)
    counts = f"{data.train_x.shape[0]:,} training and {plural(data.test_x.shape[0], 'test image')}"
    _echo([f"{data.source}:", counts])
    for label, name in enumerate(data.class_names):
        typer.echo(f"  {label} {name:<11} train {int((data.train_y == label).sum()):>6,}"
                   f"  test {int((data.test_y == label).sum()):>6,}")


class _FetchProgress:
    """Rich progress bars on stderr driven by the library's ``progress(stage, done, total)`` calls."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        # Bars only on a terminal: redirected output gets no control codes or stray lines.
        self._progress = Progress(TextColumn("{task.description:<8}"), BarColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                                  console=console, transient=True, disable=not console.is_terminal)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "_FetchProgress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tasks:
            self._progress.stop()

    def update(self, stage: str, done: int, total: int | None) -> None:
        # Started on the first report, so a command that fails before any
        # transfer prints nothing but its error line.
        if not self._tasks:
            self._progress.start()
        if stage == "download":
            detail = f"{done / 1e6:.1f}" + (f"/{total / 1e6:.1f} MB" if total else " MB")
        else:
            detail = plural(done, "file")
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total, detail=detail)
        self._progress.update(self._tasks[stage], completed=done, total=total, detail=detail)
