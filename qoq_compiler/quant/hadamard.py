"""Hadamard matrices of the orders LLM hidden sizes need, including non-powers of two.

An order-n Hadamard matrix H has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. It
exists for n = 1, 2 and (conjecturally) every multiple of 4; here n = m * 2^k is built as
    H_n = H_m (x) H_{2^k}          (Kronecker product; Sylvester's H_2 = [[1, 1], [1, -1]] doubled)
with H_m from Paley's constructions on a prime q (Legendre symbol chi):
    Paley I,  q = 3 (mod 4):  order q + 1      (12 from q = 11, 20 from 19, 44, 60, ...)
    Paley II, q = 1 (mod 4):  order 2 (q + 1)  (28 from q = 13, 36 from 17, 60, 76, ...)
so 576 = 36 * 16 (SmolLM2), 896 = 28 * 32 (Qwen2.5-0.5B), 1536 = 12 * 128, 2^k (Llama) all work.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import QoqcError


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) over GF(q), q prime: +1 for a nonzero square, -1 otherwise, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int8)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(order: int) -> np.ndarray | None:
    q = order - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I
        s = np.zeros((order, order), dtype=np.int8)
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = _jacobsthal(q)
        return s + np.eye(order, dtype=np.int8)
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II
        c = np.zeros((q + 1, q + 1), dtype=np.int8)
        c[0, 1:], c[1:, 0] = 1, 1
        c[1:, 1:] = _jacobsthal(q)
        return np.kron(c, np.array([[1, 1], [1, -1]], dtype=np.int8)) + np.kron(np.eye(q + 1, dtype=np.int8),
                                                                 np.array([[1, -1], [-1, -1]], dtype=np.int8))
    return None


@lru_cache(maxsize=None)
def hadamard(n: int) -> np.ndarray:
    """An order-n Hadamard matrix (int8 entries +-1), or QoqcError if no construction here fits."""
    k = 0
    while n % (1 << (k + 1)) == 0:
        k += 1
    for j in range(k + 1):  # base order m * 2^j, Sylvester-doubled the remaining k - j times
        base_order = (n >> k) << j
        base = np.ones((1, 1), dtype=np.int8) if base_order == 1 else _paley(base_order)
        if base is not None:
            h = base
            for _ in range(k - j):
                h = np.block([[h, h], [h, -h]])
            return h
    raise QoqcError(f"no Hadamard construction for size {n} (it must be m * 2^k with a Paley order m)")


def orthogonal_hadamard(n: int) -> np.ndarray:
    """H_n / sqrt(n): orthogonal, float64."""
    return hadamard(n) / np.sqrt(n)
