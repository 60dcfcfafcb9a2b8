"""Training the evaluation network of a genotype: SGD with cosine rate, cutout, auxiliary loss, drop-path.

Optionally with a multiplier in the searched convolutions (quantisation-aware
training through the straight-through estimator). Same files, checkpoints and
exact resume as the search: batch ``s`` of epoch ``e`` and its drop-path masks
depend only on (seed, e, s).
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
from approxdarts_np.data.cifar import load_cifar10
from approxdarts_np.errors import DivergedError, UserError
from approxdarts_np.io.checkpoint import load_tree, save_tree, write_json, write_text
from approxdarts_np.io.rundir import CHECKPOINT, CONFIG, RunClock, prepare_output_dir, refuse_existing_run, saved_config
from approxdarts_np.runs.config import RunConfig
from approxdarts_np.runs.evaluate import evaluate
from approxdarts_np.nas.genotypes import Genotype
from approxdarts_np.nas.model_eval import NetworkCIFAR
from approxdarts_np.nn import SGD, clip_grad_norm, cosine_lr

ProgressCallback = Callable[[dict], None]
FORMAT = "approxdarts-np train checkpoint v1"
_DROP_PATH_STREAM = 3


@dataclass
class TrainConfig(RunConfig):
    """Every setting of a training run. ``quick()`` fits a CPU in minutes; ``paper()`` is DARTS's."""

    genotype: dict = field(default_factory=dict)
    data_dir: str | None = None
    output_dir: str = "runs/train"
    epochs: int = 2
    channels: int = 8
    layers: int = 6
    batch_size: int = 32
    max_train_images: int | None = 1024
    seed: int = 0
    multiplier: str = "none"
    threads: int | None = None
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary_weight: float = 0.4
    drop_path: float = 0.2
    cutout: int = 16
    preset: str = "quick"

    @classmethod
    def quick(cls, **overrides) -> "TrainConfig":
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        base = dict(epochs=600, channels=36, layers=20, batch_size=96, max_train_images=None, preset="paper")
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        self.validate_common()
        Genotype.from_dict(self.genotype)
        if not 0 <= self.drop_path < 1:
            raise UserError(f"--drop-path must lie in [0, 1), got {self.drop_path}")
        if self.auxiliary_weight < 0 or self.cutout < 0:
            raise UserError("--auxiliary-weight and --cutout must be >= 0")


def build_network(config: TrainConfig, multiplier=None) -> NetworkCIFAR:
    return NetworkCIFAR(Genotype.from_dict(config.genotype), config.channels, 10, config.layers,
                        auxiliary=config.auxiliary_weight > 0, multiplier=multiplier, seed=config.seed)


class Trainer:
    """Owns the data, the network and the optimizer of one training run."""

    def __init__(self, config: TrainConfig, multiplier=None):
        config.validate()
        self.config = config
        data = load_cifar10(config.data_dir)
        n_train = data.train_x.shape[0]
        if config.max_train_images is not None:
            n_train = min(n_train, config.max_train_images)
        if config.batch_size > n_train:
            raise UserError(f"--batch-size {config.batch_size} is larger than the {n_train} training images")
        augment = AugmentConfig(crop_padding=4, flip=True, cutout_length=config.cutout)
        self.train_loader = BatchLoader(data.train_x, data.train_y, config.batch_size, seed=config.seed,
                                        indices=np.arange(n_train), augment=augment, drop_last=True)
        self.test_x, self.test_y = data.test_x, data.test_y
        self.model = build_network(config, multiplier)
        self.optimizer = SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)
        self.epoch, self.step = 0, 0
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0}
        self.metrics: list[dict] = []
        self.clock = RunClock()

    def train_step(self, images, labels, epoch: int, step: int) -> tuple[float, int]:
        """One SGD step on a batch: main loss plus the weighted auxiliary loss, clipped gradients."""
        cfg = self.config
        self.optimizer.zero_grad()
        rng = np.random.default_rng([cfg.seed, epoch, step, _DROP_PATH_STREAM])
        logits, aux = self.model(Tensor(images), rng=rng)
        loss = F.cross_entropy(logits, labels)
        if aux is not None:
            loss = loss + cfg.auxiliary_weight * F.cross_entropy(aux, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"the loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                f"the last good checkpoint is kept")
        loss.backward()
        clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return value, int((logits.data.argmax(axis=1) == labels).sum())

    def run(self, output_dir: Path, progress: ProgressCallback | None = None) -> dict:
        """Train to the configured number of epochs, evaluating on the test set after each one."""
        progress = progress or (lambda event: None)
        cfg = self.config
        steps = len(self.train_loader)
        self.clock = RunClock(self.clock.before)
        progress({"event": "start", "epochs": cfg.epochs, "steps_per_epoch": steps, "epoch": self.epoch,
                  "step": self.step, "parameters": sum(p.size for p in self.model.parameters())})
        try:
            while self.epoch < cfg.epochs:
                lr = cosine_lr(cfg.lr, cfg.lr_min, self.epoch, cfg.epochs)
                self.optimizer.lr = lr
                self.model.drop_path_prob = cfg.drop_path * self.epoch / cfg.epochs
                self.model.train()
                for step in range(self.step, steps):
                    images, labels = self.train_loader.batch(self.epoch, step)
                    loss, correct = self.train_step(images, labels, self.epoch, step)
                    self.sums["loss"] += loss * len(labels)
                    self.sums["correct"] += correct
                    self.sums["seen"] += len(labels)
                    self.step = step + 1
                    progress({"event": "step", "epoch": self.epoch, "step": self.step, "steps_per_epoch": steps,
                              "train_loss": loss, "train_acc": correct / len(labels), "lr": lr,
                              "elapsed": self.clock.seconds()})
                test_loss, test_acc = evaluate(self.model, self.test_x, self.test_y, cfg.batch_size)
                s = self.sums
                record = {"epoch": self.epoch + 1, "lr": lr, "drop_path_prob": self.model.drop_path_prob,
                          "train_loss": s["loss"] / s["seen"], "train_acc": s["correct"] / s["seen"],
                          "test_loss": test_loss, "test_acc": test_acc, "elapsed_s": self.clock.seconds()}
                self.metrics.append(record)
                self.epoch, self.step = self.epoch + 1, 0
                self.sums = {"loss": 0.0, "correct": 0, "seen": 0}
                write_text(output_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
                self.save_checkpoint(output_dir / CHECKPOINT)
                progress({"event": "epoch", **record})
        except KeyboardInterrupt:
            self.save_checkpoint(output_dir / CHECKPOINT)
            raise
        self.save_checkpoint(output_dir / CHECKPOINT)
        last = self.metrics[-1]
        return {"epochs": self.epoch, "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                "train_acc": last["train_acc"], "elapsed_s": self.clock.seconds(),
                "checkpoint": str(output_dir / CHECKPOINT)}

    def save_checkpoint(self, path: Path) -> None:
        save_tree(path, {
            "format": FORMAT,
            "config": json.dumps(self.config.to_dict()),
            "position": {"epoch": self.epoch, "step": self.step, "elapsed": self.clock.seconds()},
            "sums": self.sums,
            "metrics": json.dumps(self.metrics),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        })

    def load_checkpoint(self, path: Path) -> None:
        tree = read_checkpoint(path)
        self.model.load_state_dict(tree["model"])
        self.optimizer.load_state_dict(tree["optimizer"])
        pos = tree["position"]
        self.epoch, self.step = int(pos["epoch"]), int(pos["step"])
        self.sums = dict(tree["sums"])
        self.metrics = json.loads(tree["metrics"])
        self.clock = RunClock(float(pos["elapsed"]))


def read_checkpoint(path: str | Path) -> dict:
    """The tree of a training checkpoint; UserError when ``path`` is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        tree = load_tree(path)
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 checkpoint: {exc}") from None
    if tree.get("format") != FORMAT:
        raise UserError(f"{path} is not a training checkpoint of this version")
    return tree


def load_trained_network(path: str | Path) -> tuple[NetworkCIFAR, TrainConfig]:
    """The network saved in a training checkpoint, with its config (float arithmetic, eval mode)."""
    tree = read_checkpoint(path)
    config = TrainConfig.from_dict(json.loads(tree["config"]))
    model = build_network(config)
    model.load_state_dict(tree["model"])
    model.eval()
    return model, config


def run_train(config: TrainConfig, resume: str | Path | None = None,
              progress: ProgressCallback | None = None) -> dict:
    """Run (or resume) a training run and return its summary. Bad input raises UserError before writing."""
    from approxdarts_np.approx.convolution import arithmetic_from_spec
    from approxdarts_np.kernels.threads import configure_threads

    if resume is not None:
        output_dir = Path(resume)
        config = TrainConfig.from_dict(saved_config(output_dir))
    else:
        output_dir = Path(config.output_dir)
        refuse_existing_run(output_dir)
    config.validate()
    threads = configure_threads(config.threads)
    arithmetic = arithmetic_from_spec(config.multiplier)
    trainer = Trainer(config, multiplier=arithmetic)
    prepare_output_dir(output_dir)
    if resume is not None:
        trainer.load_checkpoint(output_dir / CHECKPOINT)
    else:
        write_json(output_dir / CONFIG, config.to_dict() | {"resolved": {
            "threads": threads, "multiplier": arithmetic.name if arithmetic else "none",
            "genotype_string": Genotype.from_dict(config.genotype).to_darts_string(),
            "parameters": sum(p.size for p in trainer.model.parameters())}})
    return trainer.run(output_dir, progress)
