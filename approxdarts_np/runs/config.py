"""What the search and training configs share: JSON round trip with type checks, checks of common settings,
and the settings a resumed run may change."""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from approxdarts_np.errors import UserError
from approxdarts_np.nas.genotypes import read_genotype

# Settings a resumed run may change, and why each is safe:
#   epochs  -- extends (or shortens, down to the epochs done) a run; the cosine schedule follows the
#              new total from the next step on, so an extended run is not bit-identical to one that
#              was started with that many epochs;
#   threads -- kernels are deterministic for a fixed thread count; a different count may change the
#              last bits of later results (the run records the count it resumed with);
#   workers -- (a search) the replicas a step is split over compute the step of the whole batch; a
#              different count changes the order of float additions only, as threads may.
RESUME_OVERRIDES = ("epochs", "threads", "workers")

IMAGE_SIZE = 32

#: Seeds seed NumPy's generators and are stored in checkpoints; 32 bits, like most seeds in the field.
MAX_SEED = 2 ** 32 - 1
#: Far more than any CIFAR-10 schedule (DARTS trains 600 epochs); a larger value is a typo.
MAX_EPOCHS = 10_000


#: The presets every run config has: ``quick()`` and ``paper()``.
PRESETS = ("quick", "paper")


def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING,
            shown: str | bool | None = None, aliases: tuple = (), text: type | None = None, parse=None):
    """A config field that is also a command-line option ``--field-name`` (a field without ``help`` is not).

    ``help`` is the option's help; the CLI adds the quick and paper defaults in brackets, or ``shown`` (a
    text, or False for none). ``aliases``: older spellings of the option. ``text``: the type the option is
    typed as when it differs from the field's; ``parse``: from that value to the config fields it sets
    (a dict).
    """
    meta = dict(help=help, shown=shown, aliases=aliases, text=text, parse=parse)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _all_images(count: int) -> dict:
    return {"max_train_images": count or None}


def genotype_setting(text: str) -> dict:
    """``--genotype`` (a genotype.json, a .txt with the DARTS string, or DARTS_V2) as the config's field."""
    return {"genotype": read_genotype(text).to_dict()}


@dataclasses.dataclass
class RunSettings:
    """The settings every run has (a search's defaults; a run's config class inherits them and
    re-declares only the defaults it changes)."""

    data_dir: str | None = setting(None, "CIFAR-10 folder (python batches); default: the bundled sample.",
                                   shown=False)
    output_dir: str = setting("runs/search", "Folder for config, metrics, α, genotype, checkpoint.")
    preset: str = setting("quick", "quick: minutes on a CPU; paper: DARTS's settings.", shown="quick")
    epochs: int = setting(4, "Epochs.")
    channels: int = setting(8, "Initial channels C.")
    layers: int = setting(5, "Cells.")
    batch_size: int = setting(32, "Batch size.")
    max_train_images: int | None = setting(2560, "Use only the first N training images, 0 = all.",
                                           parse=_all_images)
    seed: int = setting(0, "Seed of weights, α, data order and augmentation.")
    arithmetic: str = setting("none", "Arithmetic of the searched convolutions: none (FP32), exact (8-bit) or an "
                              "approximate multiplier (a bundled table, e.g. mul8u_2P7, or a .bin/.npy path).",
                              aliases=("--multiplier",))
    threads: int | None = setting(None, "Threads of the kernels.", shown="all cores")
    lr: float = setting(0.025, "Learning rate of the weights, cosine-annealed.")
    lr_min: float = setting(0.001, "Final learning rate of the weights.")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(3e-4, "Weight decay of the weights.")
    grad_clip: float = setting(5.0, "Gradient-norm clip of the weights.")

    def train_images(self, available: int) -> int:
        """How many images of the training set the run uses: the first ``max_train_images`` (None: all)."""
        return available if self.max_train_images is None else min(available, self.max_train_images)


def new_default(name: str, default):
    """The :class:`RunSettings` field ``name``, its help and option kept, with another default."""
    return dataclasses.field(default=default, metadata=RunSettings.__dataclass_fields__[name].metadata)


#: Settings saved under an older name: a config.json written before the rename loads as it ran.
RENAMED = {"multiplier": "arithmetic"}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class RunConfig:
    """Mixin for dataclass configs: presets, ``to_dict``/``from_dict`` and validation of the shared fields.

    A config class sets ``PAPER``, the settings of the paper preset that differ from its
    (quick) defaults.
    """

    PAPER: typing.ClassVar[dict] = {}

    @classmethod
    def quick(cls, **overrides):
        """The defaults: minutes on a CPU."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides):
        """The paper's settings (``PAPER``), then ``overrides``."""
        return cls(**{**cls.PAPER, "preset": "paper", **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        """Rebuild a config saved by :meth:`to_dict` (the ``resolved`` facts of a run are skipped).

        Every value is checked against the field's type, so a hand-edited or foreign ``config.json``
        fails with one line naming the setting. Settings saved under an old name (:data:`RENAMED`) load
        under the new one.
        """
        if not isinstance(d, dict):
            raise UserError(f"{source} does not hold a run's settings (expected a JSON object)")
        for old, new in RENAMED.items():
            if old in d and new not in d:
                d = {(new if k == old else k): v for k, v in d.items()}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        d = {k: v for k, v in d.items() if k != "resolved"}
        unknown = set(d) - set(fields)
        if unknown:
            raise UserError(f"{source} has settings this {cls.__name__} does not know: {sorted(unknown)}")
        values = {}
        for name, value in d.items():
            values[name] = _coerce(value, hints[name], f"{source}: setting {name!r}")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate_common(self) -> None:
        """UserError for impossible network, batch, thread and optimiser settings."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{option_name(f.name)} must be a finite number, got {value}")
        if self.layers < 3:
            raise UserError(f"--layers must be at least 3 (two reduction cells and a normal one), "
                            f"got {self.layers}")
        if self.channels <= 0:
            raise UserError(f"--channels must be positive, got {self.channels}")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise UserError(f"--epochs must lie between 1 and {MAX_EPOCHS:,}, got {_show_int(self.epochs)}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise UserError(f"--max-train-images must be at least 2, got {self.max_train_images}")
        if self.threads is not None:
            cores = available_cores()
            if not 1 <= self.threads <= cores:
                raise UserError(f"--threads must lie between 1 and the {cores} cores available, "
                                f"got {self.threads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must lie between 0 and 2**32 - 1 = {MAX_SEED:,}, got {_show_int(self.seed)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not self.grad_clip > 0:
            raise UserError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.lr_min < 0 or self.lr_min > self.lr:
            raise UserError(f"--lr-min must lie in [0, --lr], got {self.lr_min}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must lie in [0, 1), got {self.momentum}")


def _show_int(value: int) -> str:
    """An integer for a message; one past Python's 4,300-digit printing limit by its size."""
    if abs(value) < 10 ** 30:
        return str(value)
    return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"


def available_cores() -> int:
    """Threads the kernels can use: Numba's limit (the CPUs this process may run on, unless overridden)."""
    import numba
    return int(numba.config.NUMBA_NUM_THREADS)


def apply_resume_overrides(saved, given: dict, folder) -> "RunConfig":
    """The saved config with the settings given on ``--resume``; UserError for any that may not change.

    ``given`` holds only what the user typed (None where they asked for "all"); a value equal to the
    saved one is accepted.
    """
    refused = [k for k, v in given.items()
               if k not in RESUME_OVERRIDES and _norm(v) != _norm(getattr(saved, k, None))]
    if refused:
        shown = ", ".join(f"{option_name(k)} (the run has {getattr(saved, k, None)!r})" for k in refused)
        raise UserError(f"--resume {folder} continues a run with its saved settings; these cannot change: "
                        f"{shown}. Only {', '.join(option_name(k) for k in RESUME_OVERRIDES if hasattr(saved, k))} can; start a "
                        f"new run for other settings")
    changes = {k: v for k, v in given.items() if k in RESUME_OVERRIDES and hasattr(saved, k)}
    return saved.replace(**changes) if changes else saved


def resolve_run_config(cls, config, resume, overrides: dict | None):
    """(config, output folder) of a run: ``config`` for a fresh one, the folder's saved config (with the
    allowed ``overrides``) for a resumed one. UserError when a fresh run's folder already holds a run."""
    from pathlib import Path

    from approxdarts_np.io.rundir import CONFIG, refuse_existing_run, saved_config

    if resume is not None:
        folder = Path(resume)
        saved = cls.from_dict(saved_config(folder), source=str(folder / CONFIG))
        config = apply_resume_overrides(saved.replace(output_dir=str(folder)), overrides or {}, folder)
    else:
        folder = Path(config.output_dir)
        refuse_existing_run(folder)
    config.validate()
    return config, folder


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _coerce(value, hint, where: str):
    """``value`` as the type ``hint`` (JSON gives lists for tuples, ints for whole floats); UserError otherwise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where} has the wrong type: {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif origin is list or hint is list:
        if isinstance(value, list):
            return value
    else:
        return value
    raise UserError(f"{where} has the wrong type: {value!r}")
