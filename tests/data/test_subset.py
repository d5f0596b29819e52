"""Stratified few-data subsets and seeded validation splits."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import (DistillDataModule, stratified_subset, stratified_subset_per_class,
                               train_val_split)
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error


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


# ---- budgets per class ------------------------------------------------------------------
def test_per_class_subset_takes_that_many_of_every_class_and_equals_the_total_draw():
    y = np.random.default_rng(5).permutation(_labels((30, 30, 30, 12)))
    idx = stratified_subset_per_class(y, 7, seed=2)
    assert np.bincount(y[idx], minlength=4).tolist() == [7, 7, 7, 7]
    assert np.array_equal(idx, stratified_subset(y, 28, seed=2))  # the same examples as M = 7 K
    assert np.array_equal(idx, stratified_subset_per_class(y, 7, seed=2))
    assert not np.array_equal(idx, stratified_subset_per_class(y, 7, seed=3))


@pytest.mark.parametrize("per_class, match", [(13, "asks for 13 examples of class 3 .'d'., but the "
                                                   "training set .after the validation split. has "
                                                   "only 12. Use train_subset_per_class <= 12"),
                                              (0, "must be a positive integer"),
                                              (True, "must be a positive integer")])
def test_per_class_subset_refuses_a_class_too_small_or_a_bad_count(per_class, match):
    with pytest.raises(KDConfigError, match=match):
        stratified_subset_per_class(_labels(), per_class, seed=0, class_names=["a", "b", "c", "d"])


def test_datamodule_per_class_budget_is_the_total_budget_of_k_times_as_many():
    total = DistillDataModule("mnist1d", train_subset=500, subset_seed=3)
    per_class = DistillDataModule("mnist1d", train_subset_per_class=50, subset_seed=3)
    assert np.array_equal(per_class.labelled_indices, total.labelled_indices)
    y = per_class.splits().y_train[per_class.labelled_indices].numpy()
    assert np.bincount(y, minlength=10).tolist() == [50] * 10
    assert per_class.state_dict()["train_subset_per_class"] == 50
    with pytest.raises(KDConfigError, match="resume with the same data settings"):
        DistillDataModule("mnist1d", train_subset=500).load_state_dict(per_class.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"train_subset": 500, "train_subset_per_class": 50}, "both set the few-data budget; give one"),
    ({"train_subset_per_class": 0}, "must be a positive integer"),
    ({"train_subset_per_class": 100000}, "asks for 100000 examples of class 0, but the training set "
                                         r"\(after the validation split\) has only \d+"),
])
def test_datamodule_refuses_bad_per_class_budgets(kwargs, match):
    with pytest.raises(KDConfigError, match=match):
        DistillDataModule("mnist1d", **kwargs)


def test_cli_per_class_budget_is_recorded_in_train_subset_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--data.train_subset_per_class", "20", "--test_after_fit", "false"])
    record = json.loads((Path(cli.trainer.log_dir) / "train_subset.json").read_text())
    assert record["train_subset_per_class"] == 20 and record["train_subset"] is None
    assert record["num_examples"] == 200
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                         "--data.train_subset", "200", "--data.train_subset_per_class", "20"], capsys)
    assert "both set the few-data budget" in err
