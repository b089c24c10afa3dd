"""Property-based tests (Hypothesis) of invariants the rest of the code relies on: patchify / unpatchify and the
masking's restore order are inverses, a log row survives the writer and the reader, the sequential engine's packed
batches keep each sample with its image, and the Clopper-Pearson bound is monotone in the count and nested in
alpha."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmae.certification.log import CERTIFY_HEADER, SEQUENTIAL_HEADER, format_row, read_log_rows
from dmae.corrupt import patchify, random_masking, unpatchify
from dmae.smoothing import Smooth
from dmae.smoothing.bounds import lower_confidence_bound
from dmae.smoothing.sequential import ID_SPACING, SequentialCertifier, SequentialSettings, _CategoricalOracle

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 3]),
    p=st.sampled_from([1, 2, 4, 7]),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpatchify_inverts_patchify(n, c, p, gh, gw, seed):
    imgs = torch.rand(n, c, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))
    patches = patchify(imgs, p)
    assert patches.shape == (n, gh * gw, p * p * c)
    assert torch.equal(unpatchify(patches, p, c, grid=(gh, gw)), imgs)


@FAST
@given(n=st.integers(1, 4), num_patches=st.integers(2, 64), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_masking_restores_the_order_and_masks_exactly_what_it_drops(n, num_patches, ratio, seed):
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        return  # refused by random_masking (tested elsewhere)
    m = random_masking(n, num_patches, ratio, torch.Generator().manual_seed(seed))
    tokens = torch.arange(num_patches).repeat(n, 1)
    shuffled = torch.gather(tokens, 1, torch.argsort(m.ids_restore, dim=1))
    assert torch.equal(torch.gather(shuffled, 1, m.ids_restore), tokens)  # restore undoes the shuffle
    assert torch.equal(shuffled[:, :keep], m.ids_keep)  # the kept ones lead the shuffle
    visible = torch.zeros(n, num_patches).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(m.mask, 1.0 - visible)  # mask = 1 exactly on the dropped patches
    assert int(m.mask.sum()) == n * (num_patches - keep)


@FAST
@given(
    idx=st.integers(0, 10**7),
    label=st.integers(0, 999),
    pred=st.integers(-1, 999),
    radius=st.floats(0.0, 50.0, allow_nan=False),
    seconds=st.floats(0.0, 1e5, allow_nan=False),
    n_samples=st.integers(0, 10**6),
    sequential=st.booleans(),
)
def test_a_row_survives_the_writer_and_the_reader(
    tmp_path_factory, idx, label, pred, radius, seconds, n_samples, sequential
):
    header = SEQUENTIAL_HEADER if sequential else CERTIFY_HEADER
    path = tmp_path_factory.mktemp("log") / "certify.tsv"
    path.write_text("\t".join(header) + "\n" + format_row(header, idx, label, pred, radius, seconds, n_samples, radius))
    rows = read_log_rows(path, strict_tail=True)
    assert rows.header == header
    assert len(rows.rows) == 1
    f = dict(zip(header, rows.rows[0], strict=True))
    assert (int(f["idx"]), int(f["label"]), int(f["predict"])) == (idx, label, pred)
    assert int(f["correct"]) == int(pred == label)
    written = float(f["radius"])
    assert written <= radius
    assert radius - written < 1.01e-6  # rounded down: never more than certified
    if sequential:
        assert int(f["n_samples"]) == n_samples
        assert float(f["radius_continuous"]) <= radius


def _oracle_stream(probs: list[float], batch_size: int) -> list:
    """Sequential CERTIFY of two-class oracle images (p of class 0 each; the oracle reads the image number from
    a pixel) through the packed engine at ``batch_size`` samples per forward pass."""
    k = len(probs)
    x = torch.zeros(k, 1, 1, 2, dtype=torch.float64)
    x[:, 0, 0, 1] = torch.arange(k, dtype=torch.float64) * ID_SPACING
    pr = np.stack([np.array(probs), 1 - np.array(probs)], axis=1)
    smooth = Smooth(_CategoricalOracle(pr, 0.5).eval(), 2, 0.5, seed=7, precision="fp32", input_range=None)
    settings_ = SequentialSettings(n0=20, n_max=400, alpha=0.01)
    done = dict(SequentialCertifier(smooth, settings_).certify_stream(zip(range(k), x, strict=True), batch_size))
    return [done[i] for i in range(k)]


@settings(max_examples=15, deadline=None)
@given(
    probs=st.lists(st.floats(0.3, 1.0), min_size=2, max_size=6),
    batch_a=st.integers(1, 300),
    batch_b=st.integers(1, 300),
)
@pytest.mark.slow
def test_the_packed_engine_keeps_each_sample_with_its_image(probs, batch_a, batch_b):
    """Each image's answer is a function of its own samples: the same under any batch size (forward batches mix
    the images still sampling, and finished images are replaced mid-batch; a sample counted for the wrong image
    would change the answers), and the same as the image certified alone."""
    first = _oracle_stream(probs, batch_a)
    assert first == _oracle_stream(probs, batch_b)
    assert first[0] == _oracle_stream(probs[:1], batch_b)[0]


@FAST
@given(n=st.integers(1, 2000), data=st.data(), alpha=st.floats(1e-6, 0.49), alpha2=st.floats(1e-6, 0.49))
def test_the_lower_bound_is_monotone_in_the_count_and_nested_in_alpha(n, data, alpha, alpha2):
    k = data.draw(st.integers(0, n - 1))
    low, high = sorted((alpha, alpha2))
    assert lower_confidence_bound(k, n, alpha) <= lower_confidence_bound(k + 1, n, alpha)
    assert lower_confidence_bound(k, n, low) <= lower_confidence_bound(k, n, high)  # more confidence, lower bound
    bound = lower_confidence_bound(k + 1, n, alpha)
    assert 0.0 <= bound <= (k + 1) / n
    if k + 1 == n:  # all successes: the bound is alpha ** (1 / n) exactly
        assert math.isclose(bound, alpha ** (1 / n), rel_tol=1e-9)
    assert np.isfinite(bound)
