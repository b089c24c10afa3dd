"""dmae.errors: every error dmae raises on purpose is a DmaeError and keeps the built-in base it had."""

import pytest

from dmae.certification.log import LogError
from dmae.checkpoint import CheckpointError
from dmae.data import DataError
from dmae.errors import DmaeError, StageInterrupted
from dmae.reporting.report import ReportError
from dmae.workflows.experiments import ExperimentError


@pytest.mark.parametrize(
    "error, base",
    [
        (CheckpointError, RuntimeError),
        (DataError, RuntimeError),
        (LogError, ValueError),
        (ReportError, ValueError),
        (ExperimentError, ValueError),
        (StageInterrupted, RuntimeError),
    ],
)
def test_each_error_is_a_dmae_error_and_keeps_its_base(error, base):
    assert issubclass(error, DmaeError) and issubclass(error, base)
    with pytest.raises(DmaeError, match="the offending value"):
        raise error("the offending value")
