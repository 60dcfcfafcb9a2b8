"""Loss and accuracy of a network on a labelled image set (eval mode, no gradients)."""
from __future__ import annotations

import numpy as np

from approxdarts_np.autodiff import Tensor, no_grad
from approxdarts_np.autodiff import functional as F
from approxdarts_np.data.augment import BatchLoader
from approxdarts_np.nn import Module


def evaluate(model: Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
             indices: np.ndarray | None = None, progress=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``images[indices]`` (uint8 NCHW), BN with running statistics.

    ``progress(done, total)`` is called after each batch when given.
    """
    loader = BatchLoader(images, labels, batch_size, seed=0, indices=indices, augment=None, shuffle=False)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        with no_grad():
            for step, x, y in loader.iter_epoch(0):
                out = model(Tensor(x))
                logits = out[0] if isinstance(out, tuple) else out
                total_loss += F.cross_entropy(logits, y).item() * len(y)
                correct += int((logits.data.argmax(axis=1) == y).sum())
                seen += len(y)
                if progress is not None:
                    progress(step + 1, len(loader))
    finally:
        model.train(was_training)
    return total_loss / seen, correct / seen
