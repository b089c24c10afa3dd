"""Soundness of sequential CERTIFY by simulation: the rate of wrong certificates on Bernoulli oracles.

End to end on the engine (selection or the label as the candidate, rounds, the confidence sequence, the budget
test, the futility rule, the stop): oracles whose p_A is known exactly, just below and just above each threshold
Phi(r / sigma), at 1/2 and at 1; alpha = 0.05, n0 = 20, n_max = 1,000, sigma = 0.5, targets r in {0, 0.25, 0.5, 1}
(r = 1 is out of reach of 1,000 samples: the budget test refutes it). A certificate is wrong when its class is not
g(x) (class 0, the label, when p_A > 1/2; no class when p_A = 1/2) or its radius exceeds the true
sigma * Phi^-1(p_A). The rate must stay within alpha up to binomial error (standard error
sqrt(alpha (1 - alpha) / trials)); the last column is the smallest one-sided binomial p-value
P(Binomial(trials, alpha) >= wrong) over the p_A (below 0.001 would say the rate exceeds alpha). The same stopping
times read through a point-estimate certifier (trust k / t) show that the check has power. Rows: the betting
sequence under the early schedule (both candidates) and the chunk schedule, the union bound.

    python benchmarks/soundness_oracles.py --trials 2000
"""

from __future__ import annotations

import argparse
import math

from scipy.stats import binom, norm

from dmae.smoothing import Smooth
from dmae.smoothing.sequential import SequentialSettings, oracle_certificates

SIGMA, ALPHA, N0, N_MAX = 0.5, 0.05, 20, 1000
RADII = (0.0, 0.25, 0.5, 1.0)


def rates(settings: SequentialSettings, p: float, trials: int, seed: int) -> tuple[float, float, float]:
    """(wrong-certificate rate, point-estimate certifier's wrong rate, mean samples) at p_A = ``p``."""
    true_radius = SIGMA * norm.ppf(p) if p < 1 else math.inf
    wrong = naive = samples = 0
    for c in oracle_certificates(settings, SIGMA, [p] * trials, seed=seed):
        if c.prediction != Smooth.ABSTAIN:
            wrong += c.prediction != 0 or p == 0.5 or c.radius_continuous > true_radius or c.radius > true_radius
        t = c.n_samples - c.n_select
        if t > 0 and c.n_a / t > 0.5:
            naive += p == 0.5 or SIGMA * norm.ppf(min(c.n_a / t, 1 - 1e-12)) > true_radius
        samples += c.n_samples
    return wrong / trials, naive / trials, samples / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000, help="oracles per p_A")
    args = ap.parse_args()
    taus = [norm.cdf(r / SIGMA) for r in RADII[1:]]
    ps = [0.5, 1.0] + [t + d for t in taus for d in (-0.01, 0.01)]
    se = math.sqrt(ALPHA * (1 - ALPHA) / args.trials)
    print(f"alpha={ALPHA}, {args.trials} oracles per p_A (standard error of a rate: {se:.4f})")
    head = "| sequence, schedule, candidate | mode | " + " | ".join(f"p_A={p:.4f}" for p in ps)
    print(head + " | point estimate (all p_A) | least p-value |")
    print("|---|---|" + "---|" * (len(ps) + 2))
    rows = [("betting", "early", "select"), ("betting", "early", "label"), ("betting", "chunks", "select")]
    for sequence, schedule, candidate in [*rows, ("union", "early", "select"), ("union", "early", "label")]:
        for mode in ("targets", "continuous"):
            s = SequentialSettings(
                N0, N_MAX, ALPHA, mode, RADII, epsilon=0.02, sequence=sequence, candidate=candidate, schedule=schedule
            )
            res = [rates(s, p, args.trials, seed=100 + j) for j, p in enumerate(ps)]
            naive = sum(r[1] for r in res) / len(res)
            least = min(binom.sf(round(r[0] * args.trials) - 1, args.trials, ALPHA) for r in res)
            print(
                f"| {sequence}, {schedule}, {candidate} | {mode} | "
                + " | ".join(f"{r[0]:.3f}" for r in res)
                + f" | {naive:.2f} | {least:.2g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
