"""Accuracy with each multiplier and the arithmetic energy of a network: the paper's result table."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from approxdarts_np.approx.arithmetic import GENOTYPE, arithmetic_from_spec, split_specs
from approxdarts_np.approx.energy import EnergyReport, EnergyModel, energy_report
from approxdarts_np.approx.multipliers import bundled_names, load_multiplier
from approxdarts_np.data.cifar import load_cifar10
from approxdarts_np.errors import UserError
from approxdarts_np.nas.costs import evaluation_network_costs, network_costs
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.multiplier_choice import set_genotype_multipliers
from approxdarts_np.runs.train import load_trained_network


#: Bounds of the network ``network_energy`` counts: far beyond DARTS's 20 cells of 36 channels, and small
#: enough that the per-layer rows (about 40 per cell) stay a few MB.
MAX_ENERGY_LAYERS = 1000
MAX_ENERGY_CHANNELS = 100_000


def network_energy(genotype: Genotype, channels: int, layers: int, arithmetic: str | None = "exact",
                   energy_model: EnergyModel | None = None) -> tuple[EnergyReport, int]:
    """Energy report of the evaluation network of ``genotype`` (one 32×32 image) and its parameter count.

    ``arithmetic`` is a spec (:mod:`~approxdarts_np.approx.arithmetic`); "genotype" prices every searched conv with the multiplier its genotype names.
    The parameter count leaves out the auxiliary head (it is not used at inference). MACs and
    parameters are counted from the layer shapes (:func:`evaluation_network_costs`), so no weights
    are made. UserError for ``layers`` outside 3..MAX_ENERGY_LAYERS, ``channels`` outside
    1..MAX_ENERGY_CHANNELS, or energies too large to be finite.
    """
    if not 3 <= layers <= MAX_ENERGY_LAYERS:
        raise UserError(f"--layers must lie between 3 and {MAX_ENERGY_LAYERS:,}, got {layers}")
    if not 1 <= channels <= MAX_ENERGY_CHANNELS:
        raise UserError(f"--channels must lie between 1 and {MAX_ENERGY_CHANNELS:,}, got {channels}")
    if arithmetic == GENOTYPE and genotype.has_searched_ops and not genotype.has_multipliers:
        raise UserError("--arithmetic genotype: this genotype names no multipliers")

    def multiplier_name(spec: str) -> str | None:
        arithmetic = arithmetic_from_spec(spec)
        return arithmetic.name if arithmetic is not None else None

    costs, params = evaluation_network_costs(
        genotype, channels, layers, multiplier_name if arithmetic == GENOTYPE else None)
    mult = None if arithmetic in (None, "none", "exact", GENOTYPE) else load_multiplier(arithmetic)
    report = energy_report(costs, mult, energy_model)
    try:  # math.fsum raises OverflowError when a partial sum overflows; a sum of infinities is inf
        mul = {"FP32": report.energy_fp32_pj, "exact 8-bit": report.energy_exact8_pj,
               "approximate": report.energy_approx_pj}
        add = {"FP32": report.add_energy_fp32_pj, "exact 8-bit": report.add_energy_8bit_pj,
               "approximate": report.add_energy_8bit_pj}
        overflow = [name for name in mul if not (math.isfinite(mul[name]) and math.isfinite(mul[name] + add[name]))]
    except OverflowError:
        overflow = ["total"]
    if overflow:
        raise UserError(f"the {overflow[0]} energy of this network is not a finite number "
                        f"({report.macs:,} MACs at the given pJ per operation); give smaller energies per "
                        f"operation (--fp32-mul-pj, --int8-mul-pj)")
    return report, params


def expand_arithmetic_specs(spec: str) -> list[str]:
    """``all`` → none, exact and every bundled table; otherwise a comma-separated list (UserError if empty)."""
    if spec.strip().lower() == "all":
        return ["none", "exact"] + bundled_names()
    specs = split_specs(spec)
    if not specs:
        raise UserError(f"--arithmetic {spec!r} names no arithmetic (give e.g. none,exact,mul8u_2P7 or all)")
    return specs


def check_output_path(path: str | Path, suffixes: tuple[str, ...]) -> None:
    """UserError unless ``path`` has one of ``suffixes`` and its folder exists and is writable."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: the file name must end in {' or '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: the folder {folder} is not writable")


def evaluate_checkpoint(checkpoint: str | Path, specs: list[str] | None, data_dir: str | None = None,
                        batch_size: int = 100, energy_model: EnergyModel | None = None,
                        progress=None) -> list[dict]:
    """Test accuracy of a trained network with each arithmetic spec in its searched convolutions.

    Each row also carries the arithmetic energy of one inference in that mode
    (FP32 for ``none``) and the savings against FP32 and exact 8-bit.
    ``specs`` None: the genotype's per-op multipliers when it names any, else FP32.
    ``progress(event)`` receives ``{"event": "arithmetic", "name", "index", "total"}`` and
    ``{"event": "batch", "done", "total"}``.
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    model, config = load_trained_network(checkpoint)
    genotype = Genotype.from_dict(config.genotype)
    if specs is None:
        specs = [GENOTYPE if genotype.has_multipliers else "none"]
    # UserError before any work: every name is loaded first ("genotype" = the genotype's per-op multipliers)
    arithmetics = [(spec, None if spec == GENOTYPE else arithmetic_from_spec(spec))
                   for spec in specs]
    if GENOTYPE in specs and genotype.has_searched_ops and not genotype.has_multipliers:
        raise UserError("--arithmetic genotype: the genotype of this network names no multipliers")
    data = load_cifar10(data_dir if data_dir is not None else config.data_dir)
    rows = []
    for i, (spec, arithmetic) in enumerate(arithmetics):
        if progress:
            progress({"event": "arithmetic", "name": spec, "index": i, "total": len(arithmetics)})
        model.set_arithmetic(arithmetic)
        if spec == GENOTYPE:
            set_genotype_multipliers(model, genotype, arithmetic_from_spec)
        costs = network_costs(model)
        loss, acc = evaluate(model, data.test_x, data.test_y, batch_size,
                             progress=(lambda d, t: progress({"event": "batch", "done": d, "total": t}))
                             if progress else None)
        name = GENOTYPE if spec == GENOTYPE else (arithmetic.name if arithmetic else "none")
        row = {"arithmetic": name, "test_acc": acc, "test_loss": loss,
               "test_images": int(data.test_x.shape[0]), "energy_pj": None, "energy_fp32_pj": None,
               "energy_exact8_pj": None, "saving_vs_fp32_pct": None, "saving_vs_exact8_pct": None}
        try:
            report = energy_report(costs, arithmetic.multiplier if arithmetic else None, energy_model)
            if spec != GENOTYPE and arithmetic is None:
                report_energy = report.energy_fp32_pj
            else:
                report_energy = report.energy_approx_pj
        except UserError:
            report = None  # a circuit without a published power: accuracy only
        if report is not None:
            energy = report_energy
            row.update(energy_pj=energy, energy_fp32_pj=report.energy_fp32_pj,
                       energy_exact8_pj=report.energy_exact8_pj,
                       saving_vs_fp32_pct=100.0 * (1 - energy / report.energy_fp32_pj),
                       saving_vs_exact8_pct=100.0 * (1 - energy / report.energy_exact8_pj))
        rows.append(row)
    model.set_arithmetic(None)
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
