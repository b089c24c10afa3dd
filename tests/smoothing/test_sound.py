"""Sound certification in floating point (dmae.smoothing.sound): the standard path's false certificate, the exact
sampler, the reproducibility contract, the grid check, and the wrong-certificate rate by simulation."""

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import chisquare, norm
from torch import nn

from dmae.smoothing import CHUNK, SequentialCertifier, SequentialSettings, Smooth
from dmae.smoothing.sound import DiscreteGaussian, SoundSmooth, discrete_gaussian


class LowBits(nn.Module):
    """A classifier of the kind Voráček & Hein build: it reads the low bits of its input, which a real-valued
    Gaussian would blur but float32 ``x + eta`` keeps.

    Coordinates with a noisy value in (-0.5, 0) vote: "odd" when floor(v * 2^24) is odd, else "even"; class 1 when
    the odd votes outnumber the even ones, else class 0. Around x0 = 1 (a white image), float32 ``1 + eta`` with
    eta in (-1.5, -1) is exact and a multiple of 2^-23 (eta's own spacing in [1, 2)): every vote is even, class 0.
    Around x1 = 1 - 2^-24 (the next float below 1) the same sums are odd multiples of 2^-24: every vote odd,
    class 1. About 2% of pixels vote (sigma = 0.5), so with 1,024 pixels some always do."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1).double()  # float32 -> float64 and * 2^24 are exact
        votes = (v > -0.5) & (v < 0)
        odd = torch.floor(v * 2**24).remainder(2) == 1
        return nn.functional.one_hot(((votes & odd).sum(1) > (votes & ~odd).sum(1)).long(), 2).float()


def exact_low_bits_p0(smooth: SoundSmooth, a: int, pixels: int) -> float:
    """P(LowBits = class 0) under the sound noise at the grid image with every pixel a / levels, exactly: per pixel
    the probabilities of an odd vote, an even vote and none, then the law of (#odd - #even) over the pixels."""
    probs = smooth.noise.probabilities()
    table = smooth._value_table(torch.float32)
    p_odd = p_even = 0.0
    for pos, p in enumerate(probs):
        v = float(table[a + pos])
        if -0.5 < v < 0:
            if math.floor(v * 2**24) % 2:
                p_odd += p
            else:
                p_even += p
    dist = np.array([1.0])  # law of #odd - #even, offset by the pixels seen so far
    for _ in range(pixels):
        dist = np.convolve(dist, [p_odd, 1.0 - p_odd - p_even, p_even])  # +1, 0, -1 (index runs downwards)
    return float(dist[pixels:].sum())  # #odd - #even <= 0


@pytest.mark.slow
def test_toy_classifier_gets_a_false_certificate_from_the_standard_path_and_a_true_one_from_the_sound_mode():
    """The standard path certifies class 0 at x0 with radius 1.23 and class 1 at x1, 1.9e-6 away, with radius 1.23:
    the balls overlap, so at least one certificate is false. The sound mode certifies only what is true of its
    smoothed classifier (p_A computed exactly), and x1, within float32 rounding of x0's grid image, is that image."""
    sigma, n0, n, alpha = 0.5, 100, 1000, 0.001
    f = LowBits().eval()
    x0 = torch.ones(1, 32, 32)
    x1 = torch.full((1, 32, 32), 1.0 - 2.0**-24)
    dist = float((x0 - x1).norm())
    assert dist == pytest.approx(32 * 2.0**-24)

    standard = Smooth(f, 2, sigma, seed=0, precision="fp32")
    c0, r0 = standard.certify(x0, n0, n, alpha, 500, idx=0)
    c1, r1 = standard.certify(x1, n0, n, alpha, 500, idx=1)
    assert (c0, c1) == (0, 1)
    assert min(r0, r1) > 1.2 > 1e5 * dist  # each certifies the ceiling sigma * Phi^-1(alpha^(1/n)) = 1.2316
    assert r0 == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)))

    sound = SoundSmooth(f, 2, sigma, seed=0, precision="fp32")
    p0 = exact_low_bits_p0(sound, 255, 32 * 32)
    assert 0.45 < p0 < 0.65  # the low bits of fl(m / 255) carry no signal: near a coin flip
    for idx in range(2):  # independent runs: each must be true of the exact p_A
        cert = sound.certify_batch(x0.unsqueeze(0), [idx], n0, n, alpha, 500)[0]
        p_true = p0 if cert.prediction == 0 else 1.0 - p0
        if cert.prediction != Smooth.ABSTAIN:
            assert cert.radius <= sigma * norm.ppf(p_true) + 1e-12, (cert, p0)
        # x1 is x0's 8-bit image up to float32 rounding: the same grid image, the same answer
        assert sound.certify_batch(x1.unsqueeze(0), [idx], n0, n, alpha, 500)[0] == cert


def test_thresholds_are_the_exact_integer_parts():
    d = DiscreteGaussian(0.25)
    assert (d.low, d.high, d.clip_low, d.clip_high, d.size) == (-765, 765, -510, 765, 1530)
    assert all(a <= b for a, b in itertools.pairwise(d.thresholds))
    q = 2**62
    with mpmath.workprec(400):  # an independent evaluation at far higher precision
        for i in [*range(0, d.size, 37), d.size // 2 - 1, d.size // 2]:
            exact = mpmath.ncdf(mpmath.mpf(2 * (d.low + i) + 1) / (2 * 255 * mpmath.mpf(0.25))) * q
            assert d.thresholds[i] <= exact < d.thresholds[i] + 1
    # symmetric law: t_i + t_{M-1-i} = 1, so the integer parts add up to 2^62 - 1 (none is an integer)
    inner = [i for i in range(d.size) if 0 < d.thresholds[i] < q - 1]
    assert inner
    assert all(d.thresholds[i] + d.thresholds[d.size - 1 - i] == q - 1 for i in inner)


@pytest.mark.slow
def test_a_small_sigma_builds_fast_and_exactly():
    """Thresholds reach 1 / sigma + 8 standard deviations (the table covers every pixel + noise); above the mean
    they come from the tail Phi(-z), so sigma 0.01 (z up to 108) needs no precision of the order of -log2(1 - t_i)."""
    import time

    start = time.perf_counter()
    d = DiscreteGaussian(0.01)
    assert time.perf_counter() - start < 5.0
    q = 2**62
    for i in (3, d.size // 2 - 1, d.size // 2, d.size // 2 + 5, d.size // 2 + 50, d.size // 2 + 130, d.size - 1):
        z = (2 * (d.low + i) + 1) / (2 * 255 * 0.01)  # only to choose the precision
        with mpmath.workprec(int(0.73 * z**2) + 300):  # enough bits to resolve 1 - t_i ~ exp(-z^2 / 2)
            t = mpmath.ncdf(mpmath.mpf(2 * (d.low + i) + 1) / (2 * 255 * mpmath.mpf(0.01)))
            assert d.thresholds[i] == int(mpmath.floor(t * q)), i
            assert d._digit(i, 1) == int(mpmath.floor(t * q * q)) % q, i
    assert d.thresholds[-1] == q - 1


def _binned_chisquare(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value with cells of expected count < 5 pooled into their neighbours (tails)."""
    expected = probs * counts.sum()
    obs_b, exp_b, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(counts, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs_b.append(acc_o)
            exp_b.append(acc_e)
            acc_o = acc_e = 0.0
    obs_b[-1] += acc_o
    exp_b[-1] += acc_e
    return float(chisquare(obs_b, np.array(exp_b) * sum(obs_b) / sum(exp_b)).pvalue)


def test_sampler_draws_the_discretized_gaussian():
    """Counts against the exact cell probabilities: the production sampler (62-bit words), and a 6-bit one whose
    draws are undecided about a third of the time (so refinement words decide them): both pass; the 6-bit words
    without refinement, and a sampler with the cells shifted by half a step, fail the same test."""
    d = DiscreteGaussian(0.25)
    gen = torch.Generator().manual_seed(0)
    draws = d.sample((200_000,), gen)
    assert draws.dtype == torch.int64
    assert d.low <= int(draws.min())
    assert int(draws.max()) <= d.high
    probs = np.array(d.probabilities())
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert probs[d.size // 2] == pytest.approx(norm.cdf(0.5 / 63.75) - norm.cdf(-0.5 / 63.75), rel=1e-9)
    counts = np.bincount((draws - d.low).numpy(), minlength=d.size + 1)
    assert _binned_chisquare(counts, probs) > 1e-3
    # at 63.75 steps per sigma a half-step shift hides from a chi-square over ~200 cells; the mean shows it
    values = np.arange(d.low, d.high + 1)
    mean, sd = float(values @ probs), math.sqrt(float(values**2 @ probs))
    assert abs(mean) < 1e-9
    assert sd == pytest.approx(63.75, rel=1e-3)  # sqrt(63.75^2 + 1/12), Sheppard
    assert abs(float(draws.double().mean()) - mean) < 3 * sd / math.sqrt(len(draws))
    floored = torch.floor(torch.randn(200_000, generator=gen, dtype=torch.float64) * 63.75)
    assert abs(float(floored.mean()) - mean) > 3 * sd / math.sqrt(len(floored))

    coarse = DiscreteGaussian(0.2, levels=15, bits=6)
    probs = np.array(coarse.probabilities())
    for wrong_cells in (torch.floor, torch.ceil):  # 3 steps per sigma: the chi-square sees a half-step shift
        shifted = wrong_cells(torch.randn(60_000, generator=gen, dtype=torch.float64) * 3).long()
        assert _binned_chisquare(np.bincount((shifted - coarse.low).numpy(), minlength=coarse.size + 1), probs) < 1e-6
    rounded = torch.round(torch.randn(60_000, generator=gen, dtype=torch.float64) * 3).long()  # the right cells
    assert _binned_chisquare(np.bincount((rounded - coarse.low).numpy(), minlength=coarse.size + 1), probs) > 1e-3
    words = torch.randint(0, 64, (60_000,), generator=torch.Generator().manual_seed(1))
    th = torch.tensor(coarse.thresholds)
    tied = torch.isin(words, th).float().mean().item()
    assert tied > 0.2  # the refinement path carries a real share of the draws
    exact = coarse.sample((60_000,), torch.Generator().manual_seed(2))
    counts = np.bincount((exact - coarse.low).numpy(), minlength=coarse.size + 1)
    assert _binned_chisquare(counts, probs) > 1e-3
    truncated = torch.searchsorted(th, words)  # integer parts only: the bias the refinement removes
    assert _binned_chisquare(np.bincount(truncated.numpy(), minlength=coarse.size + 1), probs) < 1e-6


def test_sampler_is_a_pure_function_of_the_generator_state():
    d = DiscreteGaussian(0.2, levels=15, bits=6)  # refinement words included
    a = d.sample((50, 7), torch.Generator().manual_seed(5))
    b = d.sample((50, 7), torch.Generator().manual_seed(5))
    c = d.sample((50, 7), torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert discrete_gaussian(0.25) is discrete_gaussian(0.25)  # one mpmath table per (sigma, levels)


class Linear2(nn.Module):
    """f(x) = 1 if w . x + b > 0 else 0, on [1, 2, 2] images."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).double() @ self.w.double() + self.b
        return torch.stack([-z, z], dim=1)


def _grid_images(count: int, seed: int, shape: tuple[int, ...] = (1, 2, 2)) -> torch.Tensor:
    return torch.randint(0, 256, (count, *shape), generator=torch.Generator().manual_seed(seed)).float() / 255


def test_noise_is_on_the_grid_and_a_pure_function_of_seed_index_phase_chunk():
    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.4).eval()
    smooth = SoundSmooth(model, 2, 0.5, seed=9)
    x = _grid_images(5, 0)
    chunk = smooth.noisy_chunk(x[0], 3, 1, 2)
    assert chunk.shape == (CHUNK, 1, 2, 2)
    assert chunk.dtype == torch.float32
    assert torch.equal(chunk, smooth.noisy_chunk(x[0], 3, 1, 2))
    assert torch.equal(chunk, SoundSmooth(model, 2, 0.5, seed=9).noisy_chunk(x[0], 3, 1, 2))
    for other in ((4, 1, 2), (3, 0, 2), (3, 1, 3)):
        assert not torch.equal(chunk, smooth.noisy_chunk(x[0], *other))
    assert not torch.equal(chunk, SoundSmooth(model, 2, 0.5, seed=10).noisy_chunk(x[0], 3, 1, 2))
    # every noisy pixel is float32(m / 255) for the integer m = a + j, clipped
    m = torch.round(chunk.double() * 255)
    nz = smooth.noise
    assert torch.equal(chunk, (m / 255).float())
    assert nz.clip_low <= m.min()
    assert m.max() <= nz.clip_high
    assert abs(float((chunk - x[0]).std()) - 0.5) < 0.06  # noise of std sigma around the image
    ref = smooth.certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch_size=10_000)
    for batch in (1, 7, 333):
        again = SoundSmooth(model, 2, 0.5, seed=9).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch)
        assert again == ref
    alone = SoundSmooth(model, 2, 0.5, seed=9).certify(x[2], 100, 1234, 0.001, 50, idx=15)
    assert alone == (ref[2].prediction, ref[2].radius)
    assert smooth.predict(x[2], 1000, 0.001, 256, idx=15) in (0, 1, Smooth.ABSTAIN)


def test_tails_are_clipped_to_one_value_whatever_the_pixel():
    """The ends of the noise carry the tails; clipping makes every integer they stand for the same input."""
    smooth = SoundSmooth(Linear2(torch.ones(4), 0.0), 2, 0.25)
    table, nz = smooth._value_table(torch.float32), smooth.noise
    for a in (0, 1, 128, 255):
        assert float(table[a]) == pytest.approx(nz.clip_low / 255)  # j = low: a + low <= clip_low
        assert float(table[a + nz.size]) == pytest.approx(nz.clip_high / 255)  # j = high: a + high >= clip_high
        assert float(table[a - nz.low]) == pytest.approx(a / 255)  # j = 0: the image itself


def test_images_off_the_grid_are_refused_naming_them():
    smooth = SoundSmooth(Linear2(torch.ones(4), 0.0).eval(), 2, 0.25, seed=0)
    x = _grid_images(3, 1)
    x[1, 0, 0, 1] = 0.5  # 127.5 / 255: half a step off
    with pytest.raises(ValueError, match=r"255-level grid.*image 8: 0\.00196"):
        smooth.certify_batch(x, [7, 8, 9], 10, 100, 0.001, 64)
    with pytest.raises(ValueError, match=r"image 8: 0\.00196"):
        smooth.predict_batch(x, [7, 8, 9], 100, 0.001, 64)
    settings = SequentialSettings(n0=10, n_max=200, alpha=0.001)
    with pytest.raises(ValueError, match=r"image 8: 0\.00196"):
        SequentialCertifier(smooth, settings).certify_batch(x, [7, 8, 9], 64)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        smooth.certify_batch(x * 2, [7, 8, 9], 10, 100, 0.001, 64)
    x[1, 0, 0, 1] = 128 / 255 + 3e-7  # float rounding of a grid value: snapped, certified as that image
    assert (
        smooth.certify_batch(x, [7, 8, 9], 10, 100, 0.001, 64)[1]
        == smooth.certify_batch(torch.round(x * 255) / 255, [7, 8, 9], 10, 100, 0.001, 64)[1]
    )
    with pytest.raises(ValueError, match="levels must be an integer >= 1"):
        SoundSmooth(Linear2(torch.ones(4), 0.0), 2, 0.25, levels=0)


class GridThreshold(nn.Module):
    """Class 0 iff the first noisy pixel is at most step ``m_star`` of the grid: F is a half-space, so at the
    grid image with first pixel a / 255 its smoothed p_A is exactly P(j <= m_star - a) and the exact certified
    radius is (m_star + 1/2 - a) / 255 (the distance to the boundary)."""

    def __init__(self, m_star: int) -> None:
        super().__init__()
        self.m_star = m_star
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((torch.round(x.flatten(1)[:, 0] * 255) > self.m_star).long(), 2).float()


@pytest.mark.parametrize("target", [0.7, 0.95])
@pytest.mark.slow
def test_wrong_certificates_stay_within_alpha(target):
    """1,000 independent fixed-n certificates and 300 sequential ones (alpha = 0.05) of a classifier whose p_A is
    known exactly: a certificate is wrong when its class is not 0 or its radius exceeds the exact one. Wrong ones
    stay within alpha up to binomial slack; the point estimate k / n, on the same counts, is wrong far more often."""
    sigma, alpha, a = 0.25, 0.05, 100
    nz = discrete_gaussian(sigma)
    cdf = np.cumsum(nz.probabilities())
    m_star = a + int(np.searchsorted(cdf, target)) + nz.low  # first step with P(j <= m_star - a) >= target
    p_a = float(cdf[m_star - a - nz.low])
    exact_radius = (m_star + 0.5 - a) / 255
    assert abs(sigma * norm.ppf(p_a) - exact_radius) < 1e-9
    assert target <= p_a < target + 0.01
    x = torch.full((1, 1, 1), a / 255)
    smooth = SoundSmooth(GridThreshold(m_star).eval(), 2, sigma, seed=11, precision="fp32")

    trials, n0, n = 1000, 20, 200
    certs = smooth.certify_batch(x.expand(trials, -1, -1, -1), list(range(trials)), n0, n, alpha, 20_000)
    wrong = sum(c.prediction == 1 or (c.prediction == 0 and c.radius > exact_radius) for c in certs)
    slack = 3 * math.sqrt(trials * alpha * (1 - alpha))
    assert wrong <= alpha * trials + slack, f"{wrong} of {trials} certificates wrong at alpha={alpha}"
    naive = sum(sigma * norm.ppf(min(c.n_a / n, 1 - 1e-12)) > exact_radius for c in certs)
    assert naive > alpha * trials + 2 * slack  # the check has power

    seq_trials = 300
    settings = SequentialSettings(n0=n0, n_max=1000, alpha=alpha, mode="continuous", epsilon=0.02)
    seq = SequentialCertifier(smooth, settings).certify_batch(
        x.expand(seq_trials, -1, -1, -1), list(range(10_000, 10_000 + seq_trials)), 5000
    )
    wrong = sum(c.prediction == 1 or (c.prediction == 0 and c.radius > exact_radius) for c in seq)
    slack = 3 * math.sqrt(seq_trials * alpha * (1 - alpha))
    assert wrong <= alpha * seq_trials + slack, f"{wrong} of {seq_trials} sequential certificates wrong"
    assert sum(c.prediction == 0 for c in seq) > 0.9 * seq_trials  # they do certify


@pytest.mark.slow
def test_cli_sound_mode_records_itself_and_never_mixes_with_a_standard_log(classifier_run, tmp_path):
    import json

    from dmae.certification.runner import CertifyConfig, run_certification

    def cfg(**over):
        kw = dict(
            checkpoint=str(classifier_run),
            n0=20,
            n=100,
            alpha=0.001,
            skip=2000,
            batch=64,
            seed=0,
            output_dir=str(tmp_path),
            device="cpu",
            progress=False,
            sound=True,
        )
        return CertifyConfig(**{**kw, **over})

    [res] = run_certification(cfg())
    assert json.loads(res.path.with_suffix(".json").read_text())["sound"] is True
    assert res.rows_total == 5
    [again] = run_certification(cfg(batch=7, output_dir=str(tmp_path / "b7")))  # rows do not depend on the batch

    def strip(p):
        return [ln.split("\t")[:-1] for ln in p.read_text().splitlines()]

    assert strip(again.path) == strip(res.path)
    with pytest.raises(ValueError, match=r"sound: True -> None"):
        run_certification(cfg(sound=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": float("inf")}, "sigma must be a finite number > 0, got inf"),
        ({"sigma": True}, "sigma must be a finite number > 0, got True"),
        ({"levels": 255.0}, r"levels must be an integer >= 1 \(255 for 8-bit images\), got 255.0"),
        ({"tail": 0.0}, "tail must be a finite number > 0, got 0.0"),
        ({"bits": 63}, r"bits must be an integer in 1 \.\. 62, got 63"),
    ],
)
def test_the_discrete_gaussian_names_a_parameter_it_cannot_take(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiscreteGaussian(**{"sigma": 0.25, **kwargs})


def test_sound_certification_refuses_pixels_off_the_unit_range_and_other_devices():
    from dmae.smoothing.sound import check_grid

    grid = torch.tensor([[0.0, 1.0], [2.0, -1 / 255]]).view(2, 1, 1, 2)  # on the grid, image 9 outside [0, 1]
    with pytest.raises(ValueError, match=r"image\(s\) \[9\] have grid pixels outside 0 .. 255"):
        check_grid(grid, [4, 9])
    check_grid(grid[:1], [4])  # an image on the grid and in range passes
    with pytest.raises(ValueError, match="sound certification runs on cpu or cuda, got device meta"):
        SoundSmooth(Linear2(torch.ones(4), 0.0), 2, 0.25, device="meta")
