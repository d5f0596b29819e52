"""Stratified few-data subsets and seeded validation splits."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import stratified_subset, train_val_split


def _labels(n_per_class=(30, 30, 30, 12)):
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


# ---- subset sampling --------------------------------------------------------------------
def test_stratified_subset_is_balanced_and_seeded():
    y = np.random.default_rng(3).permutation(_labels((50, 50, 50, 50)))
    idx = stratified_subset(y, 20, seed=7)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.bincount(y[idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert np.array_equal(idx, stratified_subset(y, 20, seed=7))  # pure function
    assert not np.array_equal(idx, stratified_subset(y, 20, seed=8))
    assert np.all(np.diff(idx) > 0)


def test_stratified_subset_remainder_spread_one_per_class():
    y = _labels((40, 40, 40, 40))
    counts = np.bincount(y[stratified_subset(y, 10, seed=1)], minlength=4)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1


def test_stratified_subset_identical_in_another_process():
    """The draw is the same in any process (as on every DDP rank): no global RNG involved."""
    y = np.random.default_rng(0).integers(0, 10, 500)
    np.random.seed(123)
    torch.manual_seed(123)
    here = stratified_subset(y, 50, seed=4).tolist()
    path = Path(__file__).resolve().parents[2] / "kd_lightning" / "data" / "subset.py"
    code = ("import importlib.util as u, numpy as np;"
            f"s=u.spec_from_file_location('subset', r'{path}'); m=u.module_from_spec(s);"
            "s.loader.exec_module(m); stratified_subset=m.stratified_subset;"
            "y=np.random.default_rng(0).integers(0,10,500); np.random.seed(999);"
            "print(stratified_subset(y,50,seed=4).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("m, match", [(3, "smaller than the number of classes"),
                                      (1000, "larger than the training set"),
                                      (60, "examples of class 3")])
def test_stratified_subset_bad_sizes(m, match):
    with pytest.raises(KDConfigError, match=match):
        stratified_subset(_labels(), m, seed=0)


def test_train_val_split_disjoint_and_seeded():
    tr, va = train_val_split(100, 0.2, seed=5)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert np.array_equal(va, train_val_split(100, 0.2, seed=5)[1])
    with pytest.raises(KDConfigError):
        train_val_split(100, 1.5)
