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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.data.augment import AugmentConfig, BatchLoader
from approxdarts_np.data.cifar import load_cifar10, search_split
from approxdarts_np.errors import UserError
from approxdarts_np.io.checkpoint import save_tree, write_text
from approxdarts_np.io.rundir import refuse_existing_run, saved_config
from approxdarts_np.nas.model_search import Network
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.nn import SGD, Adam, clip_grad_norm, cosine_lr
from approxdarts_np.runs.config import RunConfig, apply_resume_overrides
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.runs.loop import ProgressCallback, RunLoop, StepResult
from approxdarts_np.runs.memory import check_memory, search_memory_bytes
from approxdarts_np.runs.unrolled import unrolled_architecture_step


@dataclass
class SearchConfig(RunConfig):
    """Every setting of a search. ``quick()`` fits a CPU in minutes; ``paper()`` is DARTS's."""

    data_dir: str | None = None
    output_dir: str = "runs/search"
    epochs: int = 4
    channels: int = 8
    layers: int = 5
    batch_size: int = 32
    max_train_images: int | None = 2560  # images of the training set used (None: all)
    seed: int = 0
    multiplier: str = "none"  # none | exact | table name | path to a .bin/.npy table
    threads: int | None = None
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    order: int = 1  # 1: first-order architecture gradient; 2: DARTS's unrolled (second-order) gradient
    unrolled_lr: float | None = None  # ξ of the virtual step (None: the current weight learning rate)
    preset: str = "quick"

    @classmethod
    def quick(cls, **overrides) -> "SearchConfig":
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "SearchConfig":
        base = dict(epochs=50, channels=16, layers=8, batch_size=64, max_train_images=None, preset="paper")
        base.update(overrides)
        return cls(**base)

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
        if not all(0 <= b < 1 for b in self.arch_betas):
            raise UserError(f"the Adam betas of α must lie in [0, 1), got {self.arch_betas}")
        check_memory(search_memory_bytes(self), "search")


def architecture_step(model: Network, optimizer: Adam, images, labels) -> tuple[float, int]:
    """Update α with the gradient of the val-batch loss at the current weights (first order)."""
    optimizer.zero_grad()
    loss, correct = _loss_and_grad(model, images, labels, frozen=model.weights())
    if math.isfinite(loss):
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


def _loss_and_grad(model: Network, images, labels, frozen) -> tuple[float, int]:
    """Cross-entropy of a batch and its backward; ``frozen`` parameters get no gradient (none is computed)."""
    for p in frozen:
        p.requires_grad = False
    try:
        logits = model(Tensor(images))
        loss = F.cross_entropy(logits, labels)
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
    finally:
        for p in frozen:
            p.requires_grad = True
    correct = int((logits.data.argmax(axis=1) == np.asarray(labels)).sum())
    return value, correct


class Searcher:
    """The search as a run-loop task: data, supernet and both optimizers; one step = α step + w step."""

    kind = "search"

    def __init__(self, config: SearchConfig, multiplier=None):
        config.validate()
        self.config = config
        data = load_cifar10(config.data_dir)
        n_train = data.train_x.shape[0]
        if config.max_train_images is not None:
            n_train = min(n_train, config.max_train_images)
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
        self.model = Network(config.channels, 10, config.layers, multiplier=multiplier, seed=config.seed)
        self.w_optimizer = SGD(self.model.weights(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
        self.a_optimizer = Adam(self.model.arch_parameters(), lr=config.arch_lr, betas=config.arch_betas,
                                weight_decay=config.arch_weight_decay)
        self.alpha_history: list = []  # (normal, reduce) α after each finished epoch

    def parameter_count(self) -> int:
        return sum(p.size for p in self.model.weights())

    # ------------------------------------------------------------- the task
    def begin_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.w_optimizer.lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs)
        self.model.train()
        return {"lr": self.w_optimizer.lr}

    def step(self, epoch: int, step: int) -> StepResult:
        # architecture step on an architecture-val batch, then weight step on a weight-train batch
        cfg = self.config
        val_batch, train_batch = self.val_loader.batch(epoch, step), self.train_loader.batch(epoch, step)
        if cfg.order == 2:
            # DARTS: the virtual step uses the same weight-train batch and, by default, the current lr
            xi = cfg.unrolled_lr if cfg.unrolled_lr is not None else self.w_optimizer.lr
            a_loss, a_correct = unrolled_architecture_step(self.model, self.a_optimizer, self.w_optimizer,
                                                           train_batch, val_batch, xi)
        else:
            a_loss, a_correct = architecture_step(self.model, self.a_optimizer, *val_batch)
        if not math.isfinite(a_loss):
            return StepResult(losses={"arch_loss": a_loss}, sums={})
        t_loss, t_correct = weight_step(self.model, self.w_optimizer, *train_batch, grad_clip=cfg.grad_clip)
        bs = self.config.batch_size
        return StepResult(
            losses={"arch_loss": a_loss, "train_loss": t_loss},
            sums={"train_loss": t_loss * bs, "train_correct": t_correct, "arch_loss": a_loss * bs,
                  "arch_correct": a_correct, "seen": bs},
            shown={"train_loss": t_loss, "train_acc": t_correct / bs, "arch_loss": a_loss})

    def end_epoch(self, epoch: int, sums: dict, begun: dict) -> dict:
        val_loss, val_acc = self.evaluate_val()
        self.alpha_history.append([self.model.alphas_normal.data.copy(), self.model.alphas_reduce.data.copy()])
        seen = sums["seen"]
        return {"train_loss": sums["train_loss"] / seen, "train_acc": sums["train_correct"] / seen,
                "arch_step_loss": sums["arch_loss"] / seen, "arch_step_acc": sums["arch_correct"] / seen,
                "val_loss": val_loss, "val_acc": val_acc, "genotype": self.model.genotype().to_darts_string()}

    def evaluate_val(self) -> tuple[float, float]:
        """Loss and accuracy on the whole architecture-val half, eval mode (running BN statistics)."""
        v = self.val_loader
        return evaluate(self.model, v.x, v.y, self.config.batch_size, indices=v.indices)

    # ------------------------------------------------------------- state and files
    def state_tree(self) -> dict:
        return {"alpha_history": np.array(self.alpha_history, dtype=np.float32).reshape(-1, 2, 14, len(PRIMITIVES)),
                "model": self.model.state_dict(),
                "w_optimizer": self.w_optimizer.state_dict(),
                "a_optimizer": self.a_optimizer.state_dict()}

    def load_state_tree(self, tree: dict) -> None:
        self.model.load_state_dict(tree["model"])
        self.w_optimizer.load_state_dict(tree["w_optimizer"])
        self.a_optimizer.load_state_dict(tree["a_optimizer"])
        self.alpha_history = [list(a) for a in np.asarray(tree["alpha_history"])]

    def write_results(self, folder: Path) -> None:
        """alpha.h5, genotype.json and genotype.txt for the epochs done so far."""
        genotype = self.model.genotype()
        write_text(folder / "genotype.json", genotype.to_json() + "\n")
        write_text(folder / "genotype.txt", genotype.to_darts_string() + "\n")
        history = np.array(self.alpha_history, dtype=np.float32).reshape(-1, 2, 14, len(PRIMITIVES))
        save_tree(folder / "alpha.h5", {
            "primitives": list(PRIMITIVES),
            "alphas_normal": self.model.alphas_normal.data,
            "alphas_reduce": self.model.alphas_reduce.data,
            "alphas_normal_history": history[:, 0],
            "alphas_reduce_history": history[:, 1],
        })

    def summary(self, metrics: list) -> dict:
        last = metrics[-1] if metrics else {}
        genotype = self.model.genotype()
        return {"val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
                "train_acc": last.get("train_acc"), "genotype": genotype.to_dict(),
                "genotype_string": genotype.to_darts_string()}


def run_search(config: SearchConfig | None = None, resume: str | Path | None = None,
               progress: ProgressCallback | None = None, overrides: dict | None = None) -> dict:
    """Run (or resume) a search and return its summary; everything is written under the output folder.

    With ``resume`` the folder's saved config is used (``config`` is ignored)
    and ``overrides`` may change the settings listed in
    :data:`~approxdarts_np.runs.config.RESUME_OVERRIDES`; any other setting in
    it that differs from the saved one is refused. Bad input raises UserError
    before anything is written; a stop on Ctrl-C raises
    :class:`~approxdarts_np.runs.loop.RunInterrupted` after saving.
    """
    from approxdarts_np.approx.convolution import arithmetic_from_spec
    from approxdarts_np.kernels.threads import configure_threads

    if resume is not None:
        output_dir = Path(resume)
        saved = SearchConfig.from_dict(saved_config(output_dir), source=str(output_dir / "config.json"))
        config = apply_resume_overrides(saved.replace(output_dir=str(output_dir)), overrides or {}, output_dir)
    else:
        output_dir = Path(config.output_dir)
        refuse_existing_run(output_dir)
    config.validate()
    arithmetic = arithmetic_from_spec(config.multiplier)
    searcher = Searcher(config, multiplier=arithmetic)
    threads = configure_threads(config.threads)
    resolved = {"threads": threads, "multiplier": arithmetic.name if arithmetic else "none",
                "steps_per_epoch": searcher.steps_per_epoch}
    loop = RunLoop(searcher, output_dir, progress)
    if resume is not None:
        return loop.resume(resolved)
    return loop.start(resolved)
