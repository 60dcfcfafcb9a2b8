"""Energy of one inference's arithmetic: MACs per layer times energy per operation (docs/design.md §3).

Three scenarios over the same layers:

- ``fp32``: every multiply-accumulate in FP32;
- ``exact8``: the quantised layers (the depthwise and pointwise convolutions of the searched
  sep_conv / dil_conv ops) multiply with an exact 8-bit multiplier, every other layer stays FP32;
- ``approx``: the quantised layers use their approximate multiplier, priced as
  ``int8_mul_pj * pwr(circuit) / pwr(mul8u_1JFF)`` from the EvoApproxLib published power.

Multiplications are the headline (the paper's "−53.84 % vs FP32, −5.97 % vs exact 8-bit");
the additions that every MAC implies are reported separately: an FP32 add per MAC in FP32
layers, a 32-bit integer add per MAC in quantised layers (8-bit products are 16 bit wide and
are summed over hundreds of terms, so the accumulator is 32 bit). Memory traffic and the
quantise / de-quantise work are not counted.

With the default energies the paper's two figures cannot both be met: they imply that the
exact-8-bit network costs 0.491 of the FP32 one, which leaves the 8-bit multiplies at 2.9 % of
the FP32 energy (0.2 pJ against 3.7 pJ), so even a zero-power multiplier saves at most 5.93 %
against exact 8 bit, not 5.97 %. The paper's pair implies a larger 8-bit/FP32 energy ratio
(about 0.38 pJ for a circuit at half the exact power); ``EnergyModel`` takes any values.
"""
from __future__ import annotations

import math
import numbers
import types
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping

import numpy as np

from approxdarts_np.approx.multipliers import (
    BUNDLED_PREFIX, EXACT_REFERENCE, Multiplier, load_multiplier,
)
from approxdarts_np.errors import UserError

HOROWITZ_2014 = ("M. Horowitz, \"Computing's energy problem (and what we can do about it)\", "
                 "IEEE ISSCC 2014, pp. 10-14, 45 nm")
MINUS = "\u2212"

# How messages name each EnergyModel value: by the CLI option where one exists.
_FIELD_WORDS = {
    "fp32_mul_pj": "--fp32-mul-pj (energy of an FP32 multiply, pJ)",
    "int8_mul_pj": "--int8-mul-pj (energy of an exact 8-bit multiply, pJ)",
    "fp32_add_pj": "the energy of an FP32 add (pJ)",
    "int32_add_pj": "the energy of a 32-bit integer add (pJ)",
    "reference_power_mw": "the reference power of mul8u_1JFF (mW)",
}
_POSITIVE_FIELDS = ("fp32_mul_pj", "int8_mul_pj", "reference_power_mw")


@dataclass(frozen=True)
class EnergyModel:
    """Energy per arithmetic operation (pJ) and the reference power of the exact 8-bit multiplier.

    Defaults: Horowitz, ISSCC 2014, 45 nm — FP32 multiply 3.7 pJ, FP32 add 0.9 pJ, 8-bit integer
    multiply 0.2 pJ, 32-bit integer add 0.1 pJ (the table also lists an 8-bit add at 0.03 pJ;
    it is not used because the accumulators are 32 bit). ``reference_power_mw`` is the
    published power of mul8u_1JFF, the exact 8x8 circuit the approximate ones are priced
    against. ``power_overrides_mw`` gives a power (mW, same 45 nm library) for multipliers by
    name (``"mul8u_PKY"`` or ``"PKY"``): needed for circuits without published figures and for
    user tables; it also replaces a published power. Every value can be overridden.
    """

    fp32_mul_pj: float = 3.7
    fp32_add_pj: float = 0.9
    int8_mul_pj: float = 0.2
    int32_add_pj: float = 0.1
    reference_power_mw: float = 0.391
    power_overrides_mw: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for f in fields(self):
            if f.name == "power_overrides_mw":
                continue
            value = getattr(self, f.name)
            # Multiplies and the reference power divide or are divided by: they must be > 0.
            positive = f.name in _POSITIVE_FIELDS
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise UserError(f"{_FIELD_WORDS[f.name]} must be a finite number "
                                f"{'> 0' if positive else '>= 0'}, got {value!r}")
        overrides = dict(self.power_overrides_mw)
        for name, power in overrides.items():
            if isinstance(power, bool) or not isinstance(power, (int, float)) \
                    or not math.isfinite(power) or power < 0:
                raise UserError(f"power of multiplier {name!r} must be a finite number of mW "
                                f">= 0, got {power!r}")
        object.__setattr__(self, "power_overrides_mw", types.MappingProxyType(overrides))

    def multiplier_power(self, multiplier: Multiplier) -> tuple[float, str]:
        """Return ``(power_mw, where_from)`` for ``multiplier``.

        ``where_from`` is ``"given"`` (``power_overrides_mw``), ``"published"`` (EvoApproxLib) or
        ``"exact"`` (an exact table with no power of its own costs the reference power). Raises
        UserError when none applies, e.g. for the four bundled circuits without figures.
        """
        for key in (multiplier.name, multiplier.name.removeprefix(BUNDLED_PREFIX)):
            if key in self.power_overrides_mw:
                return float(self.power_overrides_mw[key]), "given"
        published = multiplier.published
        if published is not None and published.get("pwr") is not None:
            return float(published["pwr"]), "published"
        if multiplier.is_exact:
            return float(self.reference_power_mw), "exact"
        raise UserError(f"multiplier {multiplier.name!r} has no published power, so its energy cannot "
                        "be priced; choose a circuit with published figures (listed by "
                        "`approxdarts-np multipliers`) or an exact table")

    def approx_mul_pj(self, multiplier: Multiplier) -> float:
        """Energy of one multiplication with ``multiplier``: ``int8_mul_pj * pwr / reference``."""
        power, _ = self.multiplier_power(multiplier)
        return self.int8_mul_pj * power / self.reference_power_mw

    def sources(self) -> list[str]:
        """Return the lines that say where every figure of this energy model comes from."""
        defaults = EnergyModel()

        def origin(name: str) -> str:
            return "default" if getattr(self, name) == getattr(defaults, name) else "user value"

        lines = [
            f"FP32 multiply {self.fp32_mul_pj:g} pJ ({origin('fp32_mul_pj')}), "
            f"FP32 add {self.fp32_add_pj:g} pJ ({origin('fp32_add_pj')}); defaults from "
            f"{HOROWITZ_2014}.",
            f"8-bit integer multiply {self.int8_mul_pj:g} pJ ({origin('int8_mul_pj')}), 32-bit "
            f"integer add {self.int32_add_pj:g} pJ ({origin('int32_add_pj')}) for the accumulators "
            "of the quantised layers; same source.",
            f"Approximate 8-bit multiply = {self.int8_mul_pj:g} pJ x pwr(circuit) / "
            f"{self.reference_power_mw:g} mW ({origin('reference_power_mw')}: pwr of "
            f"{EXACT_REFERENCE}); pwr as published by EvoApproxLib (Mrazek et al., DATE 2017; "
            "45 nm)" + (", or as given: " + ", ".join(
                f"{k} {v:g} mW" for k, v in sorted(self.power_overrides_mw.items()))
                if self.power_overrides_mw else "") + ".",
            "Arithmetic only: memory traffic and quantise/de-quantise work are not counted.",
        ]
        return lines

    def to_dict(self) -> dict:
        """Return the energy model as plain JSON-ready values."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["power_overrides_mw"] = dict(self.power_overrides_mw)
        return values


@dataclass(frozen=True)
class LayerCost:
    """The MACs of one layer of a network and how it runs.

    ``kind`` describes the layer (e.g. ``"conv"``, ``"depthwise"``, ``"pointwise"``,
    ``"linear"``). ``quantised`` marks a layer that runs in 8 bit in the exact and approximate
    modes (the depthwise and pointwise convolutions of the searched sep/dil conv ops);
    ``multiplier`` names its multiplier (None: the one given to :func:`energy_report`).
    """

    name: str
    kind: str
    macs: int
    quantised: bool
    multiplier: str | None = None

    def __post_init__(self):
        macs = self.macs
        if isinstance(macs, (bool, np.bool_)) or not isinstance(macs, numbers.Integral) or macs < 0:
            raise ValueError(f"layer {self.name!r}: macs must be an integer >= 0, got {macs!r}")
        if not isinstance(self.quantised, (bool, np.bool_)):
            raise ValueError(f"layer {self.name!r}: quantised must be a bool, "
                             f"got {self.quantised!r}")
        object.__setattr__(self, "macs", int(macs))
        object.__setattr__(self, "quantised", bool(self.quantised))


@dataclass(frozen=True)
class LayerEnergy:
    """One report row: a layer's MACs and its energy (pJ) in each scenario."""

    name: str
    kind: str
    macs: int
    quantised: bool
    multiplier: str | None
    mul_energy_fp32_pj: float
    mul_energy_exact8_pj: float
    mul_energy_approx_pj: float
    add_energy_fp32_pj: float
    add_energy_8bit_pj: float


def saving_pct(energy: float, baseline: float) -> float | None:
    """Return the saving of ``energy`` relative to ``baseline`` in percent (None for baseline 0)."""
    if baseline == 0:
        return None
    return 100.0 * (1.0 - energy / baseline)


def format_saving(pct: float | None) -> str:
    """Format a saving the paper's way: a 53.84 % saving is ``"−53.84 %"``, a rise ``"+…"``."""
    if pct is None:
        return "n/a"
    change = -pct
    if change == 0:
        return "0.00 %"
    sign = MINUS if change < 0 else "+"
    return f"{sign}{abs(change):.2f} %"


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer rows and network totals for the FP32, exact 8-bit and approximate scenarios.

    ``energy_*_pj`` count multiplications only; additions are in ``add_energy_*_pj`` and the
    ``energy_with_adds_*_pj`` totals. ``multipliers`` maps each multiplier used by a quantised
    layer to its power, where the power came from, and its energy per multiplication.
    """

    layers: tuple[LayerEnergy, ...]
    multipliers: Mapping[str, Mapping[str, float | str]]
    energy_model: EnergyModel

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.layers)

    @property
    def macs_quantised(self) -> int:
        return sum(row.macs for row in self.layers if row.quantised)

    @property
    def energy_fp32_pj(self) -> float:
        return math.fsum(row.mul_energy_fp32_pj for row in self.layers)

    @property
    def energy_exact8_pj(self) -> float:
        return math.fsum(row.mul_energy_exact8_pj for row in self.layers)

    @property
    def energy_approx_pj(self) -> float:
        return math.fsum(row.mul_energy_approx_pj for row in self.layers)

    @property
    def add_energy_fp32_pj(self) -> float:
        return math.fsum(row.add_energy_fp32_pj for row in self.layers)

    @property
    def add_energy_8bit_pj(self) -> float:
        return math.fsum(row.add_energy_8bit_pj for row in self.layers)

    @property
    def saving_vs_fp32_pct(self) -> float | None:
        return saving_pct(self.energy_approx_pj, self.energy_fp32_pj)

    @property
    def saving_vs_exact8_pct(self) -> float | None:
        return saving_pct(self.energy_approx_pj, self.energy_exact8_pj)

    def summary(self) -> str:
        """The headline in the paper's form: ``"−53.84 % vs FP32, −5.97 % vs exact 8-bit"``."""
        return (f"{format_saving(self.saving_vs_fp32_pct)} vs FP32, "
                f"{format_saving(self.saving_vs_exact8_pct)} vs exact 8-bit")

    def to_dict(self) -> dict:
        """Return the report as JSON-ready values with self-describing keys."""
        with_adds_fp32 = self.energy_fp32_pj + self.add_energy_fp32_pj
        with_adds_exact8 = self.energy_exact8_pj + self.add_energy_8bit_pj
        with_adds_approx = self.energy_approx_pj + self.add_energy_8bit_pj
        return {
            "macs": self.macs,
            "macs_quantised": self.macs_quantised,
            "energy_fp32_pj": self.energy_fp32_pj,
            "energy_exact8_pj": self.energy_exact8_pj,
            "energy_approx_pj": self.energy_approx_pj,
            "saving_vs_fp32_pct": self.saving_vs_fp32_pct,
            "saving_vs_exact8_pct": self.saving_vs_exact8_pct,
            "summary": self.summary(),
            "add_energy_fp32_pj": self.add_energy_fp32_pj,
            "add_energy_8bit_pj": self.add_energy_8bit_pj,
            "energy_with_adds_fp32_pj": with_adds_fp32,
            "energy_with_adds_exact8_pj": with_adds_exact8,
            "energy_with_adds_approx_pj": with_adds_approx,
            "saving_with_adds_vs_fp32_pct": saving_pct(with_adds_approx, with_adds_fp32),
            "saving_with_adds_vs_exact8_pct": saving_pct(with_adds_approx, with_adds_exact8),
            "multipliers": {name: dict(info) for name, info in self.multipliers.items()},
            "layers": [asdict(row) for row in self.layers],
            "energy_model": self.energy_model.to_dict(),
            "sources": self.energy_model.sources(),
        }


def energy_report(layers: list[LayerCost], multiplier: Multiplier | None = None,
                  energy_model: EnergyModel | None = None) -> EnergyReport:
    """Return the energy of ``layers`` in the FP32, exact 8-bit and approximate scenarios.

    A quantised layer's multiplier is its own ``multiplier`` name (loaded with
    :func:`load_multiplier`) or else ``multiplier``; with neither it is the exact one, so the
    approximate scenario equals the exact one. Raises UserError for an unknown multiplier name
    or a multiplier without a known power.
    """
    prices = EnergyModel() if energy_model is None else energy_model
    resolved: dict[str, Multiplier] = {}
    if multiplier is not None:
        resolved[multiplier.name] = multiplier

    def resolve(layer: LayerCost) -> Multiplier:
        if layer.multiplier is None:
            return multiplier if multiplier is not None else load_multiplier("exact")
        if layer.multiplier not in resolved:
            resolved[layer.multiplier] = load_multiplier(layer.multiplier)
        return resolved[layer.multiplier]

    used: dict[str, dict[str, float | str]] = {}
    rows = []
    for layer in layers:
        fp32_mul = layer.macs * prices.fp32_mul_pj
        fp32_add = layer.macs * prices.fp32_add_pj
        if layer.quantised:
            mult = resolve(layer)
            if mult.name not in used:
                power, where_from = prices.multiplier_power(mult)
                used[mult.name] = {"power_mw": power, "power_source": where_from,
                                   "mul_pj": prices.approx_mul_pj(mult)}
            rows.append(LayerEnergy(
                name=layer.name, kind=layer.kind, macs=layer.macs, quantised=True,
                multiplier=mult.name, mul_energy_fp32_pj=fp32_mul,
                mul_energy_exact8_pj=layer.macs * prices.int8_mul_pj,
                mul_energy_approx_pj=layer.macs * float(used[mult.name]["mul_pj"]),
                add_energy_fp32_pj=fp32_add, add_energy_8bit_pj=layer.macs * prices.int32_add_pj))
        else:
            rows.append(LayerEnergy(
                name=layer.name, kind=layer.kind, macs=layer.macs, quantised=False,
                multiplier=None, mul_energy_fp32_pj=fp32_mul, mul_energy_exact8_pj=fp32_mul,
                mul_energy_approx_pj=fp32_mul, add_energy_fp32_pj=fp32_add,
                add_energy_8bit_pj=fp32_add))
    return EnergyReport(layers=tuple(rows), multipliers=types.MappingProxyType(used),
                        energy_model=prices)
