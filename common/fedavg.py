"""Approximate federated training by model averaging (FedAvg / FedProx), for models without sufficient statistics.

fedrad's logistic and Cox fits are exact (sites send gradients and Hessians; the result equals the pooled fit).
FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020) are offered as an option for comparison and for models
that have no such decomposition: each round, every site starts from the global weights, runs ``epochs`` full-batch
gradient steps on its own rows, and the coordinator averages the sites' weights by their number of rows (Flower's
own ``FedAvg`` / ``FedProx`` strategies). It is **approximate**: with heterogeneous sites it converges to a
different point than the pooled optimum, and the number of rounds is a tuning choice, not a convergence test.

The local objective is the scikit-learn logistic objective per site on globally standardized features (global
means and SDs come from one sufficient-statistics round), scaled by 1/n for the step size:
``(C * sum(log loss) + 0.5 * ||w||^2) / n`` plus FedProx's ``mu/2 * ||w - w_global||^2``.
"""
from __future__ import annotations

import numpy as np
import scipy.special


def local_update(z: np.ndarray, y: np.ndarray, weights: np.ndarray, *, C: float, epochs: int, lr: float,
                 mu: float = 0.0) -> np.ndarray:
    """Site step: ``epochs`` gradient steps from the global ``weights`` = (intercept, w) on standardized rows."""
    n = len(y)
    a = np.column_stack([np.ones(n), z])
    w0 = np.asarray(weights, dtype=float)
    w = w0.copy()
    for _ in range(int(epochs)):
        p = scipy.special.expit(a @ w)
        grad = C * a.T @ (p - y) / n
        grad[1:] += w[1:] / n          # L2 penalty (intercept unpenalized), as scikit-learn
        grad += mu * (w - w0)          # FedProx proximal term
        w -= lr * grad
    return w
