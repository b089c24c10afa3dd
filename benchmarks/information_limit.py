"""Sequential CERTIFY against the information limit, on Bernoulli streams through the real engine.

For a target radius r at noise sigma, the threshold is tau = Phi(r / sigma). An image whose every sample votes for
its class (p_A = 1) can have a level-alpha lower bound above tau only after t >= ln(1/alpha) / ln(1/tau) samples:
at p_A = tau, t successes in a row have probability tau^t, and a procedure that certified after fewer would be
wrong more often than alpha. In general a sequential test telling p_A from tau needs about
ln(1/alpha) / KL(p_A || tau) samples in expectation (Wald). This script measures, for alpha = 0.001,
n_max = 10,000, sigma in {0.25, 0.5, 1.0} and each standard target radius (one target per run):

1. the samples an image with p_A = 1 costs, against that limit: before (the chunk schedule, which reproduces the
   earlier engine: ``schedule="chunks"``), now with the selection step (``candidate="select"``, the early schedule)
   and now with the label as the candidate (``candidate="label"``: no selection samples);
2. on a grid of p_A around each threshold (tau + z sqrt(tau (1 - tau)), z in -0.2 .. 0.2, within [1/2, 1]), the
   mean samples per image before and now (the same oracle streams: seeds name the noise), with the fraction
   certified.

The engine is run on two-class oracles (``oracle_certificates``: class 0 with probability p_A), so an oracle
costs what a model with that p_A would. Samples include the selection samples where there are any.

``--designs`` measures the choices behind the early schedule (the betting sequence's prior b, the last look's
share of alpha, the spacing of the looks, where the futility rule is evaluated) on the same thresholds, with a
replica of the engine's targets-mode decisions (per look, the least count the lower bound certifies at and the
largest counts the upper bound and the budget / futility rules refute at; the running bounds as the engine keeps
them) on common random streams: every design sees the same streams, so their differences are paired. Per design
and threshold: the samples at p_A = 1 against the limit, the mean estimation samples over the grid, the paired
difference to the chunk schedule at each grid point (mean and standard error), and the streams whose target
fixed-n CERTIFY (Clopper-Pearson at alpha after n_max samples of the same stream) certifies and the design does
not. ``--selection`` measures the early selection rule (selection samples and wrong guesses on two-class streams).

    python benchmarks/information_limit.py --streams 200 --json limit.json
    python benchmarks/information_limit.py --designs --streams 10000
    python benchmarks/information_limit.py --selection
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from dmae.smoothing.bounds import lower_confidence_bound
from dmae.smoothing.confseq import LEGACY_BETTING, BettingMixture, refute_ceiling, threshold
from dmae.smoothing.sequential import (
    DEFAULT_FUTILITY,
    SequentialSettings,
    chunk_looks,
    early_looks,
    geometric_looks,
    majority_needed,
    oracle_certificates,
)

ALPHA, N_MAX, N0 = 0.001, 10_000, 100
SIGMAS = (0.25, 0.5, 1.0)
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
Z_GRID = (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2)
SETTINGS = {  # name -> (candidate, schedule)
    "before": ("select", "chunks"),
    "select": ("select", "early"),
    "label": ("label", "early"),
}


def limit(tau: float, alpha: float = ALPHA) -> float:
    """ln(1/alpha) / ln(1/tau): the fewest all-success samples after which a level-alpha bound can exceed tau."""
    return math.log(1 / alpha) / math.log(1 / tau)


def run(name: str, tau_radius: float, sigma: float, ps: list[float], streams: int) -> list[tuple[float, float]]:
    """Per p: (mean samples per image, fraction certified at the target) of setting ``name`` over ``streams``
    oracles with class-0 probability p (the label is class 0)."""
    candidate, schedule = SETTINGS[name]
    settings = SequentialSettings(N0, N_MAX, ALPHA, "targets", (tau_radius,), candidate=candidate, schedule=schedule)
    out = []
    for j, p in enumerate(ps):
        certs = oracle_certificates(settings, sigma, [p] * streams, seed=1000 + j)
        good = [c.prediction == 0 and c.radius >= tau_radius for c in certs]
        out.append((float(np.mean([c.n_samples for c in certs])), float(np.mean(good))))
    return out


def grid(tau: float) -> list[float]:
    """p_A around ``tau``: tau + z sqrt(tau (1 - tau)) for z in ``Z_GRID``, kept within [1/2, 1]."""
    sd = math.sqrt(tau * (1 - tau))
    return sorted({round(tau + z * sd, 6) for z in Z_GRID if 0.5 <= tau + z * sd <= 1.0})


def targets() -> dict[float, tuple[float, float]]:
    """The distinct thresholds of the (sigma, r) pairs: z = r / sigma -> (sigma, r) of its first pair."""
    out: dict[float, tuple[float, float]] = {}
    for sigma in SIGMAS:
        for r in RADII:
            out.setdefault(round(r / sigma, 6), (sigma, r))
    return dict(sorted(out.items()))


def measure(streams: int) -> dict:
    """Every measurement of the module docstring, by threshold z = r / sigma (the samples depend on tau only)."""
    results = {}
    for z, (sigma, r) in targets().items():
        t0 = time.perf_counter()
        tau = threshold(r, sigma)
        ps = grid(tau)
        entry = {"tau": tau, "limit": limit(tau), "certifiable": tau < ALPHA ** (1 / N_MAX), "grid": ps}
        for name in SETTINGS:
            entry[name + "_p1"] = run(name, r, sigma, [1.0], 1)[0][0]
            entry[name] = run(name, r, sigma, ps, streams)
        results[z] = entry
        print(f"  z = {z:g} (tau {tau:.5f}): {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def print_tables(results: dict) -> None:
    """The two Markdown tables of the module docstring."""
    by_z = {float(z): e for z, e in results.items()}
    print("\n| sigma | r | tau | limit | before (n0 = 100, chunk looks) | select (now) | label (now) |")
    print("|---|---|---|---|---|---|---|")
    for sigma in SIGMAS:
        for r in RADII:
            e = by_z[round(r / sigma, 6)]
            if not e["certifiable"]:
                print(f"| {sigma:g} | {r:g} | {e['tau']:.5f} | {e['limit']:,.0f} | not certifiable at n_max | | |")
                continue
            cells = [f"{e[n + '_p1']:,.0f} ({e[n + '_p1'] / e['limit']:.2f}x)" for n in SETTINGS]
            print(f"| {sigma:g} | {r:g} | {e['tau']:.5f} | {e['limit']:,.1f} | " + " | ".join(cells) + " |")
    print("\nMean samples per image, before -> select (now) / label (now), certified % in brackets (same order):\n")
    print("| z = r / sigma | tau | " + " | ".join(f"z_p = {z:+g}" for z in Z_GRID) + " |")
    print("|---|---|" + "---|" * len(Z_GRID))
    for z, e in by_z.items():
        if not e["certifiable"]:
            continue
        sd = math.sqrt(e["tau"] * (1 - e["tau"]))
        cells = {round((p - e["tau"]) / sd, 2): i for i, p in enumerate(e["grid"])}
        row = []
        for zp in Z_GRID:
            i = cells.get(round(zp, 2))
            if i is None:
                row.append("")
                continue
            (b, cb), (s, cs), (lab, cl) = (e[n][i] for n in SETTINGS)
            row.append(f"{b:,.0f} -> {s:,.0f} / {lab:,.0f} ({100 * cb:.0f}/{100 * cs:.0f}/{100 * cl:.0f})")
        print(f"| {z:g} | {e['tau']:.5f} | " + " | ".join(row) + " |")


# (prior b, the last look's share, the looks' ratio, futility at every look): "chunks" is the schedule before
DESIGNS = {
    "chunks (before)": None,
    "b 0.5, 50%, 1.1": (0.5, 0.5, 1.1, False),
    "b 0.35, 45%, 1.05": (0.35, 0.45, 1.05, False),
    "b 0.35, 45%, 1.1 (default)": (0.35, 0.45, 1.1, False),
    "b 0.35, 45%, 1.2": (0.35, 0.45, 1.2, False),
    "b 0.35, 45%, 1.1, futility at every look": (0.35, 0.45, 1.1, True),
    "b 0.3, 50%, 1.1": (0.3, 0.5, 1.1, False),
    "b 0.4, 42%, 1.1": (0.4, 0.42, 1.1, False),
    "b 0.5, 30%, 1.1": (0.5, 0.3, 1.1, False),
}


def _least(ok, lo: int, hi: int) -> int:
    """The least k in [lo, hi] with ``ok(k)`` for ``ok`` monotone False -> True (hi + 1 if none)."""
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid - 1
        else:
            lo = mid + 1
    return lo


def design_tables(design: tuple | None, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The looks of ``design`` for the one target ``tau`` and, per look, the least count with lower > tau, the
    largest with upper < tau, and the largest with the budget / futility ceiling <= tau (the engine's rules)."""
    futility_looks = set(chunk_looks(N_MAX))
    if design is None:
        cs = BettingMixture(ALPHA, N_MAX, looks=chunk_looks(N_MAX), **LEGACY_BETTING)
    else:
        b, share, ratio, everywhere = design
        base = BettingMixture(ALPHA, N_MAX, prior=b, final_share=share, looks=chunk_looks(N_MAX))
        cs = BettingMixture(ALPHA, N_MAX, prior=b, final_share=share, looks=early_looks(base, [tau], ratio))
        futility_looks = set(cs.looks) if everywhere else futility_looks
    cert, up, ceil = (np.empty(len(cs.looks), dtype=np.int64) for _ in range(3))
    for j, t in enumerate(cs.looks):
        beta = DEFAULT_FUTILITY if t in futility_looks else None
        cert[j] = _least(lambda k, t=t: cs.lower(k, t) > tau, 0, t)
        up[j] = _least(lambda k, t=t: not cs.upper(k, t) < tau, 0, t) - 1
        ceil[j] = _least(lambda k, t=t, beta=beta: refute_ceiling(cs, k, t, beta) > tau, 0, t) - 1
    return np.array(cs.looks), cert, up, ceil


def replay(tables: tuple, fine: np.ndarray, k_fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The engine's targets-mode stop (estimation samples) and certification of every stream, from its counts
    ``k_fine [S, F]`` at the looks ``fine`` (a superset of the design's): certified once the lower bound clears
    tau at a look (running maximum), refuted once the upper bound falls below it (running minimum) or when the
    ceiling at the current look is <= tau; stop when decided or at n_max."""
    looks, cert, up, ceil = tables
    k = k_fine[:, np.searchsorted(fine, looks)]
    certified = np.maximum.accumulate(k >= cert, axis=1)
    settled = certified | np.maximum.accumulate(k <= up, axis=1) | (k <= ceil)
    settled[:, -1] = True
    stop = settled.argmax(1)
    return looks[stop], certified[np.arange(len(k)), stop]


def designs(streams: int) -> None:
    """``--designs``: see the module docstring. Printed per threshold, one line per design."""
    for z, (sigma, r) in targets().items():
        tau = threshold(r, sigma)
        if tau >= ALPHA ** (1 / N_MAX):
            continue
        tables = {name: design_tables(d, tau) for name, d in DESIGNS.items()}
        fine = np.unique(np.concatenate([t[0] for t in tables.values()]))
        ones = np.cumsum(np.diff(np.concatenate([[0], fine])))[None, :]
        stats: dict[str, list] = {name: [] for name in DESIGNS}
        for p in grid(tau):
            rng = np.random.default_rng(int(1e6 * p) + int(100 * z))
            k_fine = np.cumsum(rng.binomial(np.diff(np.concatenate([[0], fine]))[None, :].repeat(streams, 0), p), 1)
            fixed = np.array([lower_confidence_bound(int(k), N_MAX, ALPHA) > tau for k in k_fine[:, -1]])
            base = replay(tables["chunks (before)"], fine, k_fine)[0]
            for name, tab in tables.items():
                n, ok = replay(tab, fine, k_fine)
                d = n - base
                stats[name].append(
                    (n.mean(), d.mean(), d.std() / math.sqrt(streams), int((fixed & ~ok).sum()), fixed.sum())
                )
        print(f"z = r / sigma = {z:g}, tau {tau:.5f}, limit {limit(tau):.1f}:")
        for name, tab in tables.items():
            p1 = int(replay(tab, fine, ones)[0][0])
            st = stats[name]
            worst = max(st, key=lambda x: x[1] - 2 * x[2])
            mean = np.mean([x[0] for x in st])
            print(
                f"  {name:<42} p_A = 1: {p1:>5} ({p1 / limit(tau):.2f}x)  grid mean {mean:>6,.0f}"
                f"  worst vs before {worst[1]:+5.0f} +- {worst[2]:.0f}  lost {sum(x[3] for x in st)} of "
                f"{sum(x[4] for x in st)}"
            )


def selection(streams: int = 200_000) -> None:
    """``--selection``: selection samples and wrong guesses (the top class not chosen) of n0 = 100 at once and of
    early selection (stop at the first look where the top class reaches :func:`majority_needed`) on two-class
    streams with top-class probability p."""
    rules = {
        "n0 = 100 at once": (100,),
        "10, 15, 23, ... (default)": geometric_looks(100, 10, 1.5),
        "10, 20, 40": (10, 20, 40, 100),
        "7, 11, 17, ...": geometric_looks(100, 7, 1.5),
    }
    ps = (0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    print("| rule | " + " | ".join(f"p = {p:g}" for p in ps) + " |")
    print("|---|" + "---|" * len(ps))
    for name, looks in rules.items():
        cells = []
        for p in ps:
            rng = np.random.default_rng(0)
            k, prev = np.zeros(streams, dtype=np.int64), 0
            n, right, open_ = np.full(streams, 100), np.zeros(streams, bool), np.ones(streams, bool)
            for m in looks:
                k += rng.binomial(m - prev, p, streams)
                prev = m
                stop = open_ & ((np.maximum(k, m - k) >= majority_needed(m)) | (m == 100))
                n[stop], right[stop], open_ = m, k[stop] >= m - k[stop], open_ & ~stop
            cells.append(f"{n.mean():.0f} / {100 * (1 - right.mean()):.2f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200, help="oracle streams per p_A of the grid")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--tables-from", default=None, help="print the tables of an earlier --json (nothing is run)")
    ap.add_argument("--designs", action="store_true", help="measure the schedule's design choices (see above)")
    ap.add_argument("--selection", action="store_true", help="measure the early selection rule (see above)")
    args = ap.parse_args()
    if args.designs:
        designs(args.streams)
        return
    if args.selection:
        selection()
        return
    if args.tables_from:
        print_tables(json.loads(Path(args.tables_from).read_text()))
        return
    results = measure(args.streams)
    if args.json:
        Path(args.json).write_text(json.dumps({str(z): e for z, e in results.items()}, indent=1))
    print_tables({str(z): e for z, e in results.items()})


if __name__ == "__main__":
    main()
