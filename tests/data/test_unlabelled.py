"""Unlabelled transfer data: the subset, the data module's batches and checks, the CLI option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import UNLABELLED, DistillDataModule, unlabelled_subset
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error


# ---- the draw ------------------------------------------------------------------------------
def test_unlabelled_subset_is_disjoint_seeded_and_rest_is_the_complement():
    labelled = np.array([2, 5, 7, 11])
    u = unlabelled_subset(20, labelled, 6, seed=3)
    assert len(u) == 6 and np.all(np.diff(u) > 0)
    assert not set(u.tolist()) & set(labelled.tolist())
    assert np.array_equal(u, unlabelled_subset(20, labelled, 6, seed=3))  # pure function
    assert not np.array_equal(u, unlabelled_subset(20, labelled, 6, seed=4))
    rest = unlabelled_subset(20, labelled, "rest", seed=3)
    assert rest.tolist() == [i for i in range(20) if i not in labelled]


@pytest.mark.parametrize("count, match", [(-1, "negative"), (17, "larger than what the training "
                                                                  "split has left"),
                                          ("all", "a number of examples or 'rest'")])
def test_unlabelled_subset_bad_counts(count, match):
    with pytest.raises(KDConfigError, match=match):
        unlabelled_subset(20, np.array([0, 1, 2, 3]), count)


def test_datamodule_unlabelled_disjoint_from_labelled_and_validation_stratification_intact():
    plain = DistillDataModule("mnist1d", train_subset=100, subset_seed=1)
    dm = DistillDataModule("mnist1d", train_subset=100, subset_seed=1, unlabelled=500)
    y = dm.splits().y_train.numpy()
    # the labelled subset is exactly the one drawn without unlabelled data: still stratified
    assert np.array_equal(dm.labelled_indices, plain.labelled_indices)
    assert np.bincount(y[dm.labelled_indices], minlength=10).tolist() == [10] * 10
    lab, unl, val = (set(a.tolist()) for a in (dm.labelled_indices, dm.unlabelled_indices,
                                                dm.val_indices))
    assert len(unl) == 500 == dm.num_unlabelled
    assert not unl & lab and not unl & val
    assert set(dm.train_indices.tolist()) == lab | unl
    # a pure function of (labels, M, seeds): a second module draws the same
    again = DistillDataModule("mnist1d", train_subset=100, subset_seed=1, unlabelled=500)
    assert np.array_equal(again.unlabelled_indices, dm.unlabelled_indices)
    other = DistillDataModule("mnist1d", train_subset=100, subset_seed=2, unlabelled=500)
    assert not np.array_equal(other.unlabelled_indices, dm.unlabelled_indices)
    # "rest": every training-split example outside the labelled subset, none of validation
    rest = DistillDataModule("mnist1d", train_subset=100, subset_seed=1, unlabelled="rest")
    assert rest.num_unlabelled == len(y) - len(dm.val_indices) - 100
    assert set(rest.train_indices.tolist()) == set(range(len(y))) - val


def test_training_batches_hide_the_labels_of_unlabelled_examples_only():
    dm = DistillDataModule("mnist1d", batch_size=64, train_subset=100, unlabelled=300)
    dm.setup("fit")
    y_true = dm.splits().y_train
    seen = 0
    for x, y, idx in dm.train_dataloader():
        is_unl = torch.from_numpy(np.isin(idx.numpy(), dm.unlabelled_indices))
        assert bool((y[is_unl] == UNLABELLED).all())
        assert torch.equal(y[~is_unl], y_true[idx[~is_unl]])
        seen += len(idx)
    assert seen == 400
    _, y_val, _ = next(iter(dm.val_dataloader()))
    assert bool((y_val >= 0).all())  # validation is never unlabelled


@pytest.mark.parametrize("kwargs, match", [
    ({"unlabelled": "rest"}, "needs train_subset"),
    ({"unlabelled": 10}, "needs train_subset"),
    ({"train_subset": 100, "unlabelled": -5}, "negative"),
    ({"train_subset": 100, "unlabelled": 3501}, "larger than what the training split has left"),
    ({"train_subset": 100, "unlabelled": "everything"}, "'rest'"),
    ({"train_subset": 100, "unlabelled": True}, "'rest'"),
])
def test_impossible_unlabelled_settings_are_refused(kwargs, match):
    with pytest.raises(KDConfigError, match=match):
        DistillDataModule("mnist1d", **kwargs)


def test_unlabelled_setting_is_saved_and_checked_on_resume():
    dm = DistillDataModule("mnist1d", train_subset=100, unlabelled="rest")
    assert dm.state_dict()["unlabelled"] == "rest" and dm.hparams.unlabelled == "rest"
    with pytest.raises(KDConfigError, match="data.unlabelled='rest'"):
        DistillDataModule("mnist1d", train_subset=100).load_state_dict(dm.state_dict())


def test_cli_run_with_the_rest_unlabelled(tmp_path, monkeypatch, mnist1d_teacher):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY,
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher,
                   "--data.train_subset", "100", "--data.unlabelled", "rest",
                   "--test_after_fit", "false"])
    assert cli.datamodule.unlabelled == "rest" and cli.datamodule.num_unlabelled == 3500
    record = json.loads((Path(cli.trainer.log_dir) / "train_subset.json").read_text())
    assert record["unlabelled"] == "rest" and record["num_unlabelled"] == 3500
    assert not set(record["unlabelled_indices"]) & set(record["indices"])
    assert len(record["indices"]) == 100
    assert cli.trainer.global_step == 2


def test_cli_takes_a_number_and_refuses_unlabelled_without_a_subset(tmp_path, monkeypatch, capsys,
                                                                    mnist1d_teacher):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--data.train_subset", "100", "--data.unlabelled", "250",
                   "--test_after_fit", "false"])
    assert cli.datamodule.unlabelled == 250 and cli.datamodule.num_unlabelled == 250
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY,
                         "--model.init_args.teacher_checkpoint", mnist1d_teacher,
                         "--data.unlabelled", "rest"], capsys)
    assert "needs train_subset" in err
