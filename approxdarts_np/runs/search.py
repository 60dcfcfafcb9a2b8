"""First-order ApproxDARTS search: the bilevel loop, its outputs, checkpoints and resume.

Each step reads like the paper: an *architecture step* (α follows the gradient
of the loss on an architecture-val batch at the current weights, Adam) then a
*weight step* (w follows the gradient of the loss on a weight-train batch,
SGD with momentum, cosine learning rate, gradient-norm clipping).

Determinism: batch ``s`` of epoch ``e`` depends only on (seed, e, s) and every
kernel is deterministic for a fixed thread count, so a run resumed from a
checkpoint ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.data.augment import AugmentConfig, BatchLoader
from approxdarts_np.data.cifar import load_cifar10, search_split
from approxdarts_np.errors import DivergedError, UserError
from approxdarts_np.io.checkpoint import load_tree, save_tree, write_json, write_text
from approxdarts_np.io.rundir import CHECKPOINT, CONFIG, RunClock, prepare_output_dir, refuse_existing_run, saved_config
from approxdarts_np.runs.config import RunConfig
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.nas.model_search import Network
from approxdarts_np.nas.operations import PRIMITIVES
from approxdarts_np.nn import SGD, Adam, clip_grad_norm, cosine_lr

ProgressCallback = Callable[[dict], None]


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


@dataclass
class SearchState:
    """Where a search stands: everything a checkpoint must hold besides the model and optimizers."""

    epoch: int = 0  # the epoch in progress (or the next one when step == 0)
    step: int = 0  # steps of that epoch already done
    sums: dict = field(default_factory=lambda: _zero_sums())
    metrics: list = field(default_factory=list)  # one dict per finished epoch
    alpha_history: list = field(default_factory=list)  # (normal, reduce) α after each epoch


def _zero_sums() -> dict:
    return {"train_loss": 0.0, "train_correct": 0, "arch_loss": 0.0, "arch_correct": 0, "seen": 0,
            "arch_seen": 0}


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
    """Owns the data, the supernet and both optimizers of one search run."""

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
        self.state = SearchState()
        self.clock = RunClock()

    # ------------------------------------------------------------- the loop
    def run(self, output_dir: Path, progress: ProgressCallback | None = None) -> dict:
        """Search until the configured number of epochs; write results and checkpoints into ``output_dir``.

        Ctrl-C (KeyboardInterrupt) saves a checkpoint at the last finished step
        and re-raises.
        """
        progress = progress or (lambda event: None)
        cfg, st = self.config, self.state
        self.clock = RunClock(self.clock.before)
        progress({"event": "start", "epochs": cfg.epochs, "steps_per_epoch": self.steps_per_epoch,
                  "epoch": st.epoch, "step": st.step, "parameters": sum(p.size for p in self.model.weights())})
        try:
            while st.epoch < cfg.epochs:
                lr = cosine_lr(cfg.lr, cfg.lr_min, st.epoch, cfg.epochs)
                self.w_optimizer.lr = lr
                self.model.train()
                for step in range(st.step, self.steps_per_epoch):
                    # architecture step on a val batch, then weight step on a train batch
                    a_loss, a_correct = architecture_step(self.model, self.a_optimizer,
                                                          *self.val_loader.batch(st.epoch, step))
                    t_loss, t_correct = weight_step(self.model, self.w_optimizer,
                                                    *self.train_loader.batch(st.epoch, step),
                                                    grad_clip=cfg.grad_clip)
                    if not (math.isfinite(a_loss) and math.isfinite(t_loss)):
                        raise DivergedError(
                            f"the loss became {a_loss if not math.isfinite(a_loss) else t_loss} at epoch "
                            f"{st.epoch + 1}, step {step + 1}; the last good checkpoint is kept in {output_dir}")
                    bs = cfg.batch_size
                    s = st.sums
                    s["train_loss"] += t_loss * bs
                    s["train_correct"] += t_correct
                    s["arch_loss"] += a_loss * bs
                    s["arch_correct"] += a_correct
                    s["seen"] += bs
                    st.step = step + 1
                    progress({"event": "step", "epoch": st.epoch, "step": st.step,
                              "steps_per_epoch": self.steps_per_epoch, "train_loss": t_loss,
                              "train_acc": t_correct / bs, "arch_loss": a_loss, "lr": lr,
                              "elapsed": self.clock.seconds()})
                self._finish_epoch(output_dir, lr, progress)
        except KeyboardInterrupt:
            self.save_checkpoint(output_dir)
            raise
        self.save_checkpoint(output_dir)
        return self.summary()

    def _finish_epoch(self, output_dir: Path, lr: float, progress: ProgressCallback) -> None:
        st = self.state
        elapsed = self.clock.seconds()
        val_loss, val_acc = self.evaluate_val()
        s = st.sums
        record = {"epoch": st.epoch + 1, "lr": lr,
                  "train_loss": s["train_loss"] / s["seen"], "train_acc": s["train_correct"] / s["seen"],
                  "arch_step_loss": s["arch_loss"] / s["seen"], "arch_step_acc": s["arch_correct"] / s["seen"],
                  "val_loss": val_loss, "val_acc": val_acc, "elapsed_s": elapsed,
                  "genotype": self.model.genotype().to_darts_string()}
        st.metrics.append(record)
        st.alpha_history.append([self.model.alphas_normal.data.copy(), self.model.alphas_reduce.data.copy()])
        st.epoch += 1
        st.step = 0
        st.sums = _zero_sums()
        self.write_results(output_dir)
        self.save_checkpoint(output_dir)
        progress({"event": "epoch", **record})

    def evaluate_val(self) -> tuple[float, float]:
        """Loss and accuracy on the whole architecture-val half, eval mode (running BN statistics)."""
        v = self.val_loader
        return evaluate(self.model, v.x, v.y, self.config.batch_size, indices=v.indices)

    # ------------------------------------------------------------- files
    def write_results(self, output_dir: Path) -> None:
        """metrics.jsonl, alpha.h5, genotype.json and genotype.txt for the epochs done so far."""
        st = self.state
        write_text(output_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in st.metrics))
        genotype = self.model.genotype()
        write_text(output_dir / "genotype.json", genotype.to_json() + "\n")
        write_text(output_dir / "genotype.txt", genotype.to_darts_string() + "\n")
        history = np.array(st.alpha_history, dtype=np.float32)  # (epochs, 2, 14, 8)
        save_tree(output_dir / "alpha.h5", {
            "primitives": list(PRIMITIVES),
            "alphas_normal": self.model.alphas_normal.data,
            "alphas_reduce": self.model.alphas_reduce.data,
            "alphas_normal_history": history[:, 0] if len(history) else np.zeros((0, 14, 8), np.float32),
            "alphas_reduce_history": history[:, 1] if len(history) else np.zeros((0, 14, 8), np.float32),
        })

    def save_checkpoint(self, output_dir: Path) -> None:
        st = self.state
        save_tree(output_dir / CHECKPOINT, {
            "format": "approxdarts-np search checkpoint v1",
            "config": json.dumps(self.config.to_dict()),
            "position": {"epoch": st.epoch, "step": st.step, "elapsed": self.clock.seconds()},
            "sums": st.sums,
            "metrics": json.dumps(st.metrics),
            "alpha_history": np.array(st.alpha_history, dtype=np.float32).reshape(-1, 2, 14, len(PRIMITIVES)),
            "model": self.model.state_dict(),
            "w_optimizer": self.w_optimizer.state_dict(),
            "a_optimizer": self.a_optimizer.state_dict(),
        })

    def load_checkpoint(self, path: Path) -> None:
        tree = load_tree(path)
        if tree.get("format") != "approxdarts-np search checkpoint v1":
            raise UserError(f"{path} is not a search checkpoint of this version")
        self.model.load_state_dict(tree["model"])
        self.w_optimizer.load_state_dict(tree["w_optimizer"])
        self.a_optimizer.load_state_dict(tree["a_optimizer"])
        pos = tree["position"]
        self.state = SearchState(epoch=int(pos["epoch"]), step=int(pos["step"]),
                                 sums=dict(tree["sums"]), metrics=json.loads(tree["metrics"]),
                                 alpha_history=[list(a) for a in tree["alpha_history"]])
        self.clock = RunClock(float(pos["elapsed"]))

    def summary(self) -> dict:
        last = self.state.metrics[-1] if self.state.metrics else {}
        genotype = self.model.genotype()
        return {"epochs": self.state.epoch, "val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"),
                "train_acc": last.get("train_acc"), "elapsed_s": self.clock.seconds(),
                "genotype": genotype.to_dict(), "genotype_string": genotype.to_darts_string()}


def run_search(config: SearchConfig, resume: str | Path | None = None,
               progress: ProgressCallback | None = None) -> dict:
    """Run (or resume) a search and return its summary; everything is written under the output folder.

    With ``resume`` the folder's saved config is used and ``config`` is ignored.
    Bad input raises UserError before anything is written.
    """
    from approxdarts_np.approx.convolution import arithmetic_from_spec
    from approxdarts_np.kernels.threads import configure_threads

    if resume is not None:
        output_dir = Path(resume)
        config = SearchConfig.from_dict(saved_config(output_dir))
    else:
        output_dir = Path(config.output_dir)
        refuse_existing_run(output_dir)
    config.validate()
    threads = configure_threads(config.threads)
    arithmetic = arithmetic_from_spec(config.multiplier)
    searcher = Searcher(config, multiplier=arithmetic)
    prepare_output_dir(output_dir)
    if resume is not None:
        searcher.load_checkpoint(output_dir / CHECKPOINT)
    else:
        resolved = config.to_dict() | {"resolved": {
            "threads": threads, "multiplier": arithmetic.name if arithmetic else "none",
            "steps_per_epoch": searcher.steps_per_epoch}}
        write_json(output_dir / CONFIG, resolved)
    return searcher.run(output_dir, progress)

