"""First-order ApproxDARTS search: the bilevel step, its state and its result files.

Each step reads like the paper: an *architecture step* (α follows the gradient
of the loss on an architecture-val batch at the current weights, Adam) then a
*weight step* (w follows the gradient of the loss on a weight-train batch,
SGD with momentum, cosine learning rate, gradient-norm clipping).

The epochs, checkpoints, interrupts and resume are the run loop's
(:mod:`approxdarts_np.runs.loop`). Determinism: batch ``s`` of epoch ``e``
depends only on (seed, e, s) and every kernel is deterministic for a fixed
thread count, so a run resumed from a checkpoint ends bit-identical to an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from approxdarts_np.approx.arithmetic import arithmetic_from_spec, is_fp32, split_specs
from approxdarts_np.autodiff import Tensor, no_grad
from approxdarts_np.autodiff import functional as F
from approxdarts_np.data.augment import AugmentConfig, BatchLoader
from approxdarts_np.data.cifar import load_cifar10, search_split
from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import save_tree, write_text
from approxdarts_np.kernels.threads import configure_threads
from approxdarts_np.nas.budget import DualAscent, allocate_by_sensitivity, energy_ratio, gumbel_temperature, \
    parameter_free_share, project_to_budget
from approxdarts_np.nas.model_search import NUM_EDGES, Network
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.multiplier_choice import (SEARCHED_OPS, MultiplierNetwork, argmax_energy_ratio,
                                                  multiplier_sensitivity, network_expected_energy, searched_op_macs)
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.nn import SGD, Adam, clip_grad_norm, cosine_lr
from approxdarts_np.runs.config import RunConfig, RunSettings, resolve_run_config, setting
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.runs.first_run import compile_split
from approxdarts_np.runs.loop import ProgressCallback, RunLoop, StepResult
from approxdarts_np.runs.memory import check_memory, search_memory_bytes
from approxdarts_np.runs.replicas import loss_and_backward
from approxdarts_np.runs.unrolled import unrolled_architecture_step


_CHOICE_STREAM = 7  # random stream of the per-step multiplier draws


def parse_temperature(text: str) -> dict:
    """``--gumbel-temperature T`` or ``START:END`` as config fields (UserError for anything else)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UserError(f"--gumbel-temperature must be a number T or START:END, got {text!r}")
    return {"gumbel_temperature": values[0], "gumbel_temperature_end": values[-1] if len(values) == 2 else None}


@dataclass
class SearchConfig(RunSettings, RunConfig):
    """Every setting of a search (:class:`~approxdarts_np.runs.config.RunSettings` and these).
    ``quick()`` fits a CPU in minutes; ``paper()`` is DARTS's."""

    arch_lr: float = setting(3e-4, "Adam learning rate of α.")
    arch_weight_decay: float = setting(1e-3, "Weight decay of α.")
    arch_betas: tuple[float, float] = (0.5, 0.999)
    multipliers: str | None = setting(
        None, "Candidate multipliers, comma-separated (e.g. exact,mul8u_2P7,mul8u_17KS): the search also chooses "
        "the multiplier of every searched op (β, straight-through Gumbel).", shown=False)
    energy_weight: float = setting(0.0, "λ of the energy term λ·E/E_ref in the architecture loss.")
    energy_target: float | None = setting(
        None, "Expected energy per image (pJ) above which the energy term acts (instead of everywhere).",
        shown=False)
    energy_budget: float | None = setting(
        None, "r in (0, 1]: the searched convolutions may spend at most r times their exact-8-bit multiplication "
        "energy on the 20-cell, 36-channel network. λ is found by dual ascent; "
        "the genotype's multipliers are then allocated within the budget (--allocation). Needs --multipliers.",
        shown=False)
    budget_step: float = setting(
        1.0, "η of the dual ascent λ ← max(0, λ + η·(ratio − r)), per architecture step (ratio: the genotype's "
        "now).")
    energy_scope: str = setting(
        "beta", "What the energy term moves: beta (the multipliers only) or all (the ops too; it then deletes "
        "convolutions).")
    max_parameter_free: int = setting(
        2, "At most N pools/skips per cell in the genotype; the weakest beyond N become the edge's best conv.")
    warmup_epochs: int | None = setting(
        None, "First epochs train the weights only (α and β frozen; multipliers still drawn).",
        shown="a quarter of --epochs with --multipliers, else 0")
    beta_lr: float = setting(0.01, "Adam learning rate of β (the multiplier logits).")
    gumbel_temperature: float = setting(
        1.0, "τ of the straight-through Gumbel-softmax over β: T, or START:END (geometric from the first to the "
        "last epoch).", text=str, parse=parse_temperature)
    gumbel_temperature_end: float | None = None  # τ of the last epoch (None: constant); set by START:END
    budget_channels: int = 36  # the evaluation network on which the budget is checked (DARTS: 36 channels,
    budget_layers: int = 20  # 20 cells)
    allocation: str = setting(
        "sensitivity", "How a budget's multipliers are chosen: sensitivity (after the last epoch, each kept op's "
        "loss increase with each candidate is measured and a greedy knapsack fills the budget) or beta (argmax β, "
        "projected into the budget).")
    sensitivity_images: int = setting(128, "Architecture-val images the sensitivities are measured on.")
    order: int = setting(
        1, "Architecture gradient: 1 = first order, 2 = DARTS's unrolled second order (about 2-3x a step).")
    unrolled_lr: float | None = setting(None, "ξ of the virtual step with --order 2.",
                                        shown="the current weight learning rate")
    workers: int = setting(
        1, "Split every step over N Ray workers by image (each with --threads threads; pip install -e "
        "\".[sweep]\").")

    # Settings added after runs were saved, with the value that reproduces what such a run did.
    LEGACY: ClassVar[dict] = dict(energy_scope="all", max_parameter_free=8, warmup_epochs=0)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        """As :meth:`RunConfig.from_dict`; a config saved before a setting existed resumes as it ran then."""
        if isinstance(d, dict) and "energy_scope" not in d:
            d = {**cls.LEGACY, "beta_lr": d.get("arch_lr", cls.arch_lr), **d}
        return super().from_dict(d, source)

    def warmup(self) -> int:
        """Epochs of weights only: ``warmup_epochs``, or by default a quarter of the epochs of a search that
        chooses multipliers (0 for a plain search, as DARTS)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return self.epochs // 4 if len(self.candidate_specs()) > 1 else 0

    def temperature(self, epoch: int) -> float:
        end = self.gumbel_temperature if self.gumbel_temperature_end is None else self.gumbel_temperature_end
        return gumbel_temperature(epoch, self.epochs, self.gumbel_temperature, end)

    def candidate_specs(self) -> list[str]:
        """The candidate multipliers of ``--multipliers`` (empty without it)."""
        if self.multipliers is None:
            return []
        return split_specs(self.multipliers)

    PAPER: ClassVar[dict] = dict(epochs=50, channels=16, layers=8, batch_size=64, max_train_images=None)

    def validate(self) -> None:
        """Raise UserError for settings that cannot run."""
        self.validate_common()
        if not self.arch_lr > 0:
            raise UserError(f"--arch-lr must be positive, got {self.arch_lr}")
        if self.arch_weight_decay < 0:
            raise UserError(f"--arch-weight-decay must be >= 0, got {self.arch_weight_decay}")
        if self.order not in (1, 2):
            raise UserError(f"--order must be 1 (first order) or 2 (unrolled, second order), got {self.order}")
        if self.unrolled_lr is not None and not (math.isfinite(self.unrolled_lr) and self.unrolled_lr > 0):
            raise UserError(f"--unrolled-lr must be a positive finite number, got {self.unrolled_lr}")
        if self.multipliers is not None:
            if not self.candidate_specs():
                raise UserError(f"--multipliers {self.multipliers!r} names no multiplier "
                                f"(give e.g. exact,mul8u_2P7,mul8u_17KS)")
            if not is_fp32(self.arithmetic):
                raise UserError("give either --arithmetic (one for every searched convolution) or --multipliers "
                                "(a choice per searched op), not both")
            if any(is_fp32(spec) for spec in self.candidate_specs()):
                raise UserError("--multipliers chooses among 8-bit multipliers: 'none' (FP32) cannot be one")
        if self.energy_weight < 0:
            raise UserError(f"--energy-weight must be >= 0, got {self.energy_weight}")
        if self.energy_target is not None and not self.energy_target > 0:
            raise UserError(f"--energy-target must be a positive number of pJ, got {self.energy_target}")
        if self.energy_target is not None and self.energy_weight == 0:
            raise UserError("--energy-target needs an --energy-weight > 0 to act")
        if not self.gumbel_temperature > 0 or not (self.gumbel_temperature_end is None
                                                   or self.gumbel_temperature_end > 0):
            raise UserError(f"--gumbel-temperature must be positive, got {self.gumbel_temperature}"
                            + ("" if self.gumbel_temperature_end is None else f":{self.gumbel_temperature_end}"))
        choosing = len(self.candidate_specs()) > 1
        if self.energy_scope not in ("beta", "all"):
            raise UserError(f"--energy-scope must be beta (the energy term moves the multipliers only) or all "
                            f"(it moves the ops too), got {self.energy_scope!r}")
        if self.energy_weight > 0 and self.energy_scope == "beta" and not choosing:
            raise UserError("--energy-weight with one multiplier has no multiplier to choose: give --multipliers "
                            "(two or more) or --energy-scope all (the energy term then moves the ops)")
        if self.energy_budget is not None:
            if not 0 < self.energy_budget <= 1:
                raise UserError(f"--energy-budget must lie in (0, 1] (a share of the exact-8-bit energy), "
                                f"got {self.energy_budget}")
            if not choosing:
                raise UserError("--energy-budget needs --multipliers with two or more candidates to choose from")
            if self.energy_weight > 0:
                raise UserError("give either --energy-budget (λ is then found by the search) or --energy-weight "
                                "(a fixed λ), not both")
        if self.allocation not in ("sensitivity", "beta"):
            raise UserError(f"--allocation must be sensitivity (measured loss increases) or beta (argmax β, "
                            f"projected), got {self.allocation!r}")
        if self.sensitivity_images < 1:
            raise UserError(f"--sensitivity-images must be at least 1, got {self.sensitivity_images}")
        if not self.budget_step > 0:
            raise UserError(f"--budget-step must be positive, got {self.budget_step}")
        if not 0 <= self.max_parameter_free <= 8:
            raise UserError(f"--max-parameter-free must lie in 0..8 (ops per cell), got {self.max_parameter_free}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"--warmup-epochs must lie in 0..{self.epochs - 1} (fewer than --epochs "
                            f"{self.epochs}), got {self.warmup_epochs}")
        if not self.beta_lr > 0:
            raise UserError(f"--beta-lr must be positive, got {self.beta_lr}")
        if self.budget_channels <= 0 or self.budget_layers < 3:
            raise UserError(f"the budget's network needs channels > 0 and at least 3 cells, got "
                            f"{self.budget_channels} channels and {self.budget_layers} cells")
        if self.order == 2 and (self.energy_weight > 0 or len(self.candidate_specs()) > 1):
            raise UserError("--order 2 works with --arithmetic; with --multipliers (K > 1) or --energy-weight "
                            "use --order 1")
        if not 1 <= self.workers <= self.batch_size:
            raise UserError(f"--workers must lie between 1 and --batch-size {self.batch_size} (each takes a share "
                            f"of every batch), got {self.workers}")
        if not all(0 <= b < 1 for b in self.arch_betas):
            raise UserError(f"the Adam betas of α must lie in [0, 1), got {self.arch_betas}")
        check_memory(search_memory_bytes(self), "search")


def architecture_step(model: Network, optimizers, images, labels, penalty=None) -> tuple[float, int]:
    """Update α (and β) with the gradient of the val-batch loss at the current weights (first order).

    ``optimizers``: one Adam, or a list (α's and β's, each with its own learning rate). ``penalty()``,
    when given, returns a differentiable term added to the loss (the energy term of a multiplier-aware
    search); the returned loss is the cross-entropy alone.
    """
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss, correct = _loss_and_grad(model, images, labels, frozen=model.weights(), penalty=penalty)
    if math.isfinite(loss):
        for optimizer in optimizers:
            optimizer.step()
    return loss, correct


def weight_step(model: Network, optimizer: SGD, images, labels, grad_clip: float) -> tuple[float, int]:
    """Update w with the gradient of the train-batch loss, clipped to ``grad_clip`` in norm."""
    optimizer.zero_grad()
    loss, correct = _loss_and_grad(model, images, labels, frozen=model.arch_parameters())
    if math.isfinite(loss):
        clip_grad_norm(model.weights(), grad_clip)
        optimizer.step()
    return loss, correct


def _loss_and_grad(model: Network, images, labels, frozen, penalty=None) -> tuple[float, int]:
    """Cross-entropy of a batch (plus ``penalty()``) and its backward; ``frozen`` parameters get no gradient."""
    for p in frozen:
        p.requires_grad = False
    try:
        return loss_and_backward(model, images, labels, penalty)
    finally:
        for p in frozen:
            p.requires_grad = True


class Searcher:
    """The search as a run-loop task: data, supernet and both optimizers; one step = α step + w step."""

    kind = "search"

    def __init__(self, config: SearchConfig, arithmetic=None, candidates=None, energy: dict | None = None):
        """``arithmetic``: one arithmetic for every searched conv (None: float32); ``candidates``: K ≥ 2
        arithmetics to choose from per searched op; ``energy``: ``{"pj": per-candidate pJ, "exact_pj"}``
        pricing the expected energy (needed when ``config.energy_weight > 0``)."""
        config.validate()
        self.config = config
        data = load_cifar10(config.data_dir)
        n_train = config.train_images(data.train_x.shape[0])
        train_idx, val_idx = search_split(n_train)
        half = min(train_idx.size, val_idx.size)
        if config.batch_size > half:
            raise UserError(f"--batch-size {config.batch_size} is larger than each half of the search "
                            f"split ({half} images)")
        augment = AugmentConfig(crop_padding=4, flip=True, cutout_length=0)
        # Both halves use the DARTS search augmentation (crop + flip) and drop a ragged last batch.
        self.train_loader = BatchLoader(data.train_x, data.train_y, config.batch_size, seed=config.seed,
                                        stream=0, indices=train_idx, augment=augment, drop_last=True)
        self.val_loader = BatchLoader(data.train_x, data.train_y, config.batch_size, seed=config.seed,
                                      stream=1, indices=val_idx, augment=augment, drop_last=True)
        self.steps_per_epoch = min(len(self.train_loader), len(self.val_loader))
        if candidates:
            self.model = MultiplierNetwork(config.channels, 10, config.layers, candidates=candidates,
                                           seed=config.seed, temperature=config.gumbel_temperature)
        else:
            self.model = Network(config.channels, 10, config.layers, arithmetic=arithmetic, seed=config.seed)
        self.choosing = isinstance(self.model, MultiplierNetwork)
        self.arithmetic = arithmetic  # every searched conv's, when not choosing (None: float32)
        self.energy = energy
        self.macs = searched_op_macs(self.model) if energy is not None else None
        self.w_optimizer = SGD(self.model.weights(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
        alphas = [self.model.alphas_normal, self.model.alphas_reduce]
        self.a_optimizer = Adam(alphas, lr=config.arch_lr, betas=config.arch_betas,
                                weight_decay=config.arch_weight_decay)
        # β (the multiplier logits) has a learning rate of its own: at α's, two epochs moved it by 1e-3
        self.b_optimizer = Adam([self.model.betas_normal, self.model.betas_reduce], lr=config.beta_lr,
                                betas=config.arch_betas, weight_decay=config.arch_weight_decay) \
            if self.choosing else None
        self.warmup_epochs = config.warmup()
        self.sensitivity: dict | None = None  # {"ops": genotype without multipliers, "increase": {...}}
        self.dual = DualAscent(config.energy_budget, config.budget_step) if config.energy_budget is not None \
            else None
        self.alpha_history: list = []  # (normal, reduce) α after each finished epoch
        self.beta_history: list = []  # (normal, reduce) β after each finished epoch (multiplier choice)

    def parameter_count(self) -> int:
        return sum(p.size for p in self.model.weights())

    # ------------------------------------------------------------- the task
    def begin_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.w_optimizer.lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs)
        self.model.train()
        begun = {"lr": self.w_optimizer.lr}
        if self.choosing:
            self.model.temperature = begun["gumbel_temperature"] = cfg.temperature(epoch)
        if epoch < self.warmup_epochs:
            begun["warmup"] = True
        return begun

    def step(self, epoch: int, step: int) -> StepResult:
        # architecture step on an architecture-val batch, then weight step on a weight-train batch
        cfg = self.config
        val_batch, train_batch = self.val_loader.batch(epoch, step), self.train_loader.batch(epoch, step)
        if self.choosing:  # one sampled multiplier per searched op for both halves of the step
            self.model.choose(np.random.default_rng([cfg.seed, epoch, step, _CHOICE_STREAM]))
        arch = {}
        if epoch >= self.warmup_epochs:  # during warm-up: weights only, on the multipliers drawn above
            a_loss, a_correct = self.architecture_step(epoch, val_batch, train_batch)
            if not math.isfinite(a_loss):
                return StepResult(losses={"arch_loss": a_loss}, sums={})
            arch = {"arch_loss": a_loss, "arch_correct": a_correct}
        t_loss, t_correct = weight_step(self.model, self.w_optimizer, *train_batch, grad_clip=cfg.grad_clip)
        bs = cfg.batch_size
        losses = {"train_loss": t_loss}
        sums = {"train_loss": t_loss * bs, "train_correct": t_correct, "seen": bs}
        shown = {"train_loss": t_loss, "train_acc": t_correct / bs}
        if arch:
            losses["arch_loss"] = shown["arch_loss"] = arch["arch_loss"]
            sums.update(arch_loss=arch["arch_loss"] * bs, arch_correct=arch["arch_correct"])
        return StepResult(losses=losses, sums=sums, shown=shown)

    def architecture_step(self, epoch: int, val_batch, train_batch) -> tuple[float, int]:
        """α (and β) on the val batch: DARTS's unrolled step with ``--order 2``, else first order with the
        energy term; with a budget, λ then follows the ratio of the genotype the step leads to."""
        cfg = self.config
        if cfg.order == 2:
            # DARTS: the virtual step uses the same weight-train batch and, by default, the current lr
            xi = cfg.unrolled_lr if cfg.unrolled_lr is not None else self.w_optimizer.lr
            return unrolled_architecture_step(self.model, self.a_optimizer, self.w_optimizer,
                                              train_batch, val_batch, xi)
        penalty = self.energy_penalty if cfg.energy_weight > 0 or self.dual is not None else None
        optimizers = [self.a_optimizer] + ([self.b_optimizer] if self.choosing else [])
        a_loss, a_correct = architecture_step(self.model, optimizers, *val_batch, penalty=penalty)
        if self.dual is not None and math.isfinite(a_loss):
            # the budget holds for what the search returns (argmax α and β, on the budget's network),
            # not for the mixture
            self.dual.update(self.genotype_ratio())
        return a_loss, a_correct

    def energy_penalty(self) -> Tensor:
        """The energy term of the architecture loss (E_ref a constant normaliser):

        - with a budget, λ·E/E_ref with the dual ascent's current λ;
        - otherwise λ·E/E_ref with λ = ``--energy-weight``, or λ·max(0, E − target)/E_ref with a target.

        With the default scope (``beta``) the op probabilities in E are constants, so the term moves the
        multipliers only and α's gradient is the task loss's alone.
        """
        cfg = self.config
        energy, reference = network_expected_energy(self.model, self.macs, self.energy["pj"],
                                                    self.energy["exact_pj"], ops_fixed=cfg.energy_scope == "beta")
        if self.dual is not None:
            return energy * (self.dual.value / reference)
        if cfg.energy_target is not None:
            energy = F.relu(energy - cfg.energy_target)
        return energy * (cfg.energy_weight / reference)

    def energy_figures(self) -> dict:
        """Expected energy of the searched convs now (pJ per image), its exact-8-bit reference and ratio;
        with a budget also λ and the ratio of the derived genotype on the budget's network."""
        if self.energy is None:
            return {}
        with no_grad():
            energy, reference = network_expected_energy(self.model, self.macs, self.energy["pj"],
                                                        self.energy["exact_pj"])
        figures = {"expected_energy_pj": energy.item(), "reference_energy_pj": reference,
                   "energy_ratio": energy.item() / reference}
        if self.dual is not None:
            figures["lagrange_multiplier"] = self.dual.value
        if self.choosing:
            figures["energy_ratio_argmax"] = self.argmax_ratio()
            cfg = self.config
            figures["genotype_energy_ratio_argmax"] = self.genotype_ratio()
            genotype, moves = self.genotype_and_moves()
            figures["genotype_energy_ratio"] = energy_ratio(
                genotype, self.prices(), self.energy["exact_pj"], cfg.budget_channels, cfg.budget_layers)
            figures["projection_moves"] = len(moves)
            if self.sensitivity is not None and self.dual is not None:
                projected, _ = self.beta_projection(self.model.genotype(cfg.max_parameter_free))
                figures["genotype_beta_projected"] = projected.to_dict()
                figures["genotype_beta_projected_energy_ratio"] = energy_ratio(
                    projected, self.prices(), self.energy["exact_pj"], cfg.budget_channels, cfg.budget_layers)
                figures["sensitivity"] = {f"{kind}:{k}": [float(x) for x in losses]
                                          for (kind, k), losses in sorted(self.sensitivity["increase"].items())}
        return figures

    def argmax_ratio(self) -> float:
        """E/E_ref of the supernet with every searched op on its argmax-β multiplier (op weights soft)."""
        return argmax_energy_ratio(self.model, self.macs, self.energy["pj"], self.energy["exact_pj"])

    def genotype_ratio(self) -> float:
        """Energy ratio of the derived genotype before projection, on the budget's network."""
        cfg = self.config
        return energy_ratio(self.model.genotype(cfg.max_parameter_free), self.prices(), self.energy["exact_pj"],
                            cfg.budget_channels, cfg.budget_layers)

    def prices(self) -> dict[str, float]:
        """Energy per multiply of each candidate, by name."""
        return {a.name: float(pj) for a, pj in zip(self.model.candidates, self.energy["pj"])}

    def genotype_and_moves(self):
        """The derived genotype (parameter-free ops capped; with a budget, projected into it) and the
        projection's moves."""
        cfg = self.config
        genotype = self.model.genotype(cfg.max_parameter_free)
        if self.dual is None:
            return genotype, []
        measured = self.sensitivity
        if measured is not None and measured["ops"] == genotype.without_multipliers():
            return allocate_by_sensitivity(genotype, measured["increase"], list(self.prices()), self.energy["pj"],
                                           self.energy["exact_pj"], cfg.energy_budget, cfg.budget_channels,
                                           cfg.budget_layers)
        return self.beta_projection(genotype)

    def beta_projection(self, genotype):
        """The genotype's argmax-β multipliers, projected into the budget (smallest β margin first)."""
        cfg = self.config
        betas = {"normal": self.model.betas_normal.data, "reduce": self.model.betas_reduce.data}
        return project_to_budget(genotype, betas, list(self.prices()), self.energy["pj"],
                                 self.energy["exact_pj"], cfg.energy_budget, cfg.budget_channels,
                                 cfg.budget_layers)

    def measure_sensitivity(self) -> None:
        """Loss increases of the derived genotype's kept searched ops with each candidate, on the first
        ``sensitivity_images`` architecture-val images, for :func:`allocate_by_sensitivity`.

        The batches are normalised with their own statistics (training-mode BN, as in the search's
        steps and as the final network will renormalise whatever its multipliers do to the scale), so
        a loss increase measures the damage a multiplier does, not a mismatch with running statistics
        gathered under the mix of multipliers. Nothing of the model changes: the BN running statistics
        the forward passes update are restored.
        """
        cfg = self.config
        genotype = self.model.genotype(cfg.max_parameter_free)
        v = self.val_loader
        loader = BatchLoader(v.x, v.y, min(64, cfg.sensitivity_images), seed=0,
                             indices=v.indices[:cfg.sensitivity_images], augment=None, shuffle=False)
        saved = self.model.state_dict()

        def loss_of() -> float:
            total, seen = 0.0, 0
            with no_grad():
                for _, x, y in loader.iter_epoch(0):
                    total += F.cross_entropy(self.model(Tensor(x)), y).item() * len(y)
                    seen += len(y)
            return total / seen

        was_training = self.model.training
        self.model.train()
        try:
            increase = multiplier_sensitivity(self.model, genotype, loss_of, int(np.argmax(self.energy["pj"])))
        finally:
            self.model.load_state_dict(saved)
            self.model.train(was_training)
        self.sensitivity = {"ops": genotype.without_multipliers(), "increase": increase}

    def genotype(self):
        return self.genotype_and_moves()[0]

    def end_epoch(self, epoch: int, sums: dict, begun: dict) -> dict:
        cfg = self.config
        if self.choosing:
            self.model.choose_most_likely()
        if self.dual is not None and cfg.allocation == "sensitivity" and epoch == cfg.epochs - 1:
            self.measure_sensitivity()
        val_loss, val_acc = self.evaluate_val()
        self.alpha_history.append([self.model.alphas_normal.data.copy(), self.model.alphas_reduce.data.copy()])
        record_extra = self.energy_figures()
        if self.choosing:
            self.beta_history.append([self.model.betas_normal.data.copy(), self.model.betas_reduce.data.copy()])
            probs = self.model.multiplier_probabilities()
            record_extra["multiplier_probabilities"] = {
                kind: np.round(p, 6).tolist() for kind, p in probs.items()}
        genotype = self.genotype()
        seen = sums["seen"]
        arch = {"arch_step_loss": sums["arch_loss"] / seen, "arch_step_acc": sums["arch_correct"] / seen} \
            if "arch_loss" in sums else {"arch_step_loss": None, "arch_step_acc": None}
        return {"train_loss": sums["train_loss"] / seen, "train_acc": sums["train_correct"] / seen, **arch,
                "val_loss": val_loss, "val_acc": val_acc, "genotype": genotype.to_darts_string(),
                "skip_pool_share": parameter_free_share(genotype),
                "skip_pool_share_uncapped": parameter_free_share(self.model.genotype()), **record_extra}

    def evaluate_val(self) -> tuple[float, float]:
        """Loss and accuracy on the whole architecture-val half, eval mode (running BN statistics)."""
        v = self.val_loader
        return evaluate(self.model, v.x, v.y, self.config.batch_size, indices=v.indices)

    # ------------------------------------------------------------- state and files
    def state_tree(self) -> dict:
        extra = {}
        if self.choosing:
            k = len(self.model.candidates)
            extra["beta_history"] = np.array(self.beta_history, dtype=np.float32).reshape(
                -1, 2, NUM_EDGES, len(SEARCHED_OPS), k)
            extra["b_optimizer"] = self.b_optimizer.state_dict()
        if self.dual is not None:
            extra["dual"] = {"lagrange_multiplier": self.dual.value}
        if self.sensitivity is not None:
            extra["sensitivity"] = json.dumps({
                "ops": self.sensitivity["ops"].to_dict(),
                "increase": [[kind, k, [float(x) for x in losses]]
                             for (kind, k), losses in sorted(self.sensitivity["increase"].items())]})
        return {**extra,
                "alpha_history": np.array(self.alpha_history, dtype=np.float32).reshape(-1, 2, NUM_EDGES,
                                                                                      len(PRIMITIVES)),
                "model": self.model.state_dict(),
                "w_optimizer": self.w_optimizer.state_dict(),
                "a_optimizer": self.a_optimizer.state_dict()}

    def load_state_tree(self, tree: dict) -> None:
        self.model.load_state_dict(tree["model"])
        self.w_optimizer.load_state_dict(tree["w_optimizer"])
        a_state = tree["a_optimizer"]
        if self.choosing and "b_optimizer" not in tree:
            # a checkpoint from before β had its own optimizer: one Adam over α and β, α's entries first
            b_state = {"lr": self.config.beta_lr, "steps": a_state["steps"], "state": a_state["state"][2:]}
            a_state = {**a_state, "state": a_state["state"][:2]}
            self.b_optimizer.load_state_dict(b_state)
        elif self.choosing:
            self.b_optimizer.load_state_dict(tree["b_optimizer"])
        self.a_optimizer.load_state_dict(a_state)
        if self.dual is not None:
            self.dual.value = float(tree["dual"]["lagrange_multiplier"])
        if "sensitivity" in tree:
            saved = json.loads(tree["sensitivity"])
            self.sensitivity = {"ops": Genotype.from_dict(saved["ops"]),
                                "increase": {(kind, k): np.array(losses) for kind, k, losses in saved["increase"]}}
        self.alpha_history = [list(a) for a in np.asarray(tree["alpha_history"])]
        if self.choosing:
            self.beta_history = [list(b) for b in np.asarray(tree["beta_history"])]
            self.model.choose_most_likely()

    def write_results(self, folder: Path) -> None:
        """alpha.h5, genotype.json and genotype.txt for the epochs done so far."""
        genotype = self.genotype()
        write_text(folder / "genotype.json", genotype.to_json() + "\n")
        write_text(folder / "genotype.txt", genotype.to_text() + "\n")
        history = np.array(self.alpha_history, dtype=np.float32).reshape(-1, 2, NUM_EDGES, len(PRIMITIVES))
        save_tree(folder / "alpha.h5", {
            "primitives": list(PRIMITIVES),
            "alphas_normal": self.model.alphas_normal.data,
            "alphas_reduce": self.model.alphas_reduce.data,
            "alphas_normal_history": history[:, 0],
            "alphas_reduce_history": history[:, 1],
            **self._beta_tree(),
        })

    def _beta_tree(self) -> dict:
        if not self.choosing:
            return {}
        m = self.model
        history = np.array(self.beta_history, dtype=np.float32).reshape(
            -1, 2, NUM_EDGES, len(SEARCHED_OPS), len(m.candidates))
        return {"multipliers": [a.name for a in m.candidates], "searched_ops": list(SEARCHED_OPS),
                "betas_normal": m.betas_normal.data, "betas_reduce": m.betas_reduce.data,
                "betas_normal_history": history[:, 0], "betas_reduce_history": history[:, 1]}

    def summary(self, metrics: list) -> dict:
        last = metrics[-1] if metrics else {}
        genotype = self.genotype()
        return {"val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
                "train_acc": last.get("train_acc"), "genotype": genotype.to_dict(),
                "genotype_string": genotype.to_darts_string()}


def energy_prices(arithmetics: list, required) -> dict | None:
    """``{"pj": energy per multiply of each arithmetic, "exact_pj"}`` from the default energy model.

    None (float32) costs an FP32 multiply. A multiplier without a published power raises
    UserError when ``required``; otherwise the energy figures are left out (None).
    """
    from approxdarts_np.approx.energy import EnergyModel
    prices = EnergyModel()
    try:
        pj = [prices.fp32_mul_pj if a is None else prices.approx_mul_pj(a.multiplier) for a in arithmetics]
    except UserError:
        if required:
            raise
        return None
    return {"pj": np.array(pj, dtype=np.float64), "exact_pj": prices.int8_mul_pj}


def build_searcher(config: SearchConfig) -> Searcher:
    """The search task of ``config``: its arithmetic or candidates, their energy prices, data and supernet.
    UserError for settings that cannot run."""
    specs = config.candidate_specs()
    # One candidate is the single-multiplier search (no β), bit-identical to --arithmetic.
    arithmetic = arithmetic_from_spec(specs[0] if len(specs) == 1 else config.arithmetic)
    candidates = [arithmetic_from_spec(spec) for spec in specs] if len(specs) > 1 else None
    energy = energy_prices(candidates or [arithmetic], required=config.energy_weight > 0 or candidates)
    if config.energy_budget is not None:
        cheapest = float(np.min(energy["pj"]) / energy["exact_pj"])
        if config.energy_budget < cheapest:
            raise UserError(f"--energy-budget {config.energy_budget} is below {cheapest:.3f}, the ratio of the "
                            f"cheapest candidate: no choice of these multipliers can meet it")
    return Searcher(config, arithmetic=arithmetic, candidates=candidates, energy=energy)


def resolved_facts(searcher: Searcher, threads: int) -> dict:
    """What a search resolved from its settings, recorded in config.json."""
    model = searcher.model
    candidates = model.candidates if searcher.choosing else None
    arithmetic = None if candidates else searcher.arithmetic
    resolved = {"threads": threads, "arithmetic": arithmetic.name if arithmetic else "none",
                "steps_per_epoch": searcher.steps_per_epoch, "warmup_epochs": searcher.warmup_epochs}
    if candidates:
        resolved["multipliers"] = [a.name for a in candidates]
    if searcher.energy is not None:
        resolved["energy_pj_per_multiply"] = dict(zip(resolved.get("multipliers", [resolved["arithmetic"]]),
                                                      map(float, searcher.energy["pj"])))
    return resolved


def run_search(config: SearchConfig | None = None, resume: str | Path | None = None,
               progress: ProgressCallback | None = None, overrides: dict | None = None,
               address: str | None = None) -> dict:
    """Run (or resume) a search and return its summary; everything is written under the output folder.

    With ``resume`` the folder's saved config is used (``config`` is ignored)
    and ``overrides`` may change the settings listed in
    :data:`~approxdarts_np.runs.config.RESUME_OVERRIDES`; any other setting in
    it that differs from the saved one is refused. Bad input raises UserError
    before anything is written; a stop on Ctrl-C raises
    :class:`~approxdarts_np.runs.loop.RunInterrupted` after saving.

    With ``config.workers`` > 1 the steps are split over that many Ray workers
    (:mod:`approxdarts_np.runs.workers`), on the Ray cluster at ``address`` or a local one.
    """
    config, output_dir = resolve_run_config(SearchConfig, config, resume, overrides)
    if config.workers > 1 or address is not None:
        # the search over workers builds on this module (Searcher, build_searcher): imported here
        from approxdarts_np.runs.workers import run_replicated_search
        return run_replicated_search(config, output_dir, resume is not None, progress, address)
    threads = configure_threads(config.threads)
    # from before the build: the count of multiply-accumulates runs the supernet
    with compile_split("search", config, threads) as split:
        searcher = build_searcher(config)
        loop = RunLoop(searcher, output_dir, progress, split=split)
        if resume is not None:
            return loop.resume(resolved_facts(searcher, threads))
        return loop.start(resolved_facts(searcher, threads))
