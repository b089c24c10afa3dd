"""Randomized smoothing (Cohen et al., ICML 2019): the smoothed classifier, its certificates and their statistics;
its sound floating-point variant for 8-bit images (Voráček & Hein, ICLR 2023) in :mod:`dmae.smoothing.sound`."""

from dmae.smoothing.bounds import (
    certified_radius,
    check_alpha,
    check_certify_budget,
    check_predict_budget,
    lower_confidence_bound,
    min_certify_samples,
    min_predict_samples,
    predict_pvalue,
    radius_ceiling,
)
from dmae.smoothing.confseq import (
    BettingMixture,
    ConfidenceSequence,
    Decision,
    UnionBoundCP,
    continuous_gap,
    decide,
    make_sequence,
    threshold,
)
from dmae.smoothing.core import CHUNK, Certificate, Prediction, SampleCounts, Smooth, chunk_seed
from dmae.smoothing.sequential import SequentialCertificate, SequentialCertifier, SequentialSettings
from dmae.smoothing.sound import DiscreteGaussian, SoundSmooth

__all__ = [
    "CHUNK",
    "BettingMixture",
    "Certificate",
    "ConfidenceSequence",
    "Decision",
    "DiscreteGaussian",
    "Prediction",
    "SampleCounts",
    "SequentialCertificate",
    "SequentialCertifier",
    "SequentialSettings",
    "Smooth",
    "SoundSmooth",
    "UnionBoundCP",
    "certified_radius",
    "check_alpha",
    "check_certify_budget",
    "check_predict_budget",
    "chunk_seed",
    "continuous_gap",
    "decide",
    "lower_confidence_bound",
    "make_sequence",
    "min_certify_samples",
    "min_predict_samples",
    "predict_pvalue",
    "radius_ceiling",
    "threshold",
]
