"""Calibration of the preference probabilities a trained model implies, against known true probabilities.

Each method implies a Bradley–Terry probability that y_w is preferred to y_l:

    reward model      p̂ = σ(r(x, y_w) − r(x, y_l))                                   (Bradley–Terry, RM loss)
    DPO               p̂ = σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])
                                             (the implicit reward model, Rafailov et al. 2023, Eqs. 5-7)
    ORPO              p̂ = σ(log odds(y_w) − log odds(y_l)),  odds(y) = P(y)/(1 − P(y)),  P(y) = exp(mean_t log π(y_t))
                                             (the odds ratio inside L_OR, Hong et al. 2024, Eqs. 4-7)

and a task with a known generative preference model (the toy task: p = σ((gold_w − gold_l)/1.5)) gives the true p.
`calibration_metrics` compares them: the mean absolute error |p̂ − p| and the expected calibration error (ECE,
Naeini et al. 2015 / Guo et al. 2017) with the true probabilities in place of 0/1 outcomes:
ECE = Σ_b (n_b/N)·|mean_b p̂ − mean_b p| over equal-width bins of p̂.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def _sigmoid(x):
    return expit(np.asarray(x, np.float64))


def bt_probs(score_chosen, score_rejected) -> np.ndarray:
    """Reward model: σ(r_w − r_l)."""
    return _sigmoid(np.asarray(score_chosen, np.float64) - np.asarray(score_rejected, np.float64))


def dpo_probs(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float) -> np.ndarray:
    """DPO's implicit Bradley–Terry probability from sequence log-probs (sums over completion tokens)."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return _sigmoid(beta * ((f(logp_chosen) - f(ref_chosen)) - (f(logp_rejected) - f(ref_rejected))))


def log_odds(mean_logp) -> np.ndarray:
    """log(P/(1 − P)) with P = exp(mean_logp) < 1: mean_logp − log(1 − exp(mean_logp)) (computed stably)."""
    m = np.asarray(mean_logp, np.float64)
    return m - np.log(-np.expm1(np.minimum(m, -1e-12)))


def orpo_probs(mean_logp_chosen, mean_logp_rejected) -> np.ndarray:
    """ORPO's odds-ratio probability from length-normalised (mean per-token) log-probs."""
    return _sigmoid(log_odds(mean_logp_chosen) - log_odds(mean_logp_rejected))


def calibration_metrics(p_hat, p_true, bins: int = 10) -> dict:
    """{"prob_error": mean |p̂ − p|, "ece": binned expected calibration error against p, "mean_p_hat",
    "mean_p_true"}; bins of p̂ are [0, 1/bins), ..., [1 − 1/bins, 1]."""
    p_hat, p_true = np.asarray(p_hat, np.float64), np.asarray(p_true, np.float64)
    if p_hat.shape != p_true.shape or p_hat.ndim != 1 or not len(p_hat):
        raise ValueError(f"need two equal-length 1-d arrays, got {p_hat.shape} and {p_true.shape}")
    which = np.minimum((p_hat * bins).astype(int), bins - 1)
    ece = sum(abs(p_hat[which == b].mean() - p_true[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    return {"prob_error": float(np.mean(np.abs(p_hat - p_true))), "ece": float(ece),
            "mean_p_hat": float(p_hat.mean()), "mean_p_true": float(p_true.mean())}
