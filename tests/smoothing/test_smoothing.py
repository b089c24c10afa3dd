"""Statistical correctness of CERTIFY / PREDICT on base classifiers whose smoothed behaviour is known exactly."""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from conftest import AlwaysNaN, Constant, Linear2  # toy classifiers shared with the certification tests
from dmae.smoothing import (
    CHUNK,
    SequentialCertifier,
    SequentialSettings,
    Smooth,
    chunk_seed,
    lower_confidence_bound,
    radius_ceiling,
)


class CoinFlip(nn.Module):
    """Class 1 iff the noisy first pixel exceeds 0.5: for images with that pixel at 0.5, P = 1/2 exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0] - 0.5
        return torch.stack([-z, z], dim=1)


@pytest.mark.parametrize(
    "n_a,n,alpha", [(1, 1, 0.001), (990, 1000, 0.001), (50, 100, 0.05), (7, 10, 0.3), (99_990, 100_000, 0.001)]
)
def test_lower_bound_is_the_clopper_pearson_beta_quantile(n_a, n, alpha):
    p = lower_confidence_bound(n_a, n, alpha)
    assert p == pytest.approx(beta.ppf(alpha, n_a, n - n_a + 1), rel=1e-12)
    # the defining property: at p, seeing n_a or more successes has probability exactly alpha
    assert binom.sf(n_a - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert lower_confidence_bound(0, n, alpha) == 0.0


def test_bound_arguments_are_checked():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
            lower_confidence_bound(5, 10, bad)
    with pytest.raises(ValueError, match="n_a <= n"):
        lower_confidence_bound(11, 10, 0.01)


def test_constant_classifier_gets_the_radius_ceiling():
    sigma, n, alpha = 0.5, 1000, 0.001
    smooth = Smooth(Constant(10, 3), 10, sigma, seed=0)
    c, r = smooth.certify(torch.rand(3, 8, 8), n0=100, n=n, alpha=alpha, batch_size=256, idx=0)
    assert c == 3
    assert r == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert r == pytest.approx(radius_ceiling(n, alpha, sigma))
    assert 1.2 < r < 1.25  # about 2.46 sigma at n = 1,000
    assert radius_ceiling(10_000, 0.001, 1.0) == pytest.approx(3.2, abs=0.05)  # SPEC: ~3.2 sigma at 10^4
    assert radius_ceiling(100_000, 0.001, 1.0) == pytest.approx(3.8, abs=0.05)  # ~3.8 sigma at 10^5
    assert smooth.predict(torch.rand(3, 8, 8), n=100, alpha=alpha, batch_size=64, idx=0) == 3


def test_fifty_fifty_classifier_abstains():
    smooth = Smooth(CoinFlip(), 2, 0.25, seed=1)
    x = torch.full((20, 1, 2, 2), 0.5)
    certs = smooth.certify_batch(x, list(range(20)), n0=100, n=2000, alpha=0.001, batch_size=4000)
    assert [c.prediction for c in certs] == [Smooth.ABSTAIN] * 20
    assert [c.radius for c in certs] == [0.0] * 20
    preds = smooth.predict_batch(x, list(range(20)), n=2000, alpha=0.001, batch_size=4000)
    assert sum(p.prediction == Smooth.ABSTAIN for p in preds) >= 19  # each abstains with prob >= 1 - alpha


def test_certified_radius_exceeds_the_exact_radius_at_most_alpha_of_the_time():
    """Linear f: the smoothed probability is Phi(d / sigma) and the exact certified radius is d, the
    distance to the decision boundary. With alpha = 0.1 over 1,000 independent trials, a sound CERTIFY
    fails (wrong class or radius > d) in at most about 100; the naive point estimate fails in far more."""
    sigma, alpha, n0, n, trials = 0.5, 0.1, 20, 200, 1000
    w = torch.tensor([1.0, -0.5, 0.25, 0.0])
    model = Linear2(w, b=0.0)
    x = torch.tensor([0.8, 0.2, 0.1, 0.5]).view(1, 1, 2, 2)
    d = float(x.flatten() @ model.w)  # signed distance to w.x = 0; class 1 side
    assert 0.3 < d < 0.9
    smooth = Smooth(model, 2, sigma, seed=12345)
    certs = smooth.certify_batch(x.expand(trials, -1, -1, -1), list(range(trials)), n0, n, alpha, batch_size=20_000)
    fail = sum((c.prediction != Smooth.ABSTAIN) and (c.prediction != 1 or c.radius > d) for c in certs)
    # binomial(1000, 0.1) exceeds 130 with probability < 0.002
    assert fail <= 130, f"{fail} of {trials} certificates were wrong at alpha={alpha}"
    radii = [c.radius for c in certs if c.prediction == 1]
    assert len(radii) > 0.9 * trials
    assert sum(radii) / len(radii) > 0.5 * d  # the test has power: not all abstain
    # the same counts with the point estimate p_hat instead of the lower bound overshoot about half the time
    naive = sum(sigma * norm.ppf(min(c.n_a / n, 1 - 1e-9)) > d for c in certs)
    assert naive > 3 * alpha * trials


def test_label_candidate_is_sound_on_bernoulli_oracles():
    """Fixed-n CERTIFY with the label as the candidate (``certify_label_batch``): oracles whose label (class 0) has
    probability p just below and above each threshold Phi(r / sigma), at 1/2 and at 1, alpha = 0.05, 400 images
    of n = 500 samples each. A certificate is wrong when it claims the label at p <= 1/2 or a radius above the true
    sigma * Phi^-1(p). Per p, a one-sided binomial test at level 0.001 must not find wrong certificates more
    frequent than alpha; the same test flags the point estimate k / n (the test has power)."""
    from dmae.smoothing.sequential import ID_SPACING, _CategoricalOracle

    sigma, alpha, n, trials = 0.5, 0.05, 500, 400
    ps = [0.5, 1.0] + [norm.cdf(r / sigma) + d for r in (0.25, 0.5, 1.0) for d in (-0.01, 0.01)]
    x = torch.zeros(trials, 1, 1, 2, dtype=torch.float64)
    x[:, 0, 0, 1] = torch.arange(trials, dtype=torch.float64) * ID_SPACING
    flagged = 0
    for j, p in enumerate(ps):
        oracle = _CategoricalOracle(torch.tensor([[p, 1 - p]] * trials).numpy(), sigma).eval()
        smooth = Smooth(oracle, 2, sigma, seed=j, precision="fp32", device="cpu", input_range=None)
        certs = smooth.certify_label_batch(x, list(range(trials)), [0] * trials, n, alpha, batch_size=50_000)
        true_radius = sigma * norm.ppf(p) if p < 1 else math.inf
        wrong = sum(c.prediction == 0 and (p == 0.5 or c.radius > true_radius) for c in certs)
        assert all(c.prediction in (0, Smooth.ABSTAIN) for c in certs)
        assert binom.sf(wrong - 1, trials, alpha) > 1e-3, f"p = {p:.4f}: {wrong} of {trials} wrong"
        naive = sum(
            c.n_a / n > 0.5 and (p == 0.5 or sigma * norm.ppf(min(c.n_a / n, 1 - 1e-12)) > true_radius) for c in certs
        )
        flagged += binom.sf(naive - 1, trials, alpha) <= 1e-3
    assert flagged >= len(ps) // 2


def test_label_candidate_equals_certify_where_the_selection_picks_the_label():
    """The label as the candidate draws CERTIFY's estimation samples (same seeds, no selection samples): where
    CERTIFY's selected class is the label, the two certificates are the same; elsewhere the label abstains or is
    certified, never another class. Labels must be one class per image."""
    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.4)
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    idx, labels = list(range(8)), [0, 1, 1, 0, 1, 0, 1, 1]
    smooth = Smooth(model, 2, 0.3, seed=4)
    full = smooth.certify_batch(x, idx, 50, 400, 0.001, batch_size=1000)
    label = smooth.certify_label_batch(x, idx, labels, 400, 0.001, batch_size=1000)
    assert any(c.prediction == y for c, y in zip(full, labels, strict=True))
    for f, c, y in zip(full, label, labels, strict=True):
        assert c.prediction in (y, Smooth.ABSTAIN)
        if f.prediction == y:
            assert c == f
    assert smooth.certify_label(x[0], labels[0], 400, 0.001, 1000, idx=0) == (label[0].prediction, label[0].radius)
    with pytest.raises(ValueError, match=r"labels must be one class in \[0, 2\) per image"):
        smooth.certify_label_batch(x[:2], [0, 1], [0, 2], 400, 0.001, batch_size=1000)


def test_noise_depends_only_on_seed_and_index():
    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.4)
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = Smooth(model, 2, 0.7, seed=9).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch_size=10_000)
    for batch in (1, 7, 100, 333):
        again = Smooth(model, 2, 0.7, seed=9).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch_size=batch)
        assert again == ref
    # one image alone, by its index, gets the same answer as inside a group
    alone = Smooth(model, 2, 0.7, seed=9).certify(x[2], 100, 1234, 0.001, 50, idx=15)
    assert alone == (ref[2].prediction, ref[2].radius)
    other_seed = Smooth(model, 2, 0.7, seed=10).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, 10_000)
    assert [c.n_a for c in other_seed] != [c.n_a for c in ref]
    assert len({chunk_seed(0, i, p, c) for i in range(50) for p in range(3) for c in range(20)}) == 3000


def test_arguments_and_range_warning():
    model = Constant(3, 0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        Smooth(model, 3, 0.0)
    with pytest.raises(ValueError, match="sigma must be a number >= 0"):
        Smooth(model, 3, -1.0)
    smooth = Smooth(model, 3, 0.25, seed=0)
    x = torch.linspace(0, 1, 16).view(1, 4, 4)
    with pytest.raises(ValueError, match="n0 must be an integer >= 1, got 0"):
        smooth.certify(x, 0, 100, 0.001, 10)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        smooth.certify(x, 10, 0, 0.001, 10)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        smooth.predict(x, 10, 0.001, 0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\), got 1.0"):
        smooth.predict(x, 10, 1.0, 10)
    with pytest.raises(ValueError, match=r"image\(s\) \[-\d+\] have pixels in \[-2.5, 2.5\], outside \[0, 1\]"):
        smooth.certify((x - 0.5) / 0.2, 10, 20, 0.001, 10)
    assert math.isfinite(smooth.certify(x, 10, 20, 0.001, 10)[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"num_classes": 2.0}, "num_classes must be an integer >= 2, got 2.0"),
        ({"input_range": (1.0, 0.0)}, r"input_range must be \(low, high\) with low < high, or None; got \(1.0, 0.0\)"),
        ({"input_range": (0.0,)}, r"input_range must be \(low, high\) with low < high, or None; got \(0.0,\)"),
    ],
)
def test_smooth_refuses_a_class_count_or_range_that_cannot_be(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Smooth(Constant(3, 0), **{"num_classes": 3, "sigma": 0.25, **kwargs})


def test_sample_counts_names_images_indices_and_logits_that_do_not_fit():
    smooth = Smooth(Constant(3, 0).eval(), 3, 0.25, seed=0)
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"expected images \[I, C, H, W\], got shape \(1, 4, 4\)"):
        smooth.sample_counts(x[0], [0], 10, 10)
    with pytest.raises(ValueError, match="2 images but 3 indices"):
        smooth.sample_counts(x, [0, 1, 2], 10, 10)
    four = Smooth(Constant(4, 0).eval(), 3, 0.25, seed=0)  # a 4-class model smoothed as 3 classes
    with pytest.raises(ValueError, match=r"base classifier returned \(10, 4\), expected \[B, 3\] logits"):
        four.sample_counts(x[:1], [0], 10, 10)
    counts = smooth.sample_counts(x, [0, 1], 10, 10).counts  # and inputs that fit are counted
    assert counts.tolist() == [[10, 0, 0], [10, 0, 0]]


class TinyMLP(nn.Module):
    """A random 4-class two-layer net on [1, 6, 6] images, in float64 so that no batch size changes an argmax."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.hidden = nn.Linear(36, 8).double()
        self.out = nn.Linear(8, 4).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x.double().flatten(1))))


class NanAbove(nn.Module):
    """Votes for class 2 by a wide margin, but returns NaN logits when the noisy first pixel exceeds 0.9."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tensor([0.0, 0.0, 5.0, 0.0]).repeat(x.shape[0], 1)
        out[x.flatten(1)[:, 0] > 0.9] = float("nan")
        return out


def _reference_counts(model, x, indices, num, sigma, seed, phase, k):
    """Cohen et al.'s core.py ``_sample_noise``, one image and one chunk at a time, with dmae's chunk seeds."""
    counts, non_finite = [], []
    for row, idx in enumerate(indices):
        votes, bad = Counter(), 0
        for c, start in enumerate(range(0, num, CHUNK)):
            size = min(CHUNK, num - start)
            gen = torch.Generator().manual_seed(chunk_seed(seed, idx, phase, c))
            eta = torch.randn((size, *x.shape[1:]), generator=gen)
            noisy = x[row] + eta * sigma
            with torch.no_grad():
                logits = model(noisy)
            for row_logits in logits:
                if torch.isfinite(row_logits).all():
                    votes[int(row_logits.argmax())] += 1
                else:
                    bad += 1
        counts.append([votes[j] for j in range(k)])
        non_finite.append(bad)
    return counts, non_finite


def test_sample_counts_match_a_plain_reference_loop():
    """The packed, batched counting (chunks of several images in one forward pass, bincount on the device)
    counts exactly what a one-image-one-chunk-at-a-time loop counts, whatever the batch size; samples with
    NaN logits are counted apart, and an image with any abstains."""
    model, sigma, seed, num = TinyMLP(), 0.5, 4242, 250  # 250: the last chunk is shorter
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    indices = [3, 17, 4, 1000]
    smooth = Smooth(model, 4, sigma, seed=seed)
    for phase in (0, 1, 2):
        ref, ref_bad = _reference_counts(model, x, indices, num, sigma, seed, phase, 4)
        assert ref_bad == [0, 0, 0, 0]
        assert sum(v > 0 for v in ref[0]) >= 3  # the noise moves samples across classes: the counts carry information
        for batch_size in (1, 7, 100, 333, 10_000) if phase == 1 else (64,):
            got = smooth.sample_counts(x, indices, num, batch_size, phase)
            assert got.counts.tolist() == ref, (phase, batch_size)
            assert got.non_finite.tolist() == [0, 0, 0, 0]
    # another phase draws other noise (the reference is not blind to the phase)
    other_phases = [_reference_counts(model, x, indices, num, sigma, seed, p, 4)[0] for p in (0, 1)]
    assert other_phases[0] != other_phases[1]

    # non-finite logits are no vote for any class (argmax would call them class 0), and their image abstains
    model, sigma, seed = NanAbove(), 0.2, 7
    x = torch.zeros(3, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # most noisy copies give NaN logits (argmax would call them class 0)
    x[1, 0, 0, 0] = 0.0  # practically never NaN: class 2
    x[2, 0, 0, 0] = 0.85  # NaN for about 40%: class 2 still has most votes
    indices = [5, 6, 9]
    smooth = Smooth(model, 4, sigma, seed=seed)
    for batch_size in (7, 1000):
        got = smooth.sample_counts(x, indices, 1000, batch_size, 1)
        ref, ref_bad = _reference_counts(model, x, indices, 1000, sigma, seed, 1, 4)
        assert got.counts.tolist() == ref
        assert got.non_finite.tolist() == ref_bad
    assert ref_bad[0] > 500
    assert ref_bad[1] == 0
    assert 200 < ref_bad[2] < 600
    assert (got.counts.sum(dim=1) + got.non_finite).tolist() == [1000, 1000, 1000]  # a NaN sample is in no count
    assert got.counts[0, 0] == 0  # ... in particular not in class 0's
    certs = smooth.certify_batch(x, indices, n0=100, n=1000, alpha=0.001, batch_size=333)
    assert certs[0].prediction == Smooth.ABSTAIN
    assert certs[0].radius == 0.0
    assert certs[0].non_finite > 500
    assert certs[2].prediction == Smooth.ABSTAIN
    assert certs[2].non_finite > 0
    assert certs[1].prediction == 2
    assert certs[1].radius > 0
    assert certs[1].non_finite == 0
    # the reported count is every non-finite sample of both phases (selection and estimation)
    sel = _reference_counts(model, x, indices, 100, sigma, seed, 0, 4)[1]
    assert [c.non_finite for c in certs] == [a + b for a, b in zip(sel, ref_bad, strict=True)]
    preds = smooth.predict_batch(x, indices, n=1000, alpha=0.001, batch_size=333)
    assert [p.prediction for p in preds] == [Smooth.ABSTAIN, 2, Smooth.ABSTAIN]


# ----------------------------------------------------------------------------- never certify what was not computed


def test_nan_logits_abstain_in_certify_and_predict():
    smooth = Smooth(AlwaysNaN(), 3, 0.25, seed=0)
    x = torch.rand(2, 1, 4, 4)
    for c in smooth.certify_batch(x, [0, 1], n0=20, n=200, alpha=0.001, batch_size=64):
        assert c.prediction == Smooth.ABSTAIN
        assert c.radius == 0.0
        assert c.non_finite == 220
    for p in smooth.predict_batch(x, [0, 1], n=200, alpha=0.001, batch_size=64):
        assert p.prediction == Smooth.ABSTAIN
        assert p.non_finite == 200


def test_non_finite_pixels_are_an_error_naming_the_image():
    smooth = Smooth(Constant(3, 1), 3, 0.25, seed=0)
    x = torch.rand(3, 1, 4, 4)
    x[1, 0, 2, 2] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"image\(s\) \[14, 15\] have NaN or infinite pixels"):
        smooth.certify_batch(x, [13, 14, 15], n0=10, n=100, alpha=0.001, batch_size=64)


def test_no_silent_device_fallback():
    class NoParams(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValueError, match="no parameters or buffers to tell its device; pass device="):
        Smooth(NoParams(), 3, 0.25)
    smooth = Smooth(NoParams(), 3, 0.25, seed=0, device="cpu")
    assert smooth.certify(torch.rand(1, 4, 4), 10, 100, 0.001, 50, idx=0)[0] == 0


def test_budget_warnings_say_when_n_can_never_answer():
    smooth = Smooth(Constant(3, 1), 3, 0.25, seed=0)
    with pytest.warns(UserWarning, match=r"n=10 can never return a class at alpha=0.001.*use n >= 11"):
        assert smooth.predict(torch.rand(1, 4, 4), 10, 0.001, 50, idx=0) == Smooth.ABSTAIN
    assert smooth.predict(torch.rand(1, 4, 4), 11, 0.001, 50, idx=0) == 1  # and one more sample suffices
    with pytest.warns(UserWarning, match=r"n=9 cannot certify any radius at alpha=0.001.*use n >= 10"):
        assert smooth.certify(torch.rand(1, 4, 4), 10, 9, 0.001, 50, idx=0) == (Smooth.ABSTAIN, 0.0)
    assert smooth.certify(torch.rand(1, 4, 4), 10, 10, 0.001, 50, idx=0)[0] == 1


# ----------------------------------------------------------------------------- guards before any sample is spent
class SmallBNNet(nn.Module):
    """A CNN with BatchNorm and dropout: in training mode its votes depend on the batch and its buffers move."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 10)
        )
        with torch.no_grad():  # running statistics far from any batch's, so train and eval mode disagree
            self.body[1].running_mean.fill_(3.0)
            self.body[1].running_var.fill_(9.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_model_in_training_mode_is_certified_in_eval_mode_and_left_bit_identical():
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    net = SmallBNNet()
    net.body[4].eval()  # a submodule the user left in eval mode must stay so
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(
        UserWarning, match=r"training mode \(BatchNorm2d\): it is certified in eval mode.*call model.eval\(\)"
    ):
        in_train = Smooth(net, 10, 0.25, seed=0).certify(x, 100, 1000, 0.001, 300, idx=0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats, num_batches_tracked
    assert net.training
    assert net.body[1].training
    assert not net.body[4].training
    reference = SmallBNNet().eval()
    assert in_train == Smooth(reference, 10, 0.25, seed=0).certify(x, 100, 1000, 0.001, 300, idx=0)
    # sequential CERTIFY goes through the same guard
    settings = SequentialSettings(n0=100, n_max=1000, alpha=0.001, mode="targets", radii=(0.0, 0.25))
    [(_, cert)] = list(SequentialCertifier(Smooth(net, 10, 0.25, seed=0), settings).certify_stream([(0, x)], 300))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.body[1].training
    [(_, ref)] = list(SequentialCertifier(Smooth(reference, 10, 0.25, seed=0), settings).certify_stream([(0, x)], 300))
    assert cert == ref


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_floating_images_are_refused_naming_the_dtype(dtype):
    smooth = Smooth(Constant(3, 0).eval(), 3, 0.25, seed=0)
    x = (torch.rand(1, 4, 4) * 255).to(dtype)
    with pytest.raises(ValueError, match=f"floating-point tensor with pixels in \\[0, 1\\], got dtype {dtype}"):
        smooth.certify(x, 10, 100, 0.001, 50)
    with pytest.raises(ValueError, match=f"got dtype {dtype}"):
        smooth.predict(x, 100, 0.001, 50)


@pytest.mark.parametrize("alpha", [0.95, 0.999])
def test_alpha_given_as_a_confidence_level_is_refused(alpha):
    smooth = Smooth(Constant(3, 0).eval(), 3, 0.25, seed=0)
    with pytest.raises(
        ValueError,
        match=rf"alpha must be in \(0, 0.5\), got {alpha}; alpha is the failure probability, "
        rf"not a confidence level: for {alpha} confidence give alpha {1 - alpha:.6g}",
    ):
        smooth.certify(torch.rand(1, 4, 4), 10, 100, alpha, 50)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\), got 0.5$"):  # no hint where 1 - alpha = alpha
        smooth.certify(torch.rand(1, 4, 4), 10, 100, 0.5, 50)


def test_a_sigma_other_than_the_recorded_training_sigma_warns():
    model = Constant(3, 0).eval()
    model.trained_sigma = 0.25
    with pytest.warns(UserWarning, match=r"sigma 1 is not the sigma the classifier was trained at \(0.25\)"):
        Smooth(model, 3, 1.0)
    model.trained_sigma = [0.0, 0.75]
    with pytest.warns(UserWarning, match=r"sigma 1 is outside the range U\[0, 0.75\]"):
        Smooth(model, 3, 1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching sigmas are silent
        Smooth(model, 3, 0.5)
        model.trained_sigma = 0.25
        Smooth(model, 3, 0.25)


def test_a_plain_function_is_a_base_classifier_too():
    smooth = Smooth(
        lambda x: torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 3).float(),
        3,
        0.25,
        seed=0,
        device="cpu",
    )
    assert smooth.certify(torch.rand(1, 4, 4), 10, 100, 0.001, 50)[0] == 0


def test_batchnorm_without_running_statistics_is_refused():
    net = SmallBNNet()
    net.body[1] = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics even in eval mode
    with pytest.raises(
        ValueError,
        match=r"module body.1 \(BatchNorm2d, track_running_stats=False\) normalizes every "
        r"batch by its own statistics",
    ):
        Smooth(net.eval(), 10, 0.25, seed=0).certify(torch.rand(1, 8, 8), 10, 100, 0.001, 50)
