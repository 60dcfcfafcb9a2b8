"""Training the evaluation network of a genotype: SGD with cosine rate, cutout, auxiliary loss, drop-path.

Optionally with a multiplier in the searched convolutions (quantisation-aware
training through the straight-through estimator). The run loop
(:mod:`approxdarts_np.runs.loop`) gives it the same files, checkpoints and
exact resume as the search: batch ``s`` of epoch ``e`` and its drop-path masks
depend only on (seed, e, s).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from approxdarts_np.approx.arithmetic import GENOTYPE, arithmetic_from_spec
from approxdarts_np.autodiff import Tensor
from approxdarts_np.autodiff import functional as F
from approxdarts_np.data.augment import AugmentConfig, BatchLoader
from approxdarts_np.data.cifar import load_cifar10
from approxdarts_np.errors import UserError
from approxdarts_np.io.rundir import CHECKPOINT
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.nas.multiplier_choice import set_genotype_multipliers
from approxdarts_np.nn import SGD, clip_grad_norm, cosine_lr
from approxdarts_np.runs.config import (IMAGE_SIZE, RunConfig, RunSettings, genotype_setting, new_default,
                                        resolve_run_config, setting)
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.runs.first_run import compile_split
from approxdarts_np.runs.loop import ProgressCallback, RunLoop, StepResult, read_run_checkpoint
from approxdarts_np.runs.memory import check_memory, train_memory_bytes

_DROP_PATH_STREAM = 3


@dataclass
class TrainConfig(RunSettings, RunConfig):
    """Every setting of a training run (:class:`~approxdarts_np.runs.config.RunSettings`, with the
    defaults below, and these). ``quick()`` fits a CPU in minutes; ``paper()`` is DARTS's."""

    output_dir: str = setting("runs/train", "Folder for config, metrics and checkpoint.")
    epochs: int = new_default("epochs", 2)
    layers: int = new_default("layers", 6)
    max_train_images: int | None = new_default("max_train_images", 1024)
    seed: int = setting(0, "Seed of weights, data order, augmentation and drop-path.")
    arithmetic: str = setting(
        GENOTYPE, "Arithmetic of the searched convs: genotype (the multiplier the genotype names for each op, FP32 "
        "where none), none, exact, a bundled table or a .bin/.npy path (quantisation-aware training).",
        aliases=("--multiplier",))
    lr_min: float = new_default("lr_min", 0.0)
    genotype: dict = setting(
        default_factory=dict, help="genotype.json, a .txt with the DARTS string, or DARTS_V2 (required unless "
        "--resume).", shown=False, text=str, parse=genotype_setting)
    auxiliary_weight: float = setting(0.4, "Auxiliary loss weight, 0 = no head.")
    drop_path: float = setting(0.2, "Final drop-path probability.")
    cutout: int = setting(16, "Cutout length, 0 = off.")

    PAPER: ClassVar[dict] = dict(epochs=600, channels=36, layers=20, batch_size=96, max_train_images=None)

    def validate(self) -> None:
        self.validate_common()
        Genotype.from_dict(self.genotype)
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must lie in [0, 1), got {self.drop_path}")
        if self.auxiliary_weight < 0:
            raise UserError(f"--auxiliary-weight must be >= 0, got {self.auxiliary_weight}")
        if not 0 <= self.cutout <= IMAGE_SIZE:
            raise UserError(f"--cutout must lie in [0, {IMAGE_SIZE}] (the images are {IMAGE_SIZE}×{IMAGE_SIZE}), "
                            f"got {self.cutout}")
        check_memory(train_memory_bytes(self), "training")




def build_network(config: TrainConfig, arithmetic=None) -> NetworkCIFAR:
    """The evaluation network of the config's genotype; its searched convs use ``arithmetic`` or, with
    ``config.arithmetic == "genotype"``, the multiplier the genotype names for each op (FP32 where none)."""
    genotype = Genotype.from_dict(config.genotype)
    net = NetworkCIFAR(genotype, config.channels, 10, config.layers,
                       auxiliary=config.auxiliary_weight > 0, arithmetic=arithmetic, seed=config.seed)
    if config.arithmetic == GENOTYPE:
        set_genotype_multipliers(net, genotype, arithmetic_from_spec)
    return net


class Trainer:
    """The training as a run-loop task: data, network and optimizer; one step = one SGD step."""

    kind = "train"

    def __init__(self, config: TrainConfig, arithmetic=None):
        config.validate()
        self.config = config
        data = load_cifar10(config.data_dir)
        n_train = config.train_images(data.train_x.shape[0])
        if config.batch_size > n_train:
            raise UserError(f"--batch-size {config.batch_size} is larger than the {n_train} training images")
        augment = AugmentConfig(crop_padding=4, flip=True, cutout_length=config.cutout)
        self.train_loader = BatchLoader(data.train_x, data.train_y, config.batch_size, seed=config.seed,
                                        indices=np.arange(n_train), augment=augment, drop_last=True)
        self.steps_per_epoch = len(self.train_loader)
        self.test_x, self.test_y = data.test_x, data.test_y
        self.model = build_network(config, arithmetic)
        self.optimizer = SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)

    def parameter_count(self) -> int:
        return sum(p.size for p in self.model.parameters())

    # ------------------------------------------------------------- the task
    def begin_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.optimizer.lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs)
        self.model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        self.model.train()
        return {"lr": self.optimizer.lr, "drop_path_prob": self.model.drop_path_prob}

    def step(self, epoch: int, step: int) -> StepResult:
        images, labels = self.train_loader.batch(epoch, step)
        loss, correct = self.train_step(images, labels, epoch, step)
        n = len(labels)
        return StepResult(losses={"train_loss": loss},
                          sums={"loss": loss * n, "correct": correct, "seen": n},
                          shown={"train_loss": loss, "train_acc": correct / n})

    def train_step(self, images, labels, epoch: int, step: int) -> tuple[float, int]:
        """One SGD step on a batch: main loss plus the weighted auxiliary loss, clipped gradients.

        A non-finite loss leaves the weights untouched (the run loop then stops).
        """
        cfg = self.config
        self.optimizer.zero_grad()
        rng = np.random.default_rng([cfg.seed, epoch, step, _DROP_PATH_STREAM])
        logits, aux = self.model(Tensor(images), rng=rng)
        loss = F.cross_entropy(logits, labels)
        if aux is not None:
            loss = loss + cfg.auxiliary_weight * F.cross_entropy(aux, labels)
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
            clip_grad_norm(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        return value, int((logits.data.argmax(axis=1) == labels).sum())

    def end_epoch(self, epoch: int, sums: dict, begun: dict) -> dict:
        test_loss, test_acc = evaluate(self.model, self.test_x, self.test_y, self.config.batch_size)
        return {"train_loss": sums["loss"] / sums["seen"], "train_acc": sums["correct"] / sums["seen"],
                "test_loss": test_loss, "test_acc": test_acc}

    # ------------------------------------------------------------- state and files
    def state_tree(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_tree(self, tree: dict) -> None:
        self.model.load_state_dict(tree["model"])
        self.optimizer.load_state_dict(tree["optimizer"])

    def write_results(self, folder: Path) -> None:
        """Training has no result files besides metrics and the checkpoint."""

    def summary(self, metrics: list) -> dict:
        last = metrics[-1] if metrics else {}
        return {"test_acc": last.get("test_acc"), "test_loss": last.get("test_loss"),
                "train_acc": last.get("train_acc"), "checkpoint": str(Path(self.config.output_dir) / CHECKPOINT)}


def read_checkpoint(path: str | Path) -> dict:
    """The tree of a training checkpoint, to evaluate its network; UserError when ``path`` is not one."""
    return read_run_checkpoint(Path(path), Trainer.kind, needed_by="evaluate")


def load_trained_network(path: str | Path) -> tuple[NetworkCIFAR, TrainConfig]:
    """The network saved in a training checkpoint, with its config (float arithmetic, eval mode)."""
    tree = read_checkpoint(path)
    try:
        config = TrainConfig.from_dict(json.loads(tree["config"]), source=f"{path} (config)")
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path} is damaged: its config is not JSON ({exc})") from None
    model = build_network(config.replace(arithmetic="none"))
    try:
        model.load_state_dict(tree["model"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path} is damaged: {exc}") from None
    model.eval()
    return model, config


def run_train(config: TrainConfig | None = None, resume: str | Path | None = None,
              progress: ProgressCallback | None = None, overrides: dict | None = None) -> dict:
    """Run (or resume) a training run and return its summary. Bad input raises UserError before writing.

    ``resume`` and ``overrides`` as in :func:`~approxdarts_np.runs.search.run_search`.
    """
    from approxdarts_np.kernels.threads import configure_threads

    config, output_dir = resolve_run_config(TrainConfig, config, resume, overrides)
    arithmetic = None if config.arithmetic == GENOTYPE else arithmetic_from_spec(config.arithmetic)
    threads = configure_threads(config.threads)
    with compile_split("train", config, threads) as split:     # from before the build, as a search
        trainer = Trainer(config, arithmetic=arithmetic)
        genotype = Genotype.from_dict(config.genotype)
        if arithmetic is not None:
            used = arithmetic.name
        elif config.arithmetic == GENOTYPE and genotype.has_multipliers:
            used = "per op, from the genotype"
        else:
            used = "none"
        resolved = {"threads": threads, "arithmetic": used,
                    "genotype_string": genotype.to_text(),
                    "parameters": trainer.parameter_count()}
        loop = RunLoop(trainer, output_dir, progress, split=split)
        if resume is not None:
            return loop.resume(resolved)
        return loop.start(resolved)
