"""Rank of an integer matrix modulo primes just below 2^26, by Gaussian elimination.

Serves :func:`approxdarts_np.approx.multipliers.exact_rank`, which combines the ranks modulo
several primes into the exact rank over the rationals. Entries are int64. A reduced entry times
a reduced pivot is below 2^52, so the rows below the pivot can go unreduced for up to
:data:`MAX_ELIMINATION_STEPS` steps (|entry| < 2^62) before anything overflows.
"""
import numpy as np
from numba import njit, prange

from ._util import parallel_pays

#: Every prime given must lie below this.
PRIME_LIMIT = 1 << 26
#: Largest min(rows, cols) of a matrix: the elimination steps the int64 bound allows.
MAX_ELIMINATION_STEPS = 1 << 10
# From this many primes on, one prime per thread (fewer: no thread team for a few ms of work).
_PARALLEL_MIN_PRIMES = 8


@njit(cache=True)
def _inverse_mod(value, p):
    result = 1
    base = value % p
    exponent = p - 2
    while exponent > 0:
        if exponent & 1:
            result = result * base % p
        base = base * base % p
        exponent >>= 1
    return result


@njit(cache=True)
def _rank_mod_prime_kernel(matrix, p):
    """Rank of ``matrix`` modulo the prime ``p`` (unchecked: see :func:`ranks_mod_primes`)."""
    n, m = matrix.shape
    a = np.empty((n, m), dtype=np.int64)
    for i in range(n):
        for j in range(m):
            v = matrix[i, j] % p
            if v < 0:
                v += p
            a[i, j] = v
    # Entries below the pivot row stay unreduced; the pivot column and the pivot row are reduced
    # before use, so every product stays below 2^52.
    r = 0
    for c in range(m):
        if r == n:
            break
        pivot = -1
        for i in range(r, n):
            v = a[i, c] % p
            if v < 0:
                v += p
            a[i, c] = v
            if v != 0 and pivot < 0:
                pivot = i
        if pivot < 0:
            continue
        if pivot != r:
            for j in range(c, m):
                tmp = a[r, j]
                a[r, j] = a[pivot, j]
                a[pivot, j] = tmp
        inv = _inverse_mod(a[r, c], p)
        for j in range(c, m):
            v = a[r, j] % p
            if v < 0:
                v += p
            a[r, j] = v * inv % p
        for i in range(r + 1, n):
            f = a[i, c]
            if f != 0:
                for j in range(c + 1, m):
                    a[i, j] -= f * a[r, j]
                a[i, c] = 0
        r += 1
    return r


@njit(cache=True, parallel=True)
def _ranks_parallel_kernel(matrix, primes):
    """Rank of ``matrix`` modulo each prime; one prime per thread, each result written once."""
    ranks = np.zeros(primes.size, dtype=np.int64)
    for t in prange(primes.size):
        ranks[t] = _rank_mod_prime_kernel(matrix, primes[t])
    return ranks


def ranks_mod_primes(matrix, primes) -> np.ndarray:
    """Rank of the 2-D int64 ``matrix`` modulo each of ``primes`` (int64, odd primes below
    :data:`PRIME_LIMIT`; primality is the caller's promise). ValueError for other inputs."""
    matrix = np.asarray(matrix)
    primes = np.asarray(primes)
    if matrix.ndim != 2 or matrix.dtype != np.int64:
        raise ValueError(f"matrix must be a 2-D int64 array, got {matrix.dtype} of shape {matrix.shape}")
    if min(matrix.shape) > MAX_ELIMINATION_STEPS:
        raise ValueError(f"min(rows, cols) must be at most {MAX_ELIMINATION_STEPS}, got {matrix.shape}")
    if primes.ndim != 1 or primes.dtype != np.int64 or not ((primes > 2) & (primes < PRIME_LIMIT)).all():
        raise ValueError(f"primes must be a 1-D int64 array of odd primes below 2^26, got {primes!r}")
    matrix = np.ascontiguousarray(matrix)
    if parallel_pays(primes.size, _PARALLEL_MIN_PRIMES):
        return _ranks_parallel_kernel(matrix, primes)
    return np.array([_rank_mod_prime_kernel(matrix, p) for p in primes.tolist()], dtype=np.int64)
