"""Test accuracy of trained study networks with BN running statistics (eval mode, as the study reports)
and with each test batch's own statistics (training-mode BN, no update kept): separates a network that
did not learn from one whose running statistics do not describe what its multiplier produces.

    python studies/bn_statistics_check.py studies/results/budget/uniform-mul8u_L40-seed0 mul8u_L40 ...

takes (job folder, multiplier or "genotype") pairs and prints one JSON line per (job, mode); batches of 100 test images.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from approxdarts_np.approx.arithmetic import arithmetic_from_spec
    from approxdarts_np.autodiff import Tensor, no_grad
    from approxdarts_np.data.augment import normalize
    from approxdarts_np.data.cifar import load_cifar10
    from approxdarts_np.kernels.threads import configure_threads
    from approxdarts_np.nas.genotypes import Genotype
    from approxdarts_np.nas.multiplier_choice import set_genotype_multipliers
    from approxdarts_np.runs.train import load_trained_network

    configure_threads(1)
    data = load_cifar10(None)
    x, y = data.test_x, data.test_y
    for folder, multiplier in zip(argv[0::2], argv[1::2]):
        model, config = load_trained_network(f"{folder}/train/checkpoint.h5")
        if multiplier == "genotype":  # the per-op multipliers the genotype names
            model.set_arithmetic(None)
            set_genotype_multipliers(model, Genotype.from_dict(config.genotype), arithmetic_from_spec)
        else:
            model.set_multiplier(arithmetic_from_spec(multiplier))
        saved = model.state_dict()
        for mode in ("running statistics", "batch statistics"):
            model.train(mode == "batch statistics")
            correct = 0
            with no_grad():
                for i in range(0, len(y), 100):
                    logits, _ = model(Tensor(normalize(x[i:i + 100])))
                    correct += int((logits.data.argmax(1) == y[i:i + 100]).sum())
            model.load_state_dict(saved)
            print(json.dumps({"job": folder.rstrip("/").split("/")[-1], "multiplier": multiplier, "bn": mode,
                              "test_acc": correct / len(y), "test_images": int(len(y))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
