"""What the search and training configs share: JSON round trip and the checks of common settings."""
from __future__ import annotations

import dataclasses

from approxdarts_np.errors import UserError


class RunConfig:
    """Mixin for dataclass configs: ``to_dict``/``from_dict`` and validation of the shared fields."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild a config saved by :meth:`to_dict` (the ``resolved`` facts of a run are skipped)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "resolved"}
        unknown = set(d) - set(fields)
        if unknown:
            raise UserError(f"config has unknown settings: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**d)
        except TypeError as exc:
            raise UserError(f"config is not valid: {exc}") from None

    def validate_common(self) -> None:
        """UserError for impossible network, batch, thread and optimiser settings."""
        if self.layers < 3:
            raise UserError(f"--layers must be at least 3 (two reduction cells and a normal one), "
                            f"got {self.layers}")
        if self.channels <= 0:
            raise UserError(f"--channels must be positive, got {self.channels}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_train_images is not None and self.max_train_images < 2:
            raise UserError(f"--max-train-images must be at least 2, got {self.max_train_images}")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")
        if not (self.lr > 0 and self.grad_clip > 0):
            raise UserError("--lr and --grad-clip must be positive")
        if self.lr_min < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError("--lr-min and --weight-decay must be >= 0 and --momentum in [0, 1)")
