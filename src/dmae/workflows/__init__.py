"""Chains of the two flows, for the command line only: the demo and the paper's experiments."""
