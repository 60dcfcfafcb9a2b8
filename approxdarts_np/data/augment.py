"""Training batches: CIFAR-10 augmentation and the seeded, resumable batch loader.

The augmentation is DARTS's ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
``ToTensor`` + ``Normalize(mean, std)`` and, for final training, ``Cutout``,
as vectorised NumPy operations on a whole NCHW batch. Every random choice comes
from a ``numpy.random.Generator`` passed in, so a batch is a pure function of
the images and the generator state.

Reproducibility and resumption (:class:`BatchLoader`): no generator is carried
from one batch to the next. The order of epoch ``e`` is the permutation drawn by
``np.random.default_rng([seed, stream, e, 0, 1])`` and the augmentation of step
``s`` of that epoch uses ``np.random.default_rng([seed, stream, e, s, 2])``.
(The keys have a fixed length of five words because NumPy's ``SeedSequence``
treats trailing zero words as absent, which would make keys of different lengths
collide.) A run interrupted anywhere therefore resumes bit-identically from
nothing more than ``(epoch, step)``: ``loader.iter_epoch(epoch, start_step=step)``.
``stream`` separates loaders sharing one seed, e.g. 0 for the weight-train half
and 1 for the architecture-val half of a search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from approxdarts_np.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from approxdarts_np.errors import UserError

_SHUFFLE_TAG = 1
_AUGMENT_TAG = 2


def normalize(batch: np.ndarray, mean: tuple[float, ...] = CIFAR10_MEAN,
              std: tuple[float, ...] = CIFAR10_STD) -> np.ndarray:
    """Float32 NCHW images ``(batch / 255 - mean[c]) / std[c]`` from a ``uint8`` NCHW batch.

    Computed in float32 in the same order as ``ToTensor`` followed by
    ``Normalize`` (divide by 255, subtract the mean, divide by the std), so the
    result matches that pipeline bit for bit.
    """
    _check_batch(batch, "normalize", dtype=np.uint8)
    channels = batch.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: {channels} channels but {len(mean)} means and {len(std)} stds")
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, channels, 1, 1)
    scaled = batch.astype(np.float32) / np.float32(255.0)
    scaled -= mean32
    scaled /= std32
    return scaled


def random_crop_flip(batch: np.ndarray, rng: np.random.Generator, padding: int = 4,
                     flip: bool = True) -> np.ndarray:
    """Each image zero-padded by ``padding`` pixels, cropped back to its size at a random
    offset, and mirrored left-right with probability 1/2.

    Offsets are uniform over ``0..2*padding`` per axis, as in ``RandomCrop(size,
    padding)``. Draw order: ``rng.integers(0, 2*padding+1, size=(n, 2))`` (row
    and column offsets, only when ``padding > 0``), then ``rng.random(n) < 0.5``
    (flips, only when ``flip``). Works on any dtype; returns a new C-contiguous
    array of the input's shape and dtype.
    """
    _check_batch(batch, "random_crop_flip")
    if padding < 0:
        raise ValueError(f"random_crop_flip: padding must be >= 0, got {padding}")
    n, channels, height, width = batch.shape
    padded = np.zeros((n, channels, height + 2 * padding, width + 2 * padding), dtype=batch.dtype)
    padded[:, :, padding:padding + height, padding:padding + width] = batch
    if padding > 0:
        offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    else:
        offsets = np.zeros((n, 2), dtype=np.int64)
    rows = offsets[:, 0:1] + np.arange(height)              # (n, H) source rows
    cols = offsets[:, 1:2] + np.arange(width)               # (n, W) source columns
    if flip:
        mirrored = rng.random(n) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    # One gather through flat indices into the padded batch: (n, C, H, W) of positions.
    padded_h, padded_w = padded.shape[2], padded.shape[3]
    plane = (np.arange(n)[:, None] * channels + np.arange(channels)[None, :]) * (padded_h * padded_w)
    source = (plane[:, :, None, None] + rows[:, None, :, None] * padded_w + cols[:, None, None, :])
    return padded.reshape(-1)[source]


def cutout(batch: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    """Each image with one square patch set to zero (DARTS's ``Cutout(length)``).

    The centre ``(y, x)`` is uniform over the image (``rng.integers(0, H, n)``
    then ``rng.integers(0, W, n)``); the patch spans rows
    ``clip(y - length//2, 0, H) .. clip(y + length//2, 0, H)`` (end excluded)
    and likewise columns, so it is ``2*(length//2)`` pixels wide where it does
    not touch a border. Applied after normalisation, zero is the data-set mean.
    Returns a new array of the input's shape and dtype.
    """
    _check_batch(batch, "cutout")
    if length < 1:
        raise ValueError(f"cutout: length must be >= 1, got {length}")
    n, _, height, width = batch.shape
    centre_y = rng.integers(0, height, size=n)
    centre_x = rng.integers(0, width, size=n)
    half = length // 2
    y0, y1 = np.clip(centre_y - half, 0, height), np.clip(centre_y + half, 0, height)
    x0, x1 = np.clip(centre_x - half, 0, width), np.clip(centre_x + half, 0, width)
    rows = np.arange(height)
    cols = np.arange(width)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])      # (n, H)
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])      # (n, W)
    patch = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return np.where(patch, batch.dtype.type(0), batch)


@dataclass(frozen=True)
class AugmentConfig:
    """Which training augmentations a loader applies (before/after normalisation).

    ``crop_padding``: zero padding of the random crop (0 = no crop); ``flip``:
    random horizontal mirror; ``cutout_length``: cutout patch length (0 = off).
    The defaults are the DARTS search pipeline; final training adds cutout 16.
    """

    crop_padding: int = 4
    flip: bool = True
    cutout_length: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise UserError(f"crop padding must be >= 0, got {self.crop_padding}")
        if self.cutout_length < 0:
            raise UserError(f"cutout length must be >= 0, got {self.cutout_length}")


class BatchLoader:
    """Normalised (optionally augmented) float32 NCHW batches in a seeded, resumable order.

    ``x`` is ``uint8 (N, C, H, W)``, ``y`` integer labels ``(N,)``; ``indices``
    (optional) selects the images this loader serves, e.g. one half of
    :func:`~approxdarts_np.data.cifar.search_split`, without copying them.
    Batch ``step`` of epoch ``epoch`` depends only on ``(seed, stream, epoch,
    step)`` (see the module docstring), so :meth:`batch` gives random access and
    :meth:`iter_epoch` resumes mid-epoch bit-identically. With ``shuffle=False``
    the order is the index order; with ``augment=None`` images are only
    normalised. ``drop_last`` drops a final batch smaller than ``batch_size``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int,
                 stream: int = 0, indices: np.ndarray | None = None,
                 augment: AugmentConfig | None = None, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        _check_batch(x, "BatchLoader", dtype=np.uint8)
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
            raise ValueError(f"BatchLoader: y must be {x.shape[0]} integer labels, "
                             f"got {y.dtype} array of shape {y.shape}")
        if indices is None:
            indices = np.arange(x.shape[0], dtype=np.int64)
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu" or (
                indices.size and (indices.min() < 0 or indices.max() >= x.shape[0])):
            raise ValueError(f"BatchLoader: indices must be 1-D integers in 0..{x.shape[0] - 1}")
        _check_count("batch size", batch_size, minimum=1)
        _check_count("seed", seed)
        _check_count("stream", stream)
        if indices.size == 0 or (drop_last and indices.size < batch_size):
            raise UserError(f"{indices.size} images cannot fill a batch of {batch_size}"
                            f"{' (drop_last)' if drop_last else ''}")
        self.x = x
        self.y = y
        self.indices = indices.astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = int(stream)
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_images(self) -> int:
        """How many images one epoch draws from."""
        return int(self.indices.size)

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        full, rest = divmod(self.num_images, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def order(self, epoch: int) -> np.ndarray:
        """Image indices (into ``x``) in the order epoch ``epoch`` visits them."""
        _check_count("epoch", epoch)
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), 0, _SHUFFLE_TAG])
        return self.indices[rng.permutation(self.num_images)]

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``step`` of epoch ``epoch``: float32 NCHW images and int64 labels."""
        return self._batch_from_order(self.order(epoch), epoch, step)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(step, images, labels)`` for steps ``start_step .. steps_per_epoch-1`` of ``epoch``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must lie in 0..{self.steps_per_epoch}, got {start_step}")
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            images, labels = self._batch_from_order(order, epoch, step)
            yield step, images, labels

    def _batch_from_order(self, order: np.ndarray, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must lie in 0..{self.steps_per_epoch - 1}, got {step}")
        chosen = order[step * self.batch_size:(step + 1) * self.batch_size]
        images = self.x[chosen]
        labels = self.y[chosen].astype(np.int64)
        config = self.augment
        if config is None:
            return normalize(images), labels
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), int(step), _AUGMENT_TAG])
        if config.crop_padding > 0 or config.flip:
            images = random_crop_flip(images, rng, padding=config.crop_padding, flip=config.flip)
        images = normalize(images)
        if config.cutout_length > 0:
            images = cutout(images, rng, config.cutout_length)
        return images, labels


def iterate_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                    start_step: int = 0, stream: int = 0, indices: np.ndarray | None = None,
                    augment: AugmentConfig | None = None, shuffle: bool = True,
                    drop_last: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(step, images, labels)`` of one epoch; shorthand for ``BatchLoader(...).iter_epoch``."""
    loader = BatchLoader(x, y, batch_size, seed=seed, stream=stream, indices=indices,
                         augment=augment, shuffle=shuffle, drop_last=drop_last)
    yield from loader.iter_epoch(epoch, start_step)


def _check_batch(batch: np.ndarray, where: str, dtype: type | None = None) -> None:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4:
        raise ValueError(f"{where}: expected an NCHW array, got "
                         f"{getattr(batch, 'shape', type(batch).__name__)}")
    if dtype is not None and batch.dtype != dtype:
        raise ValueError(f"{where}: expected {np.dtype(dtype)} images, got {batch.dtype}")


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
