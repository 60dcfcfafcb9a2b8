"""The `approxdarts-np` command line: thin typer commands over library functions."""
import typer

from approxdarts_np_cli import data, multipliers
from approxdarts_np_cli.energy import energy
from approxdarts_np_cli.evaluate import evaluate
from approxdarts_np_cli.search import search
from approxdarts_np_cli.sweep import sweep
from approxdarts_np_cli.train import train

app = typer.Typer(help="ApproxDARTS in NumPy/Numba: architecture search with approximate multipliers.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(multipliers.app, name="multipliers", help="List and characterise multiplier tables.")
app.command()(search)
app.command()(train)
app.command()(evaluate)
app.command()(energy)
app.command()(sweep)
app.add_typer(data.app, name="data", help="CIFAR-10 data: fetch the full set.")


def _package_version() -> str:
    from importlib.metadata import version as _v
    return _v("approxdarts-np")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(_package_version())
        raise typer.Exit()


@app.callback()
def options(show_version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                               help="Print the package version and exit.")) -> None:
    """ApproxDARTS in NumPy/Numba: architecture search with approximate multipliers."""


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(_package_version())


if __name__ == "__main__":
    app()
