"""The multi-view data set of the CS 541 scribe notes (Shen, 2021), section 9: the written distribution
and its embedding."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.data.sources import load_multiview, make_multiview, multiview_features
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP

# the notes' table, written out again: (label, case) -> (probability, v1, v2, v3, v4)
SEED_TABLE = {
    (0, 0): (0.8, [1.0, 1.0, 0.1, 0.1]),  # v1, v2 = 1, v3, v4 = 0.1
    (0, 1): (0.1, [1.0, 0.0, 0.1, 0.1]),  # v1 = 1, v3, v4 = 0.1
    (0, 2): (0.1, [0.0, 1.0, 0.1, 0.1]),  # v2 = 1, v3, v4 = 0.1
    (1, 0): (0.8, [0.1, 0.1, 1.0, 1.0]),  # v3, v4 = 1, v1, v2 = 0.1
    (1, 1): (0.1, [0.1, 0.1, 1.0, 0.0]),  # v3 = 1, v1, v2 = 0.1
    (1, 2): (0.1, [0.1, 0.1, 0.0, 1.0]),  # v4 = 1, v1, v2 = 0.1
}


def test_labels_cases_and_coefficients_follow_the_written_distribution():
    n = 200_001
    s = make_multiview(n, patch_dim=4, patches=4, noise=0.0, seed=3)
    assert int((s.y == 0).sum()) == n // 2 and int((s.y == 1).sum()) == n - n // 2
    for (label, case), (prob, coefficients) in SEED_TABLE.items():
        in_label = s.y == label
        chosen = in_label & (s.view == case)
        share = float(chosen.sum()) / float(in_label.sum())
        se = math.sqrt(prob * (1 - prob) / float(in_label.sum()))
        assert abs(share - prob) < 4 * se, (label, case, share)
        assert torch.equal(s.coefficients[chosen], torch.tensor(coefficients).expand(int(chosen.sum()), 4))


def test_every_feature_sits_in_a_patch_of_its_own_scaled_by_its_coefficient():
    patch_dim, patches = 16, 6
    s = make_multiview(2000, patch_dim=patch_dim, patches=patches, noise=0.0, seed=1)
    v = multiview_features(patch_dim, seed=1)
    torch.testing.assert_close(v @ v.T, torch.eye(4), atol=1e-6, rtol=0)
    proj = s.x.reshape(-1, patches, patch_dim) @ v.T  # [n, patch, feature]
    torch.testing.assert_close(proj.sum(1), s.coefficients, atol=1e-5, rtol=0)
    present = proj.abs() > 1e-6
    assert int(present.sum(1).max()) == 1  # a feature is never split over patches
    assert int(present.sum(2).max()) == 1  # a patch never holds two features
    # the rest of each input is zero without noise: the input is its features and nothing else
    rebuilt = (proj.unsqueeze(-1) * v).sum(2).reshape(s.x.shape)
    torch.testing.assert_close(rebuilt, s.x, atol=1e-5, rtol=0)


def test_noise_has_the_stated_scale():
    patch_dim, noise = 64, 2.0
    clean = make_multiview(4000, patch_dim=patch_dim, patches=4, noise=0.0, seed=0, stream=5)
    noisy = make_multiview(4000, patch_dim=patch_dim, patches=4, noise=noise, seed=0, stream=5)
    assert torch.equal(clean.y, noisy.y) and torch.equal(clean.view, noisy.view)
    # same draws for labels and cases; the noise is an independent Gaussian of std noise/sqrt(d)
    residual = noisy.x - (noisy.x.reshape(-1, 4, patch_dim) @ multiview_features(patch_dim, 0).T
                          ).unsqueeze(-1).mul(multiview_features(patch_dim, 0)).sum(2).reshape(noisy.x.shape)
    # the residual is the noise minus its (small) component along the four features
    assert residual.std().item() == pytest.approx(noise / math.sqrt(patch_dim) * math.sqrt(1 - 4 / patch_dim), rel=0.02)


def test_deterministic_by_seed_with_separate_train_and_test_draws():
    a, b = load_multiview(n_train=50, n_test=40, patch_dim=8), load_multiview(n_train=50, n_test=40, patch_dim=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert a.x_train.shape == (50, 1, 32) and a.num_classes == 2
    assert not torch.equal(a.x_train[:40], a.x_test)
    c = load_multiview(n_train=50, n_test=40, patch_dim=8, seed=1)
    assert not torch.equal(a.x_train, c.x_train)


def test_bad_options_are_refused():
    with pytest.raises(KDConfigError, match="unknown option"):
        load_multiview(dims=3)
    with pytest.raises(KDConfigError, match="patches >= 4"):
        load_multiview(patches=3)
    with pytest.raises(KDConfigError, match="only multiview"):
        DistillDataModule("digits", source_options={"noise": 1.0})


def test_the_data_module_serves_it_with_its_configured_shape(tmp_path):
    dm = DistillDataModule("multiview", source_options={"patch_dim": 10, "patches": 5, "n_train": 200,
                                                        "n_test": 100}, batch_size=50)
    assert dm.num_classes == 2 and dm.input_shape == (1, 50)
    model = Supervised(student=MLP(input_dim=50, hidden_dims=[8], num_classes=2), num_classes=2)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert trainer.test(model, dm, verbose=False)[0]["test/acc"] >= 0
