"""The stopping rules of sequential CERTIFY against fixed-n CERTIFY, on simulated Bernoulli streams.

Sequential CERTIFY's guarantee does not depend on when it stops (docs/sequential.md); what the stopping rules
and the alpha split change is how many samples it draws and how often it misses a target that fixed-n CERTIFY
(Clopper-Pearson at alpha after n = n_max samples) certifies on the same stream. Three settings are run on the
same streams, through the engine's own decisions (its looks, alpha = 0.001, n_max = 10,000):

* ``before``: the betting sequence with 98% of alpha on the last look, no futility rule (the earlier default);
* ``futility``: the same sequence with the futility rule at beta = 0.01;
* ``default``: the default of the chunk schedule (``schedule="chunks"``: the last look's share 0.5, futility at
  0.01), the shipped default when this was measured; the early schedule that replaced it is measured by
  ``information_limit.py``.

All three use the chunk schedule's looks and the betting sequence's prior b = 0.5 of that time.

Part 1 ("band"): p_A just around a threshold Phi(r / sigma), where fixed-n certifies only part of the time and a
stopping rule can lose most. Part 2 (``--results JSON`` from ``sequential_certify.py --json``): streams at the
per-image p_A measured on real classifiers, against the data set's standard radii; the mean samples per image
(n0 = 100 included) and the ratio to fixed-n's 10,100.

    python benchmarks/futility_power.py --streams 400 --results results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmae.data import dataset_info
from dmae.smoothing.confseq import Decision, _cp_lower, decide, make_sequence, threshold
from dmae.smoothing.sequential import CHUNK, SequentialSettings, chunk_looks, sequence_for

ALPHA, N_MAX, N0 = 0.001, 10_000, 100


def _settings() -> dict[str, tuple[object, float | None]]:
    looks = chunk_looks(N_MAX)
    default = SequentialSettings(N0, N_MAX, ALPHA, schedule="chunks")
    return {
        "before": (make_sequence("betting", ALPHA, N_MAX, looks=looks, final_share=0.98, prior=0.5), None),
        "futility": (make_sequence("betting", ALPHA, N_MAX, looks=looks, final_share=0.98, prior=0.5), 0.01),
        "default": (sequence_for(default), default.futility),
    }


def _run(cs, counts: np.ndarray, taus: list[float], futility: float | None) -> tuple[int, np.ndarray]:
    """Feed the counts at the looks to ``decide`` until nothing is OPEN: the stop and the certified targets
    (a target once certified stays certified: the engine keeps the running maximum of the lower bound)."""
    certified = np.zeros(len(taus), dtype=bool)
    for t, k in zip(cs.looks, counts, strict=True):
        d = decide(cs, int(k), t, taus, futility)
        certified |= np.array([x == Decision.CERTIFIED for x in d])
        if Decision.OPEN not in d:
            return t, certified
    raise AssertionError("the last look decides every target")


def _compare(streams: list[np.ndarray], taus: list[float]) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """Per setting: mean estimation samples, and per target the streams fixed-n certifies / the setting misses."""
    out = {}
    for name, (cs, futility) in _settings().items():
        samples, fixed, lost = 0, np.zeros(len(taus), int), np.zeros(len(taus), int)
        for counts in streams:
            t, got = _run(cs, counts, taus, futility)
            want = np.array([_cp_lower(int(counts[-1]), N_MAX, ALPHA) > tau for tau in taus])
            samples += t
            fixed += want
            lost += want & ~got
        out[name] = (samples / len(streams), fixed, lost)
    return out


def _streams(rng: np.random.Generator, p: float, count: int) -> list[np.ndarray]:
    steps = np.diff((0, *chunk_looks(N_MAX)))
    return [np.cumsum(rng.binomial(steps, p)) for _ in range(count)]


def band(streams: int, sigma: float, radius: float, offsets: list[float], seed: int) -> None:
    tau = threshold(radius, sigma)
    rng = np.random.default_rng(seed)
    names = list(_settings())
    print(
        f"\nsigma={sigma}, r={radius} (threshold {tau:.4f}), {streams} streams per p_A: fixed-n certifies / "
        "lost by each setting (mean estimation samples)"
    )
    print("| p_A - threshold | fixed-n certifies | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for off in (o for o in offsets if tau + o <= 1.0):
        res = _compare(_streams(rng, tau + off, streams), [tau])
        fixed = res[names[0]][1][0]
        print(
            f"| {off:+.3f} | {fixed} | " + " | ".join(f"{res[n][2][0]} lost ({res[n][0]:,.0f})" for n in names) + " |"
        )


def replay(path: Path, reps: int, seed: int) -> None:
    radii = dataset_info("fashion-mnist").radii
    rng = np.random.default_rng(seed)
    for r in json.loads(path.read_text()):
        taus = [threshold(x, r["sigma"]) for x in radii]
        streams = [s for p in r["per_image"]["p_hat"] for s in _streams(rng, p, reps)]
        res = _compare(streams, taus)
        print(f"\nsigma={r['sigma']}: {len(streams)} streams ({reps} per image) at the p_A measured on {r['run']}")
        for name, (samples, fixed, lost) in res.items():
            print(
                f"  {name:9s} {N0 + samples:7,.0f} samples per image ({(N0 + N_MAX) / (N0 + samples):.2f}x fewer than "
                "fixed-n); targets fixed-n certifies / lost: "
                + ", ".join(f"r={x:g}: {f}/{lo}" for x, f, lo in zip(radii, fixed, lost, strict=True))
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=400, help="streams per p_A in the band")
    ap.add_argument("--results", action="append", default=[], help="a sequential_certify.py --json file to replay")
    ap.add_argument("--reps", type=int, default=3, help="streams per image of --results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    assert N_MAX % CHUNK == 0
    for sigma, radius in ((0.5, 0.5), (0.25, 0.5)):
        band(args.streams, sigma, radius, [-0.01, 0.0, 0.004, 0.008, 0.012, 0.016, 0.02, 0.03], args.seed)
    for path in args.results:
        replay(Path(path), args.reps, args.seed)


if __name__ == "__main__":
    main()
