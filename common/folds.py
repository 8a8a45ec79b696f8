"""Deterministic patient-level fold assignment, computed identically at every site and in pooled oracles.

A row's inner cross-validation fold is ``sha256(f"{seed}:{case_id}") mod k``: it depends only on the case's own
identifier, so a site can assign folds to its own rows without knowing anyone else's, and the pooled twin of a
federated study gets exactly the same folds.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np


def inner_folds(case_ids, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each case id."""
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    return np.array(_folds(tuple(case_ids), int(k), int(seed)), dtype=int)


@functools.lru_cache(maxsize=256)
def _folds(case_ids: tuple, k: int, seed: int) -> tuple:
    """The folds of a tuple of case ids (cached: a study round asks for the same rows' folds many times)."""
    return tuple(int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:12], 16) % k for cid in case_ids)


def row_mask(case_ids, spec: dict | None) -> np.ndarray:
    """Rows selected by a row spec: None = all; ``{"k", "seed", "fold", "keep": "train"|"test"}``."""
    n = len(case_ids)
    if not spec:
        return np.ones(n, bool)
    folds = inner_folds(case_ids, int(spec["k"]), int(spec.get("seed", 0)))
    in_fold = folds == int(spec["fold"])
    if spec.get("keep", "train") == "train":
        return ~in_fold
    return in_fold
