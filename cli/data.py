"""`approxdarts-np data` commands."""
import typer

app = typer.Typer(no_args_is_help=True)
