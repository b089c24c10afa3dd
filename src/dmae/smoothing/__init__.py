"""Randomized smoothing: the smoothed classifier, its certificates and their statistics."""

from dmae.smoothing.bounds import (certified_radius, check_alpha, lower_confidence_bound, predict_pvalue,
                                   radius_ceiling)
from dmae.smoothing.core import CHUNK, Certificate, Prediction, Smooth, chunk_seed

__all__ = ["CHUNK", "Certificate", "Prediction", "Smooth", "certified_radius", "check_alpha", "chunk_seed",
           "lower_confidence_bound", "predict_pvalue", "radius_ceiling"]
