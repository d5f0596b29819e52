"""kd_lightning.training.epochs: schedule lengths in epochs or as a fraction of max_epochs, the one
helper every method with a schedule in epochs uses."""

from __future__ import annotations

import re

import pytest

from kd_lightning import KDConfigError
from kd_lightning.training.epochs import check_epochs, resolve_epochs


@pytest.mark.parametrize("value, max_epochs, expected", [
    (0, None, 0), (20, None, 20), (20, 5, 20),  # an int is a number of epochs, whatever the run
    (0.0, 270, 0), (0.1111, 270, 30), (0.2, 150, 30), (0.5, 3, 2), (0.25, 2, 1), (0.1, 4, 0)])
def test_a_fraction_rounds_to_the_nearest_epoch(value, max_epochs, expected):
    resolved = resolve_epochs(value, max_epochs, "stage1_epochs", "FitNet")
    assert resolved == expected and isinstance(resolved, int)


def test_exact_keeps_the_fraction_of_the_run_unrounded():
    assert resolve_epochs(0.0833, 150, "warmup_epochs", "ReviewKD", exact=True) == pytest.approx(12.495)
    assert resolve_epochs(12, 150, "warmup_epochs", "ReviewKD", exact=True) == 12


@pytest.mark.parametrize("value, message", [
    (-1, "FitNet: stage1_epochs must be an integer >= 0 (epochs) or a float in [0, 1)"),
    (-0.5, "FitNet: stage1_epochs must be an integer >= 0"), (True, "FitNet: stage1_epochs must be"),
    ("3", "FitNet: stage1_epochs must be"),
    (1.5, "FitNet: stage1_epochs=1.5 is a float, which means a fraction of max_epochs and must be "
          "in [0, 1). Give a number of epochs as an integer (e.g. 1)."),
    (1.0, "FitNet: stage1_epochs=1.0 is a float")])
def test_bad_values_are_refused_with_whose_argument_it_is(value, message):
    with pytest.raises(KDConfigError, match="^" + re.escape(message)):
        check_epochs(value, "stage1_epochs", "FitNet")
    with pytest.raises(KDConfigError, match="stage1_epochs"):
        resolve_epochs(value, 10, "stage1_epochs", "FitNet")


@pytest.mark.parametrize("max_epochs", [None, -1])
def test_a_fraction_needs_max_epochs(max_epochs):
    with pytest.raises(KDConfigError, match=r"^DecoupledKD: warmup_epochs=0.2 is a fraction of "
                                            r"trainer.max_epochs, which is not set"):
        resolve_epochs(0.2, max_epochs, "warmup_epochs", "DecoupledKD")
