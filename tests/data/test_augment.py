"""Augmentation presets, torchvision v2 pipelines from YAML, MixUp/CutMix with every method."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule, IndexedTensorDataset, random_crop_flip
from kd_lightning.data.augment import (BatchAugmentation, Cutout, Mixing, RandomCropFlip, cutmix, mixup,
                                       resolve_augment)
from kd_lightning.losses import labelled_cross_entropy
from kd_lightning.losses.decoupled import dkd_terms
from kd_lightning.losses.labels import UNLABELLED, MixedTargets
from kd_lightning.methods import DecoupledKD, ResponseKD, Supervised
from kd_lightning.models import MLP
from tests.conftest import CONFIGS, TINY, prepare_config, run_cli, run_cli_error, write_mnist_idx


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def _white(n=16, c=1, h=28, w=28) -> torch.Tensor:
    return torch.full((n, c, h, w), 255, dtype=torch.uint8)


def _training(dm: DistillDataModule) -> DistillDataModule:
    """``dm`` as during a fit's training stage (for calling its batch hook directly)."""
    dm.trainer = SimpleNamespace(training=True, world_size=1, logger=None)
    return dm


# ---- presets -------------------------------------------------------------------------------------
def test_jitter_preset_shifts_each_example_on_its_own_with_black_fill():
    ds = IndexedTensorDataset(_white(), torch.zeros(16, dtype=torch.long), augment="jitter",
                              normalize="unit")
    torch.manual_seed(0)
    x, _, _ = ds.get_batch(torch.arange(16))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}  # black (0) where the shift uncovered the border
    black = x[:, 0] == 0
    rows, cols = black.all(2).sum(1), black.all(1).sum(1)  # uncovered rows / columns per image
    assert rows.max() <= 2 and cols.max() <= 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 1  # per-example shifts
    assert not x[:, :, 2:-2, 2:-2].eq(0).any()  # the centre stays white: no flip, no crop beyond 2


def test_crop_flip_preset_is_the_batched_function_and_pads_black_before_standardising():
    ds = IndexedTensorDataset(_white(8, 3, 32, 32), torch.zeros(8, dtype=torch.long),
                              mean=[0.5] * 3, std=[0.25] * 3, augment="crop_flip")
    torch.manual_seed(1)
    x, _, _ = ds.get_batch(torch.arange(8))
    torch.manual_seed(1)
    expected = (random_crop_flip(_white(8, 3, 32, 32).float()) / 255 - 0.5) / 0.25
    assert torch.equal(x, expected)
    assert x.min() == (0 - 0.5) / 0.25 and x.max() == (1 - 0.5) / 0.25  # black padding


def test_device_presets_keep_shape_and_uint8_and_draw_per_example():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(12, 3, 32, 32).clone()  # 12 copies of one image
    for name in ("autoaugment_cifar", "randaugment", "cutout"):
        aug = resolve_augment(name, "cifar10", (3, 32, 32))
        out = aug(batch)
        assert out.shape == batch.shape and out.dtype == torch.uint8, name
        assert len({o.numpy().tobytes() for o in out}) > 1, name  # not one draw for the batch


def test_cutout_zeroes_one_clipped_square_per_image():
    torch.manual_seed(0)
    out = Cutout(8)(_white(64))
    assert out.dtype == torch.uint8
    holes = out[:, 0] == 0
    for hole in holes:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8
        assert hole.sum() == len(rows) * len(cols)  # a (clipped) rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    sizes = holes.sum((1, 2))
    assert sizes.max() == 64 and sizes.min() < 64  # clipped at the border for some centres


def test_v2_pipeline_runs_on_the_device_batch_and_scales_afterwards(tmp_path):
    write_mnist_idx(tmp_path, n_train=60, n_test=20)
    spec = [{"class_path": "torchvision.transforms.v2.RandomCrop",
             "init_args": {"size": 28, "padding": 2}},
            {"class_path": "torchvision.transforms.v2.RandomErasing", "init_args": {"p": 1.0}}]
    dm = DistillDataModule("mnist", root=str(tmp_path), batch_size=20, augment=spec, val_split=0)
    dm.setup("fit")
    assert isinstance(dm.augment, BatchAugmentation) and not dm.deterministic_train
    raw = next(iter(dm.train_dataloader()))
    assert raw[0].dtype == torch.uint8  # the loader serves pixels; the pipeline sees them
    torch.manual_seed(3)
    x, y, idx = _training(dm).on_after_batch_transfer(raw, 0)
    torch.manual_seed(3)
    expected = (torch.stack([dm.augment.transforms[1](dm.augment.transforms[0](r)) for r in raw[0]])
                .float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(x, expected) and torch.equal(y, raw[1]) and torch.equal(idx, raw[2])
    # without augmentation (get_batch: teacher caches, rule fitting) the inputs are the scaled pixels
    clean, _, _ = dm.train_dataset.get_batch(torch.arange(3))
    pixels = dm.splits().x_train[dm.train_indices[:3]].float()
    assert torch.allclose(clean, (pixels / 255 - MNIST_MEAN) / MNIST_STD)
    # validation batches pass the hook unchanged
    dm.trainer = SimpleNamespace(training=False)
    val = next(iter(dm.val_dataloader())) if len(dm.val_dataset) else raw
    assert dm.on_after_batch_transfer(val, 0) is val


def test_grouped_batches_are_augmented_per_minibatch(tmp_path):
    write_mnist_idx(tmp_path, n_train=60, n_test=20)
    dm = _training(DistillDataModule("mnist", root=str(tmp_path), batch_size=10, augment="randaugment",
                                     batches_per_step=3, val_split=0))
    dm.setup("fit")
    group = next(iter(dm.train_dataloader()))
    out = dm.on_after_batch_transfer(group, 0)
    assert len(out) == 3 and all(x.dtype == torch.float32 and x.shape == (10, 1, 28, 28) for x, _, _ in out)


# ---- the teacher cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, cached", [({}, True), ({"augment": "jitter"}, False),
                                            ({"augment": [{"class_path": "torchvision.transforms.v2."
                                                           "RandomErasing"}]}, False),
                                            ({"mixup": 0.4}, False)])
def test_teacher_cache_is_on_for_deterministic_inputs_only(kwargs, cached):
    dm = DistillDataModule("digits", batch_size=50, train_subset=100, **kwargs)
    assert dm.deterministic_train is cached
    torch.manual_seed(0)
    model = ResponseKD(student=MLP(input_dim=64, hidden_dims=[16]),
                       teacher=MLP(input_dim=64, hidden_dims=[16]))
    _trainer(limit_train_batches=1).fit(model, dm)
    assert model.teacher_cache_used is cached


# ---- a YAML list through the CLI -----------------------------------------------------------------
def test_cli_takes_a_yaml_list_of_v2_transforms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mnist_idx(tmp_path / "data", n_train=60, n_test=20)
    (tmp_path / "aug.yaml").write_text(
        "data:\n  dataset: mnist\n  root: data\n  val_split: 10\n  mixup: 0.2\n  cutmix: 1.0\n"
        "  augment:\n"
        "    - class_path: torchvision.transforms.v2.RandomCrop\n"
        "      init_args: {size: 28, padding: 2}\n"
        "    - class_path: torchvision.transforms.v2.RandomErasing\n"
        "      init_args: {p: 0.5}\n")
    calls = []
    real = Mixing.__call__
    monkeypatch.setattr(Mixing, "__call__", lambda self, x, y: calls.append(1) or real(self, x, y))
    cli = run_cli(["fit", "--config", CONFIGS / "mnist" / "student.yaml", "--config", "aug.yaml",
                   *TINY, "--data.batch_size", "16"])
    dm = cli.datamodule
    assert [type(t).__name__ for t in dm.augment.transforms] == ["RandomCrop", "RandomErasing"]
    assert len(calls) == 2  # both training steps were mixed (validation is not)
    assert math.isfinite(float(cli.trainer.callback_metrics["test/loss"]))
    assert "RandomErasing" in (Path(cli.trainer.log_dir) / "config.yaml").read_text()


# ---- mixed targets -------------------------------------------------------------------------------
def _ce(logits, labels):
    """Hand-written cross-entropy per row: log sum exp z - z_y."""
    return torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None]).squeeze(1)


def test_mixup_input_and_loss_are_the_mixed_formulas():
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    perm, lam = torch.tensor([3, 0, 5, 1, 2, 4]), 0.3
    xm = mixup(x, perm, lam)
    assert torch.allclose(xm, 0.3 * x + 0.7 * x[perm])
    model = Supervised(student=MLP(input_dim=64, hidden_dims=[8]), num_classes=10)
    logits, terms, _ = model.compute_losses(xm, MixedTargets(y, y[perm], lam), torch.arange(6))
    expected = 0.3 * _ce(logits, y).mean() + 0.7 * _ce(logits, y[perm]).mean()
    assert torch.allclose(terms["loss_ce"], expected)


def test_cutmix_pastes_one_box_and_lam_is_one_minus_its_area():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 10, 10).clone()  # image i is all i
    perm = torch.tensor([1, 2, 3, 0])
    torch.manual_seed(2)
    out, lam = cutmix(x, perm, 0.64)
    pasted = out != x
    box = pasted[0, 0]
    rows, cols = box.any(1).sum(), box.any(0).sum()
    assert box.sum() == rows * cols and 0 < box.sum() <= 36  # a 6x6 box (clipped at the border)
    assert lam == pytest.approx(1 - float(box.sum()) / 100)
    assert all(torch.equal(pasted[i], pasted[0]) for i in range(4))  # one box for the batch
    assert torch.equal(out[pasted.expand_as(out)].view(4, -1)[:, 0], x[perm, 0, 0, 0])


def test_mixed_cross_entropy_skips_unlabelled_parts_and_their_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    a = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    b = torch.tensor([1, 2, UNLABELLED, UNLABELLED])
    loss = labelled_cross_entropy(logits, MixedTargets(a, b, 0.25))
    ce_a = _ce(logits[[0, 2]], a[[0, 2]]).mean()
    ce_b = _ce(logits[[0, 1]], b[[0, 1]]).mean()
    assert torch.allclose(loss, 0.25 * ce_a + 0.75 * ce_b)
    loss.backward()
    assert torch.equal(logits.grad[3], torch.zeros(3))  # both parts unlabelled: no label gradient


def test_dkd_under_mixing_is_lam_times_each_split():
    torch.manual_seed(0)
    model = DecoupledKD(student=MLP(input_dim=64, hidden_dims=[8]),
                        teacher=MLP(input_dim=64, hidden_dims=[8]), num_classes=10, warmup_epochs=0)
    x = torch.randn(5, 1, 8, 8)
    a, b = torch.tensor([1, 2, 3, 4, UNLABELLED]), torch.tensor([5, 1, 2, UNLABELLED, 0])
    logits, terms, _ = model.compute_losses(x, MixedTargets(a, b, 0.6), torch.arange(5))
    t_logits = model.teacher(x)
    fill = t_logits.argmax(-1)
    tckd_a, nckd_a = dkd_terms(logits, t_logits, torch.where(a < 0, fill, a), model.temperature)
    tckd_b, nckd_b = dkd_terms(logits, t_logits, torch.where(b < 0, fill, b), model.temperature)
    assert torch.allclose(terms["loss_tckd"], model.target_weight * (0.6 * tckd_a + 0.4 * tckd_b))
    assert torch.allclose(terms["loss_nckd"], model.non_target_weight * (0.6 * nckd_a + 0.4 * nckd_b))


def test_mixing_probability_and_choice():
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8)
    torch.manual_seed(0)
    never = Mixing(mixup=1.0, prob=0.0)
    assert never(x, y)[1] is y
    torch.manual_seed(0)
    xm, ym = Mixing(mixup=1.0)(x, y)
    assert isinstance(ym, MixedTargets) and torch.allclose(xm, ym.lam * x + (1 - ym.lam) * x[ym.b])


# ---- a method that refuses mixed batches ---------------------------------------------------------
# (every method trains on MixUp batches or refuses them with its own message:
# tests/methods/test_conformance.py)
def test_crd_with_class_aware_negatives_refuses_mixing_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prepare_config(CONFIGS / "mnist1d" / "crd.yaml", tmp_path)
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d" / "crd.yaml", *TINY,
                         "--data.mixup", "0.4", "--trainer.logger.init_args.save_dir", "logs"], capsys)
    assert "CRD cannot train on mixed batches" in err and "class_aware_negatives: false" in err
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]  # (the folder is checked)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("augment, match", [
    ("autoaugment", "unknown augment='autoaugment'. Valid values: none, crop_flip, jitter, "
                    "autoaugment_cifar, randaugment, cutout"),
    ([{"class_path": "torchvision.transforms.ToTensor"}], "ToTensor failed on a training image"),
    ([{"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": 14}}],
     r"Resize turned a tensor of shape \(1, 28, 28\)"),
    ([{"class_path": "datetime.timedelta", "init_args": {"days": 1}}], "is not a transform"),
    ([{"class_path": "torchvision.transforms.v2.NoSuchCrop"}], "cannot import class_path"),
    ([{"class_path": "torchvision.transforms.v2.RandomCrop", "init_args": {"sise": 28}}],
     "RandomCrop.*failed: TypeError"),
    (["crop_flip_twice"], "is not a preset"),
    (7, "give a preset name"),
])
def test_bad_augmentations_are_refused_when_the_data_module_is_built(augment, match, tmp_path):
    write_mnist_idx(tmp_path, n_train=60, n_test=20)
    with pytest.raises(KDConfigError, match=match):
        DistillDataModule("mnist", root=str(tmp_path), augment=augment)


@pytest.mark.parametrize("dataset, kwargs, match", [
    ("mnist1d", {"cutmix": 1.0}, "cutmix pastes a box of one image into another; mnist1d is 1-D"),
    ("mnist1d", {"augment": [{"class_path": "torchvision.transforms.v2.RandomErasing"}]}, "is 1-D"),
    ("digits", {"augment": "cutout"}, "flips images horizontally"),
    ("digits", {"augment": "randaugment"}, "works on 8-bit pixels; digits comes preprocessed"),
    ("digits", {"mixup": -1.0}, "mixup=-1.0: give the Beta distribution's alpha"),
    ("digits", {"mixup": 0.2, "mix_prob": 2}, r"mix_prob=2 must be in \[0, 1\]"),
])
def test_mixing_and_presets_that_do_not_fit_the_data_are_refused(dataset, kwargs, match):
    with pytest.raises(KDConfigError, match=match):
        DistillDataModule(dataset, **kwargs)


def test_mixup_on_1d_data_is_supported():
    dm = _training(DistillDataModule("mnist1d", mixup=0.4, train_subset=100, batch_size=8))
    dm.setup("fit")
    torch.manual_seed(0)
    x, y, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (8, 1, 40) and isinstance(y, MixedTargets)


def test_a_bad_transform_in_yaml_stops_the_cli_before_anything_is_written(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    write_mnist_idx(tmp_path / "data", n_train=60, n_test=20)
    (tmp_path / "aug.yaml").write_text(
        "data:\n  dataset: mnist\n  root: data\n  augment:\n"
        "    - class_path: torchvision.transforms.ToTensor\n")
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist" / "student.yaml", "--config",
                         "aug.yaml", *TINY, "--trainer.logger.init_args.save_dir", "logs"], capsys)
    assert "augment: ToTensor failed on a training image of shape (1, 28, 28)" in err
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]  # (the folder is checked)


def test_a_transform_given_in_python_is_used_as_it_is():
    class Invert(nn.Module):
        def forward(self, x):
            return 255 - x

    aug = resolve_augment([Invert()], "mnist", (1, 28, 28))
    assert torch.equal(aug(_white(2)), torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert torch.equal(RandomCropFlip(0, flip=False)(_white(2)), _white(2))


def test_augmentation_crops_and_flips_per_example():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip(x.repeat(64, 1, 1, 1), padding=2)
    assert out.shape == (128, 3, 8, 8)
    assert len({tuple(o.flatten().tolist()) for o in out[::2]}) > 5  # different crops/flips
    # with zero padding/flip off, the image is unchanged
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    # every output pixel comes from the image or the zero padding
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}
