"""Knowledge (rule) modules: the interface checks and the MNIST-1D template rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data.sources import load_mnist1d
from kd_lightning.rules import (
    MNIST1DLearnableTemplateRule,
    MNIST1DPermutedTemplateRule,
    MNIST1DTemplateRule,
    Rule,
    RuleOutputError,
    evaluate_rule,
    evaluate_rules,
    mnist1d_templates,
)


@pytest.fixture(scope="module")
def mnist1d():
    return load_mnist1d("data")


@pytest.fixture(scope="module")
def fixed_rule():
    return MNIST1DTemplateRule()


class _Const(Rule):
    def __init__(self, value: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().__init__(name="const")
        self.value, self.mask = value, mask

    def forward(self, x):
        return self.value if self.mask is None else (self.value, self.mask)


# ---- the interface -------------------------------------------------------------------------
def test_evaluate_rule_rejects_wrong_shape_naming_rule_and_shape():
    rule = _Const(torch.full((4, 3), 0.5))
    with pytest.raises(RuleOutputError,
                       match=r"rule 2 \(const\) returned r of shape \(4, 3\); expected .* \(4, 10\)"):
        evaluate_rule(rule, torch.zeros(4, 40), num_classes=10, index=2)


@pytest.mark.parametrize("bad", [1.5, -0.2, float("nan")])
def test_evaluate_rule_rejects_values_outside_unit_interval(bad):
    value = torch.full((4, 10), 0.5)
    value[1, 3] = bad
    with pytest.raises(RuleOutputError,
                       match=r"rule 0 \(const\) returned r of shape \(4, 10\) with values outside \[0, 1\]"):
        evaluate_rule(_Const(value), torch.zeros(4, 40), num_classes=10)


def test_mask_means_no_claim_and_hides_bad_values():
    value = torch.rand(4, 10)
    value[0] = 7.0  # outside [0, 1], but the rule does not apply to example 0
    mask = torch.tensor([False, True, True, False])
    r = evaluate_rule(_Const(value, mask), torch.zeros(4, 40), num_classes=10)
    assert torch.equal(r[0], torch.ones(10)) and torch.equal(r[3], torch.ones(10))
    assert torch.equal(r[1:3], value[1:3])
    # a per-class mask works the same way
    cmask = torch.zeros(4, 10, dtype=torch.bool)
    cmask[:, :2] = True
    r = evaluate_rule(_Const(torch.rand(4, 10), cmask), torch.zeros(4, 40), num_classes=10)
    assert torch.equal(r[:, 2:], torch.ones(4, 8))
    with pytest.raises(RuleOutputError, match="mask of shape"):
        evaluate_rule(_Const(torch.rand(4, 10), torch.ones(3, dtype=torch.bool)), torch.zeros(4, 40), 10)


def test_tiny_rounding_overshoot_is_clamped_and_rules_stack():
    value = torch.full((2, 10), 1.0 + 1e-7)
    r = evaluate_rules([_Const(value), _Const(torch.zeros(2, 10))], torch.zeros(2, 40), 10)
    assert r.shape == (2, 2, 10) and float(r.max()) == 1.0


# ---- MNIST-1D template rules ------------------------------------------------------------------
def test_fixed_rule_has_no_parameters_and_learnable_rule_has_phi():
    fixed, learn = MNIST1DTemplateRule(), MNIST1DLearnableTemplateRule()
    assert list(fixed.parameters()) == [] and not fixed.learnable
    names = {n for n, _ in learn.named_parameters()}
    assert names == {"templates", "log_sharpness"} and learn.learnable
    assert torch.allclose(learn.templates, mnist1d_templates())
    rnd = MNIST1DLearnableTemplateRule(templates="random", seed=3)
    assert not torch.allclose(rnd.templates, mnist1d_templates())
    assert torch.equal(rnd.templates, MNIST1DLearnableTemplateRule(templates="random", seed=3).templates)
    # the buffers that describe the placements are not saved in checkpoints
    assert set(learn.state_dict()) == {"templates", "log_sharpness"}
    assert set(fixed.state_dict()) == {"templates", "log_sharpness"}


def test_output_is_a_distribution_over_classes(mnist1d, fixed_rule):
    x = mnist1d.x_test[:64]
    r = fixed_rule(x)
    assert r.shape == (64, 10)
    assert float(r.min()) >= 0 and float(r.max()) <= 1
    assert torch.allclose(r.sum(-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(fixed_rule(x[:, 0]), r)  # [B, 40] works as well as [B, 1, 40]


def test_a_clean_generated_template_matches_its_own_class_perfectly(fixed_rule):
    """The placement model follows mnist1d's generator: without noise or shear, the generated
    signal is found exactly (correlation 1) whatever the padding, scale and translation."""
    from mnist1d.data import get_dataset_args, get_templates
    from mnist1d.transform import transform

    args = get_dataset_args()
    args.corr_noise_scale, args.iid_noise_scale, args.shear_scale = 0.0, 0.0, 0.0
    t = get_templates()
    np.random.seed(0)
    xs, ys = [], []
    for _ in range(3):
        for c in range(10):
            x, _ = transform(t["x"][c], t["t"], args)
            xs.append(x)
            ys.append(c)
    x = torch.tensor(np.stack(xs), dtype=torch.float32)
    s = fixed_rule.scores(x)
    own = s[torch.arange(len(ys)), torch.tensor(ys)]
    assert float(own.min()) > 0.97
    assert (s.argmax(-1) == torch.tensor(ys)).float().mean() >= 0.95


def test_scores_ignore_offset_scale_and_linear_trend(mnist1d, fixed_rule):
    x = mnist1d.x_test[:32, 0]
    trend = torch.linspace(-1, 1, 40)
    y = 2.5 * x - 0.7 + 0.8 * trend
    assert torch.allclose(fixed_rule.scores(x), fixed_rule.scores(y), atol=1e-3)


def test_rule_alone_accuracy_on_mnist1d(mnist1d, fixed_rule):
    """The demonstration knowledge is honest: 82.1% on the 1,000 test examples (the reference MLP
    gets about 68%), and the permuted rule is almost always wrong."""
    with torch.no_grad():
        acc = (fixed_rule(mnist1d.x_test).argmax(-1) == mnist1d.y_test).float().mean()
        wrong = MNIST1DPermutedTemplateRule()
        acc_wrong = (wrong(mnist1d.x_test).argmax(-1) == mnist1d.y_test).float().mean()
    assert float(acc) == pytest.approx(0.821, abs=0.005)
    assert float(acc_wrong) < 0.05
    # the wrong rule predicts exactly the class before the right one
    with torch.no_grad():
        shifted = (fixed_rule(mnist1d.x_test[:100]).argmax(-1) - 1) % 10
    assert torch.equal(wrong(mnist1d.x_test[:100]).argmax(-1), shifted)


def test_learnable_rule_is_differentiable_in_phi_and_runs_in_float32_under_autocast(mnist1d):
    rule = MNIST1DLearnableTemplateRule()
    x = mnist1d.x_test[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = rule(x)
    assert r.dtype == torch.float32
    r[torch.arange(16), mnist1d.y_test[:16]].sum().backward()
    assert rule.templates.grad is not None and float(rule.templates.grad.abs().sum()) > 0
    assert rule.log_sharpness.grad is not None


def test_example_features_give_the_same_rule_values_and_gradients(mnist1d):
    """forward(x, features=example_features(x)) is forward(x), bit for bit, also when the
    features come from a larger batch (the per-example cache fills in chunks of 1024)."""
    rule = MNIST1DLearnableTemplateRule(dilation_step=2, sharpness=50.0)
    assert Rule().example_features(torch.zeros(2, 40)) is None  # the default: nothing to cache
    x_all = mnist1d.x_test[:300]
    with torch.no_grad():
        cached = rule.example_features(x_all)
    assert cached.shape == (300, rule.maps.shape[0])
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:50]
    x, w = x_all[idx], torch.rand(50, 10, generator=torch.Generator().manual_seed(1))
    out = []
    for features in (None, cached[idx]):
        rule.zero_grad()
        r = rule(x, features=features)
        (r * w).sum().backward()
        out.append((r.detach(), rule.templates.grad.clone(), rule.log_sharpness.grad.clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)
    r = evaluate_rules([rule, _Const(torch.full((50, 10), 0.5))], x, 10, features=[cached[idx], None])
    assert torch.equal(r[0], out[0][0])


def _dense_scores(rule, x, features=None):
    """The template rule's ``s_c(x)`` as one autograd graph over every placement: the correlations
    ``[B, K, N]`` and ``torch.amax`` over placements (whose gradient is split evenly among tied
    maxima). The reference for :meth:`MNIST1DTemplateRule.scores`."""
    x = x.reshape(x.shape[0], -1).float()
    norm = rule.example_features(x) if features is None else features
    g = rule.placed_templates()
    k, n, length = g.shape
    return ((x @ g.reshape(k * n, length).T).view(-1, k, n) / norm[:, None, :]).amax(-1)


def _select_placements(rule, index):
    """The rule restricted to (or repeating) the placements ``index``, in that order."""
    for name in ("maps", "windows", "window_maps", "window_index"):
        setattr(rule, name, getattr(rule, name)[index])
    rule.trend_basis = rule.trend_basis[:, index]
    return rule


def _with_duplicated_placements(rule, copies):
    """The rule with placement ``dst`` replaced by a copy of placement ``src`` for every
    ``(dst, src)`` in ``copies``: the two then score every example identically (exact ties)."""
    index = torch.arange(rule.maps.shape[0])
    for dst, src in copies:
        index[dst] = src
    return _select_placements(rule, index)


def test_best_placement_scores_equal_the_dense_max_and_its_gradient_also_at_ties(mnist1d):
    """scores() computes every correlation without autograd and recomputes only each row's
    maximisers with it: the same values as the dense amax, bit for bit, and the same gradients
    (templates, x) up to float32 summation order, also at exact ties (constructed: duplicated
    placements, and all-zero signals, where every placement scores 0), where the gradient is
    split evenly among the tied placements as torch.amax splits it."""
    x = mnist1d.x_test[:40].reshape(40, -1).clone()
    x[7] = 0.0  # every placement of every class ties at 0
    probe = MNIST1DLearnableTemplateRule(sharpness=50.0)
    with torch.no_grad():
        g = probe.placed_templates()
        ratio = (x @ g.reshape(-1, g.shape[-1]).T).view(40, 10, -1) / probe.example_features(x)[:, None]
        arg = ratio.argmax(-1)
    n = probe.maps.shape[0]
    # a double tie at (example 3, class 2) and a triple tie at (example 5, class 6)
    a, b = int(arg[3, 2]), int(arg[5, 6])
    copies = [((a + 600) % n, a), ((b + 300) % n, b), ((b + 900) % n, b)]
    assert len({c[0] for c in copies} | {a, b}) == 5
    rule = _with_duplicated_placements(MNIST1DLearnableTemplateRule(sharpness=50.0), copies)
    with torch.no_grad():
        g = rule.placed_templates()
        ratio = (x @ g.reshape(-1, g.shape[-1]).T).view(40, 10, -1) / rule.example_features(x)[:, None]
        count = (ratio == ratio.amax(-1, keepdim=True)).sum(-1)
    assert int(count[3, 2]) == 2 and int(count[5, 6]) == 3 and bool((count[7] == n).all())
    assert int((count > 1).sum()) >= 12  # the constructed ties (others may tie as well)
    w = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    out = []
    for scores in (lambda x: _dense_scores(rule, x), rule.scores):
        rule.zero_grad()
        x_in = x.clone().requires_grad_(True)
        s = scores(x_in)
        (s * w).sum().backward()
        out.append((s.detach(), rule.templates.grad.clone(), x_in.grad.clone()))
    (s_ref, t_ref, x_ref), (s_got, t_got, x_got) = out
    assert torch.equal(s_got, s_ref)
    # each entry of a gradient sums many terms of both signs, so compare on the gradient's scale
    for got, ref in ((t_got, t_ref), (x_got, x_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float(x_ref[7].abs().max()) > 0  # the all-way tie of the zero signal has a gradient
    # cached features (no gradient through the window norms) and the no-gradient path
    with torch.no_grad():
        features = rule.example_features(x)
    rule.zero_grad()
    (_dense_scores(rule, x, features) * w).sum().backward()
    t_ref = rule.templates.grad.clone()
    rule.zero_grad()
    (rule.scores(x, features) * w).sum().backward()
    torch.testing.assert_close(rule.templates.grad, t_ref, rtol=1e-5, atol=1e-5 * float(t_ref.abs().max()))
    with torch.no_grad():
        assert torch.equal(rule.scores(x, features), s_ref)


def test_best_placement_scores_match_the_dense_max_on_other_grids(mnist1d):
    """The same equality on coarser placement grids (other block sizes in the maximiser search,
    including a prime number of placements) and a random start."""
    x = mnist1d.x_train[:64]
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    for kwargs in ({"dilation_step": 3, "shift_step": 5}, {"dilation_step": 2, "templates": "random"},
                   {"dilation_step": 25}):
        rule = MNIST1DLearnableTemplateRule(sharpness=80.0, **kwargs)
        if kwargs == {"dilation_step": 25}:  # 48 placements; keep 47, a prime: blocks of one
            _select_placements(rule, torch.arange(47))
        grads = []
        for scores in (lambda x: _dense_scores(rule, x), rule.scores):
            rule.zero_grad()
            r = torch.softmax(rule.sharpness * scores(x), -1)
            (r * w).sum().backward()
            grads.append((r.detach(), rule.templates.grad.clone(), rule.log_sharpness.grad.clone()))
        (r_ref, t_ref, b_ref), (r_got, t_got, b_got) = grads
        assert torch.equal(r_got, r_ref) and torch.equal(b_got, b_ref)
        torch.testing.assert_close(t_got, t_ref, rtol=1e-5, atol=1e-5 * float(t_ref.abs().max()))


def test_the_backward_pass_of_a_learnable_rule_stores_no_per_placement_tensor(mnist1d):
    """Only the best placements are recomputed with autograd: nothing the backward pass keeps is
    as large as the [B, K, N] correlations (what makes the rule's backward cheap)."""
    rule = MNIST1DLearnableTemplateRule(sharpness=50.0)
    x = mnist1d.x_test[:50]
    with torch.no_grad():
        features = rule.example_features(x)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = rule(x, features=features)
    r.sum().backward()
    n = rule.maps.shape[0]
    assert sizes and max(sizes) < 50 * 10 * n / 4  # [R, W, T] window maps: 50 * 10 * 11 * 12
    assert rule.templates.grad is not None and float(rule.templates.grad.abs().sum()) > 0


def test_window_maps_are_the_detrended_placements():
    """The windowed maps that recompute the best placements are P_n M_n: placed templates are zero
    outside their window, and the windowed product equals the full detrended placement."""
    rule = MNIST1DLearnableTemplateRule(dilation_step=2)
    with torch.no_grad():
        g = rule.placed_templates()  # [K, N, L], detrended and normalised
        n = rule.maps.shape[0]
        inside = torch.zeros(n, rule.signal_len, dtype=torch.bool)
        inside[torch.arange(n)[:, None], rule.window_index] = True
        assert float(g[:, ~inside].abs().max()) == 0.0
        u = torch.einsum("nwt,ct->cnw", rule.window_maps, rule.templates)
        u = u / u.norm(dim=-1, keepdim=True)
        idx = rule.window_index[None].expand(10, -1, -1)
        torch.testing.assert_close(u, g.gather(2, idx), rtol=1e-5, atol=1e-6)


def test_bad_template_rule_arguments():
    with pytest.raises(KDConfigError, match="permutation must be a permutation"):
        MNIST1DTemplateRule(permutation=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(KDConfigError, match="sharpness must be > 0"):
        MNIST1DTemplateRule(sharpness=0)
    with pytest.raises(KDConfigError, match="templates must be"):
        MNIST1DLearnableTemplateRule(templates="zeros")
    with pytest.raises(KDConfigError,
                       match=r"expects MNIST-1D signals of length 40 .* shape \(2, 3, 28, 28\)"):
        MNIST1DTemplateRule()(torch.zeros(2, 3, 28, 28))


def test_rule_subclass_interface():
    class Half(Rule):
        def forward(self, x):
            return torch.full((x.shape[0], 3), 0.5)

    rule = Half()
    assert rule.rule_name == "Half" and not rule.learnable
    assert isinstance(rule, nn.Module)
    assert evaluate_rule(rule, torch.zeros(5, 2), 3).shape == (5, 3)


def test_sharpness_is_fitted_on_the_runs_labelled_examples_only():
    """With sharpness=None the rule's beta is the maximum-likelihood value on the M labelled
    training examples the run sees (no labels beyond them)."""
    import pytorch_lightning as pl
    import torch.nn.functional as F

    from kd_lightning.data import DistillDataModule
    from kd_lightning.methods import MutualDistillation
    from kd_lightning.models import MLP
    from kd_lightning.rules import MNIST1DTemplateRule

    seen = {}

    class Recording(MNIST1DTemplateRule):
        def fit_to_labelled(self, x, y):
            seen["n"] = len(y)
            super().fit_to_labelled(x, y)

    rule = Recording(dilation_step=3, shift_step=4)
    dm = DistillDataModule("mnist1d", train_subset=100)
    model = MutualDistillation(student=MLP(), rules=[rule], learn_phi=False, num_classes=10)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               accelerator="cpu", limit_val_batches=0).fit(model, dm)
    assert seen["n"] == 100
    x, y, _ = dm.train_dataset.get_batch(torch.arange(100))
    s = rule.scores(x)
    nll = lambda b: F.cross_entropy(b * s, y).item()  # noqa: E731
    beta = float(rule.sharpness)
    assert nll(beta) <= min(nll(beta * 1.1), nll(beta / 1.1)) + 1e-6  # a minimum of the NLL
    fixed = MNIST1DTemplateRule(sharpness=200.0, dilation_step=3, shift_step=4)
    fixed.fit_to_labelled(x, y)
    assert float(fixed.sharpness) == pytest.approx(200.0)  # an explicit value is kept
