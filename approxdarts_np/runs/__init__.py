"""Runs over the search space: search, training, evaluation and reports, with their files and checkpoints.

``approxdarts_np.nas`` says *what* is searched (operations, supernet, evaluation
network, genotypes); this package says how a run goes (one run loop, configs,
checkpoints, resume). Imports point downward only: runs → nas → nn → autodiff → kernels.
"""
