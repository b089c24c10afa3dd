"""The certification flow over a data set: the runner (per-image logs, resume, shards), the log format, the cost
estimate and the accuracy probe; the per-image algorithms are in :mod:`dmae.smoothing`."""
