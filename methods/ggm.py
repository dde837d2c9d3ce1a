"""GGM-l2,g (Zheng & Cao, arXiv 2412.08592): principal components chosen by an
l2,g-regularised Gaussian graphical model.

Nodes. For every query / key / value weight W = U S V^T of the encoder (SVD), the top `rank`
components are nodes: component i trains u_i and s_i v_i^T (d_out + d_in parameters, as the
authors' `top_layer`); every bias vector of the attention and feed-forward Linears of each layer
is a node too. (The authors' code: r = 10 on q/k/v, 434 nodes on roberta-base.)

Node statistics. Over `batches` scoring batches at theta0 (no update; the authors collect during
their epoch 1 of training, which leaves unselected nodes moved, pitfall P7), each entry's
sensitivity I = |theta * grad| is smoothed AdaLoRA-style: Ibar <- b1 Ibar + (1 - b1) I,
Ubar <- b2 Ubar + (1 - b2) |I - Ibar|, score = Ibar * Ubar; a node's value is the mean score of
its entries (for a component: the mean of its u-part and its s v-part means). Each batch gives a
sample row; rows are log-transformed (log 0 -> -200) and L2-normalised; S is their covariance
and m their column means. The `important` nodes I are the top ones by m.

The model. With the precision matrix Omega and an auxiliary Delta,
    min  -log det Omega + tr(S Omega) + lam ||Omega - Delta||_F^2 + tau sum_{j not in I} g(||Delta[I, j]||_2)
solved by block coordinate descent, each block minimised exactly, so the objective never
increases:
  - Delta-step: Delta = Omega off the penalised blocks; for j not in I, with v = Omega[I, j],
    Delta[I, j] = t* v / ||v|| where t* = argmin_{t >= 0} lam (t - ||v||)^2 + tau g(t) (closed
    form for l1; for the non-convex surrogates the 1-D minimum is found on a grid refined by
    bounded Brent search, and t = 0 is always a candidate).
  - Omega-step: the minimiser of -log det Omega + tr(S Omega) + lam ||Omega - D||^2 with
    D = (Delta + Delta^T)/2 is Q diag(w) Q^T where 2 lam D - S = Q diag(mu) Q^T and
    w = (mu + sqrt(mu^2 + 8 lam)) / (4 lam) (stationarity 2 lam Omega - Omega^-1 = 2 lam D - S).
  The authors' code takes an Omega-step that is not a descent step on this objective (see
  methods-research.md 1.12); ours is its exact minimiser.
Surrogates g: "l1" (g(t) = t, the convex l2,1 group lasso), "log" (g(t) = log(1 + t / eps)),
"etp" (g(t) = (1 - exp(-gamma t)) / (1 - exp(-gamma))), "lp" (g(t) = t^p, the authors' p = 0.9).

Selection. Node j's score is ||Delta[I, j]||_2 (its interaction with the important nodes); the
important nodes come first, then the others by score, each taken if its parameter cost still
fits the budget (a greedy cost-aware fill: the paper budgets in nodes, peftbench in parameters).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize

SURROGATES = ("l1", "log", "etp", "lp")


def surrogate(kind: str, eps: float = 0.1, gamma: float = 5.0, p: float = 0.9):
    """g(t) for t >= 0, vectorised over numpy arrays."""
    if kind == "l1":
        return lambda t: t
    if kind == "log":
        return lambda t: np.log1p(t / eps)
    if kind == "etp":
        return lambda t: (1 - np.exp(-gamma * t)) / (1 - math.exp(-gamma))
    if kind == "lp":
        return lambda t: np.power(t, p)
    from peftbench.errors import UsageError

    raise UsageError(f"surrogate {kind!r} is unknown: allowed {', '.join(SURROGATES)}")


def scalar_prox(nu: float, lam: float, tau: float, g, kind: str) -> float:
    """argmin_{t >= 0} lam (t - nu)^2 + tau g(t); the minimiser lies in [0, nu] (g increasing)."""
    if kind == "l1":
        return max(0.0, nu - tau / (2 * lam))
    if nu <= 0:
        return 0.0
    f = lambda t: lam * (t - nu) ** 2 + tau * float(g(np.asarray(t)))
    grid = np.linspace(0.0, nu, 65)
    values = lam * (grid - nu) ** 2 + tau * g(grid)
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    candidates = [(values[i], grid[i]), (f(0.0), 0.0), (best.fun, best.x)]
    return float(min(candidates)[1])


def objective(omega, delta, s, important, lam, tau, g) -> float:
    sign, logdet = np.linalg.slogdet(omega)
    if sign <= 0:
        return math.inf
    others = [j for j in range(len(s)) if j not in set(important)]
    norms = np.linalg.norm(delta[np.ix_(important, others)], axis=0)
    return float(-logdet + np.trace(s @ omega) + lam * np.sum((omega - delta) ** 2)
                 + tau * np.sum(g(norms)))


def omega_step(s: np.ndarray, delta: np.ndarray, lam: float) -> np.ndarray:
    d = (delta + delta.T) / 2
    mu, q = np.linalg.eigh(2 * lam * d - s)
    w = (mu + np.sqrt(mu ** 2 + 8 * lam)) / (4 * lam)
    return (q * w) @ q.T


def delta_step(omega: np.ndarray, important: list[int], lam: float, tau: float, g, kind: str) -> np.ndarray:
    delta = omega.copy()
    rows = np.asarray(important)
    for j in range(len(omega)):
        if j in set(important):
            continue
        v = omega[rows, j]
        nu = float(np.linalg.norm(v))
        t = scalar_prox(nu, lam, tau, g, kind)
        delta[rows, j] = v * (t / nu) if nu > 0 else 0.0
    return delta


def solve_ggm(s: np.ndarray, important: list[int], lam: float = 1.0, tau: float = 0.1,
              kind: str = "lp", max_iter: int = 200, tol: float = 1e-8, **g_params):
    """Block coordinate descent; returns (Omega, Delta, objective values per iteration)."""
    g = surrogate(kind, **g_params)
    omega = np.linalg.pinv(s + 1e-3 * np.eye(len(s)))
    omega = (omega + omega.T) / 2
    delta = delta_step(omega, important, lam, tau, g, kind)
    history = [objective(omega, delta, s, important, lam, tau, g)]
    for _ in range(max_iter):
        omega = omega_step(s, delta, lam)
        delta = delta_step(omega, important, lam, tau, g, kind)
        history.append(objective(omega, delta, s, important, lam, tau, g))
        if abs(history[-2] - history[-1]) <= tol * max(1.0, abs(history[-1])):
            break
    return omega, delta, history
