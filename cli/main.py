"""The `approxdarts-np` command line: thin typer commands over library functions."""
import typer

app = typer.Typer(help="ApproxDARTS in NumPy/Numba: architecture search with approximate multipliers.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _v
    typer.echo(_v("approxdarts-np"))
