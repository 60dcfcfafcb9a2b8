"""`approxdarts-np multipliers`: list the bundled multiplier tables or characterise one."""
from __future__ import annotations

import json

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from approxdarts_np.approx.multipliers import (
    BUNDLED_PREFIX, ERROR_METRICS, bundled_names, load_multiplier, metric_definitions,
    printed_decimals, summarise,
)
from approxdarts_np_cli._common import user_errors

app = typer.Typer(help="List and characterise 8x8-bit multiplier tables.")

_LABELS = {"mae%": "MAE %", "wce%": "WCE %", "ep%": "EP %", "mre%": "MRE %", "wcre%": "WCRE %"}


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _pair(summary: dict, key: str) -> str:
    """Published value over measured value; measured shown with one more decimal than published."""
    published = summary["published"]
    measured = summary["measured"][key]
    if published is None or published.get(key) is None:
        return f"-\n{_number(measured)}"
    decimals = printed_decimals(published[key]) + 1
    return f"{_number(published[key])}\n{measured:.{decimals}f}"


def _verdict(summary: dict) -> str:
    if summary["published"] is None:
        return "-"
    return "ok" if not summary["mismatches"] else "DIFF " + " ".join(summary["mismatches"])


def _echo_json(payload) -> None:
    typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))


@app.callback(invoke_without_command=True)
@user_errors
def list_multipliers(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List the bundled tables: published / measured error figures, power and error rank."""
    if ctx.invoked_subcommand is not None:
        return
    summaries = [summarise(load_multiplier(name)) for name in bundled_names()]
    if json_output:
        _echo_json({"definitions": metric_definitions(), "multipliers": summaries})
        return
    table = Table(title=f"Bundled 8x8-bit unsigned multipliers ({BUNDLED_PREFIX}NAME)",
                  caption="pwr: published power, mW. Each error cell: published (top), "
                          "measured (bottom); check: measured equals published to its "
                          "printed precision",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("pwr", justify="right", no_wrap=True)
    for key in ERROR_METRICS:
        table.add_column(_LABELS[key], justify="right", no_wrap=True)
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("check", min_width=5)
    for summary in summaries:
        power = None if summary["published"] is None else summary["published"].get("pwr")
        table.add_row(summary["name"].removeprefix(BUNDLED_PREFIX), _number(power),
                      *(_pair(summary, key) for key in ERROR_METRICS),
                      str(summary["measured"]["rank"]), _verdict(summary))
    Console().print(table)


@app.command()
@user_errors
def show(
    spec: str = typer.Argument(
        ..., metavar="NAME|PATH",
        help="Bundled name (mul8u_2P7 or 2P7), 'exact', or a .bin/.npy file."),
    json_output: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Characterise one multiplier table, bundled or your own."""
    summary = summarise(load_multiplier(spec))
    if json_output:
        _echo_json(summary)
        return
    measured, published = summary["measured"], summary["published"]
    definitions = metric_definitions()
    title = summary["name"]
    if summary["source"] != summary["name"]:
        title += f"  ({summary['source']})"
    table = Table(title=title)
    table.add_column("figure", no_wrap=True)
    table.add_column("published", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("meaning")
    for key in ERROR_METRICS:
        table.add_row(key, _number(None if published is None else published.get(key)),
                      _number(measured[key]), definitions[key])
    for key in ("bias", "max_abs_error", "rank"):
        table.add_row(key, "", _number(measured[key]), definitions[key])
    if published is not None:
        for key in ("pwr", "area", "delay"):
            table.add_row(key, _number(published.get(key)), "", "")
    console = Console()
    console.print(table)
    console.print(f"exact: {'yes' if summary['is_exact'] else 'no'};  check: {_verdict(summary)}")
