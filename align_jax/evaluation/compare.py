"""Policy-versus-reference quantities and head-to-head win rates, numpy only: KL(pi || pi_ref) and entropy
estimates from per-token log-probs of completions sampled from the policy, a judge's win rate with its standard
error, and AlpacaEval 2's length-controlled win rate in its simple form.

Inputs are ``[B, T]`` arrays of per-token log-probs of B sampled completions (padded to T) and a ``[B, T]`` mask
(1 / True on completion tokens), as the evaluation driver computes them (e.g. with
``align_jax.ops.logprobs.token_logps``); positions outside the mask are ignored, whatever they hold (NaN and -inf
included).

* ``kl_estimates``: Schulman's k1 / k2 / k3 estimators ("Approximating KL Divergence", 2020,
  joschu.net/blog/kl-approx.html), summed over each sequence; means over sequences and per token.
* ``entropy_estimate``: the Monte-Carlo estimate of the sequence entropy, -E[log pi(y)].
* ``win_rate``: mean judge preference with its standard error (as AlpacaEval reports it).
* ``length_controlled_win_rate``: Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to Debias
  Automatic Evaluators" (arXiv:2404.04475; reference: tatsu-lab/alpaca_eval ``metrics/glm_winrate.py``), without
  the instruction-difficulty term (see its docstring).
* ``text_lengths`` / ``mean_length`` / ``sequence_lengths``: length helpers.

Results are dicts of plain Python values (floats, ints, lists), ready for ``json.dump``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _masked(logp_BxT, mask_BxT, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(`logp` with masked-out entries set to 0, the mask as float), both [B, T]; validates shapes."""
    lp = np.asarray(logp_BxT, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"{name} must be [B, T] (one row of per-token log-probs per sequence), got shape {lp.shape}")
    m = np.ones_like(lp) if mask_BxT is None else np.asarray(mask_BxT)
    if m.shape != lp.shape:
        raise ValueError(f"mask {m.shape} and {name} {lp.shape} differ in shape")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask selects no token")
    bad = m & np.isnan(lp)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"{name}[{b}, {t}] is NaN inside the mask")
    return np.where(m, lp, 0.0), m.astype(np.float64)


def kl_estimates(logp_policy_BxT, logp_ref_BxT, mask_BxT=None) -> dict:
    """Monte-Carlo estimates of KL(pi || pi_ref) from completions y ~ pi (Schulman 2020, "Approximating KL
    Divergence"). With the per-token log-ratio ``r_t = log pi_ref(y_t | .) - log pi(y_t | .)`` on the masked tokens
    of a sequence, the per-sequence estimates are

        k1 = sum_t -r_t = sum_t (log pi - log pi_ref)     (unbiased for the sequence KL; can be negative)
        k2 = sum_t r_t^2 / 2                               (biased, low variance)
        k3 = sum_t (exp(r_t) - 1 - r_t)                   (unbiased per token, >= 0; the GRPO / TRL "k3")

    (each term is an estimate of the per-token KL given the prefix; summed over the sequence, k1 and k3 estimate
    the KL between the two sequence distributions). Returns the per-sequence lists ``k1``, ``k2``, ``k3`` [B],
    their means over sequences ``k1_mean``, ``k2_mean``, ``k3_mean``, and per token ``k1_per_token`` etc. (the sum
    over all masked tokens / the number of masked tokens), ``num_sequences``, ``num_tokens``. Sequences without a
    masked token contribute 0 to the sums and count in the means over sequences.
    """
    lp, m = _masked(logp_policy_BxT, mask_BxT, "logp_policy_BxT")
    lr, _ = _masked(logp_ref_BxT, mask_BxT, "logp_ref_BxT")
    if lp.shape != lr.shape:
        raise ValueError(f"logp_policy_BxT {lp.shape} and logp_ref_BxT {lr.shape} differ in shape")
    r = (lr - lp) * m
    with np.errstate(over="ignore"):
        terms = {"k1": -r, "k2": 0.5 * r * r, "k3": (np.expm1(r) - r) * m}
    n_tok = float(m.sum())
    out = {}
    for k, t in terms.items():
        seq = t.sum(axis=1)
        out[k] = seq.tolist()
        out[f"{k}_mean"] = float(seq.mean())
        out[f"{k}_per_token"] = float(seq.sum() / n_tok)
    out["num_sequences"], out["num_tokens"] = int(lp.shape[0]), int(n_tok)
    return out


def entropy_estimate(logp_BxT, mask_BxT=None) -> dict:
    """Monte-Carlo estimate of the policy's entropy from its own samples y ~ pi:
    ``H(pi) = E_y[-log pi(y)] ~= -(1/B) sum_b sum_t log pi(y_bt | y_b<t)``. Returns the per-sequence values
    ``-sum_t log pi(y_bt | .)`` (``per_sequence``, a list of B floats), their mean (``mean``) and per token
    (``per_token``: minus the sum over all masked tokens / their number), ``num_sequences``, ``num_tokens``."""
    lp, m = _masked(logp_BxT, mask_BxT, "logp_BxT")
    seq = -lp.sum(axis=1)
    n_tok = float(m.sum())
    return {"per_sequence": seq.tolist(), "mean": float(seq.mean()), "per_token": float(seq.sum() / n_tok),
            "num_sequences": int(lp.shape[0]), "num_tokens": int(n_tok)}


# ----------------------------------------------------------------------------------------------------------
# Win rates
# ----------------------------------------------------------------------------------------------------------


def _preferences(pref, name: str = "pref") -> np.ndarray:
    p = np.asarray(pref, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of preferences, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name}: preferences must lie in [0, 1] (1 win, 0.5 tie, 0 loss)")
    return p


def win_rate(pref: Sequence[float]) -> dict:
    """Win rate of system A over B from judge preferences ``p_i`` in [0, 1] (1 = A wins, 0.5 = tie, 0 = A loses;
    probabilities are accepted too, as AlpacaEval's weighted judges give):

        win_rate = mean_i p_i,   standard_error = std(p, ddof=1) / sqrt(n)

    (AlpacaEval's ``get_winrate``: the mean preference and its pandas ``sem``; it reports both x 100). Returns
    ``{"win_rate", "standard_error" (None for n = 1), "num", "wins" (p > 0.5), "ties" (p = 0.5), "losses"}``."""
    p = _preferences(pref)
    n = p.size
    return {"win_rate": float(p.mean()),
            "standard_error": float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "num": int(n), "wins": int((p > 0.5).sum()), "ties": int((p == 0.5).sum()),
            "losses": int((p < 0.5).sum())}


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int = 100, tol: float = 1e-12):
    """Minimises sum_i BCE(y_i, sigmoid(a + b x_i)) + l2 b^2 / 2 over (a, b) by Newton's method with step halving
    (the objective is convex; y may be fractional). Returns (a, b, converged, iterations)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    pen = np.array([0.0, l2])

    def loss(th):
        z = X @ th
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * th[1] ** 2)

    f = loss(theta)
    for it in range(1, max_iter + 1):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) + pen * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(pen)
        try:
            step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        except np.linalg.LinAlgError:
            step = grad
        t = 1.0
        while True:
            new = theta - t * step
            f_new = loss(new)
            if f_new <= f + 1e-15 or t < 1e-10:
                break
            t /= 2
        done = abs(f - f_new) <= tol * max(1.0, abs(f)) and np.max(np.abs(new - theta)) < 1e-9
        theta, f = new, f_new
        if done:
            return float(theta[0]), float(theta[1]), True, it
    return float(theta[0]), float(theta[1]), False, max_iter


def length_controlled_win_rate(pref: Sequence[float], len_a: Sequence[float], len_b: Sequence[float], *,
                               l2: float = 1e-2) -> dict:
    """AlpacaEval 2's length-controlled (LC) win rate of A over B, simple form (Dubois et al. 2024; reference
    ``alpaca_eval/metrics/glm_winrate.py``, GLM ``length_controlled_v1``).

    Fits the logistic model (targets p_i in [0, 1], ties as 0.5; maximum likelihood with the cross-entropy of
    fractional targets, Newton's method, an L2 penalty ``l2 * theta1^2 / 2`` on the length coefficient only so
    that it stays finite when length separates wins from losses)

        P(A wins on i) = sigmoid(theta0 + theta1 * tanh(d_i / std(d))),   d_i = len_a_i - len_b_i

    (std with ddof=1, as pandas' ``std`` in the reference) and reports ``sigmoid(theta0)``: the predicted win rate
    when the two outputs have the same length. When every d_i is equal (std 0, e.g. equal lengths), the length
    feature is 0, theta1 = 0 and the LC win rate is the raw one.

    Left out of the reference GLM: the instruction-difficulty term ``instruction_difficulty`` (a per-instruction
    intercept AlpacaEval estimates from many models' annotations, which would make the LC win rate the mean over
    instructions of sigmoid(theta0 + gamma * difficulty_i)), the regularisation towards AlpacaEval's "gamed"
    baselines, and the L1 penalty chosen by 5-fold cross-validation (liblinear). With a small l2 the fit is close
    to unregularised maximum likelihood. If all preferences are 1 (or all 0), theta0 is +inf (-inf) and the LC win
    rate 1 (0).

    Returns ``{"length_controlled_win_rate", "win_rate", "theta0", "theta1", "length_scale" (std(d)), "num",
    "converged", "iterations"}``.
    """
    p = _preferences(pref)
    a, b = np.asarray(len_a, dtype=np.float64), np.asarray(len_b, dtype=np.float64)
    if a.shape != p.shape or b.shape != p.shape:
        raise ValueError(f"pref {p.shape}, len_a {a.shape} and len_b {b.shape} must have the same 1-D shape")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("len_a and len_b must be finite")
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    d = a - b
    scale = float(d.std(ddof=1)) if d.size > 1 else 0.0
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    raw = float(p.mean())
    base = {"win_rate": raw, "length_scale": scale, "num": int(p.size)}
    if raw in (0.0, 1.0):  # all losses or all wins: theta0 -> -/+inf; the penalty keeps theta1 at 0
        return {"length_controlled_win_rate": raw, "theta0": math.copysign(math.inf, raw - 0.5), "theta1": 0.0,
                "converged": True, "iterations": 0, **base}
    theta0, theta1, converged, iters = _fit_logistic(x, p, l2)
    return {"length_controlled_win_rate": float(_sigmoid(theta0)), "theta0": theta0, "theta1": theta1,
            "converged": converged, "iterations": iters, **base}


# ----------------------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------------------


def text_lengths(texts: Sequence[str]) -> np.ndarray:
    """Length in characters of each text (AlpacaEval measures output length as ``str.len()``)."""
    return np.asarray([len(t) for t in texts], dtype=np.int64)


def mean_length(texts: Sequence[str]) -> float:
    """Mean length in characters of `texts` (AlpacaEval's ``avg_length``, unrounded)."""
    if not len(texts):
        raise ValueError("mean_length: no texts")
    return float(text_lengths(texts).mean())


def sequence_lengths(mask_BxT) -> np.ndarray:
    """Number of masked (completion) tokens of each sequence of a [B, T] mask."""
    m = np.asarray(mask_BxT)
    if m.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {m.shape}")
    return m.astype(bool).sum(axis=1)
