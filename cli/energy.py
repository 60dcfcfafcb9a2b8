"""`approxdarts-np energy`: arithmetic energy of one inference, per layer and in total."""
from __future__ import annotations

import json
import re
import textwrap
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from approxdarts_np.approx.arithmetic import GENOTYPE
from approxdarts_np.approx.energy import EnergyModel
from approxdarts_np.nas.genotypes import read_genotype
from approxdarts_np.runs.report import MAX_ENERGY_CHANNELS, MAX_ENERGY_LAYERS, network_energy
from approxdarts_np_cli._common import user_errors
from approxdarts_np_cli.text import plural, wrap_parts


@user_errors
def energy(
    genotype: str = typer.Option(..., help="genotype.json, a .txt with the DARTS string, or DARTS_V2."),
    arithmetic: Optional[str] = typer.Option(None, "--arithmetic", "--multiplier", help=escape(
        "Arithmetic of the searched convolutions: exact, a multiplier (name or path), or genotype for the "
        "multiplier the genotype names per op [genotype when the genotype names multipliers, else exact].")),
    channels: int = typer.Option(36, help=f"Initial channels (1 to {MAX_ENERGY_CHANNELS:,})."),
    layers: int = typer.Option(20, help=f"Cells (3 to {MAX_ENERGY_LAYERS:,})."),
    fp32_mul_pj: float = typer.Option(3.7, help="Energy of an FP32 multiply (pJ)."),
    int8_mul_pj: float = typer.Option(0.2, help="Energy of an exact 8-bit multiply (pJ)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print every layer's MACs and multiplier."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Arithmetic energy of one inference: FP32, exact 8-bit and the chosen multiplier, per layer and total."""
    energy_model = EnergyModel(fp32_mul_pj=fp32_mul_pj, int8_mul_pj=int8_mul_pj)
    geno = read_genotype(genotype)
    if arithmetic is None:
        arithmetic = GENOTYPE if geno.has_multipliers else "exact"
    report, params = network_energy(geno, channels, layers, arithmetic, energy_model)
    data = {"genotype": geno.to_darts_string(), "channels": channels, "layers": layers,
            "parameters": params, **report.to_dict(),
            "energy_ratio_exact8_to_fp32": report.energy_exact8_pj / report.energy_fp32_pj,
            "summary": report.summary()}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()

    def say(parts: list[str]) -> None:
        """One statement in parts, broken between them when it is wider than the console."""
        for line in wrap_parts(parts, console.width, separator=" "):
            console.print(line, highlight=False, markup=False)

    if per_layer:
        # Layer names are long module paths: a compact table, and a name wider than its column folds onto
        # the next line instead of being cut.
        t = Table(title="layers", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        t.add_column("layer", overflow="fold")
        t.add_column("kind", no_wrap=True)
        t.add_column("MACs", justify="right", no_wrap=True)
        t.add_column("multiplier", no_wrap=True)
        for row in report.layers:
            t.add_row(row.name, row.kind, f"{row.macs:,}", row.multiplier or "FP32")
        console.print(t)
    console.print(f"network: {plural(layers, 'cell')}, {plural(channels, 'channel')}, "
                  f"{plural(params, 'parameter')} (without auxiliary head)", highlight=False)
    say([f"MACs per image: {report.macs:,}", f"({report.macs_quantised:,} in the 8-bit searched convolutions, "
         f"{100 * report.macs_quantised / report.macs:.1f} %)"])
    t = Table(title="multiplication energy per image")
    t.add_column("arithmetic")
    t.add_column("energy (µJ)", justify="right")
    t.add_row("FP32", f"{report.energy_fp32_pj / 1e6:.3f}")
    t.add_row("exact 8-bit in searched convs", f"{report.energy_exact8_pj / 1e6:.3f}")
    name = "genotype's multipliers" if arithmetic == GENOTYPE else next(iter(report.multipliers), "exact")
    t.add_row(f"{name} in searched convs", f"{report.energy_approx_pj / 1e6:.3f}")
    console.print(t)
    say([f"savings: {report.summary()}", f"(exact 8-bit / FP32 = "
         f"{report.energy_exact8_pj / report.energy_fp32_pj:.3f})"])
    console.print("energy per operation:", highlight=False)
    for source in energy_model.sources():
        kept = re.sub(r"(\d) (pJ|mW|nm)\b", "\\1\u00a0\\2", source)  # a number stays with its unit
        for line in textwrap.wrap(kept, console.width, initial_indent="  ", subsequent_indent="    "):
            console.print(line.replace("\u00a0", " "), highlight=False, markup=False)
