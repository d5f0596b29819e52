"""Mutual distillation's losses: the rule-regularised teacher, the student and knowledge objectives,
the rule-weight gradient and the imitation schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import (imitation_weight, knowledge_loss, mutual_student_loss, response_kd_loss,
                                 rule_regularized_teacher, rule_weight_loss)


K = 4  # classes of the synthetic problems


# ---- closed-form teacher -------------------------------------------------------------------
def test_teacher_matches_hand_computed_projection():
    # p = (1/2, 1/4, 1/4), r = (1, 0, 1/2), lambda = 1, C = 2 ln 2:
    # q ∝ p * exp(C (r - 1)) = (1/2, 1/4 * 1/4, 1/4 * 1/2) = (8, 1, 2) / 11
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])) + 3.0  # logits are defined up to a shift
    r = torch.tensor([[[1.0, 0.0, 0.5]]])
    log_q = rule_regularized_teacher(logits, r, torch.tensor([1.0]), C=2 * math.log(2))
    assert torch.allclose(log_q.exp(), torch.tensor([[8.0, 1.0, 2.0]]) / 11, atol=1e-6)
    # two rules with their own weights: exponents add
    # p uniform over 2 classes, r1 = (1, 0), r2 = (0, 1), lambda = (1, 0.5), C = ln 4:
    # q ∝ (exp(0) * exp(-0.5 ln 4), exp(-ln 4) * exp(0)) = (1/2, 1/4) -> (2/3, 1/3)
    r2 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    q2 = rule_regularized_teacher(torch.zeros(1, 2), r2, torch.tensor([1.0, 0.5]), C=math.log(4)).exp()
    assert torch.allclose(q2, torch.tensor([[2 / 3, 1 / 3]]), atol=1e-6)


def test_teacher_with_no_rule_strength_is_the_student():
    logits = torch.randn(8, 5)
    r = torch.rand(2, 8, 5)
    p = F.log_softmax(logits, -1)
    assert torch.allclose(rule_regularized_teacher(logits, r, torch.tensor([0.7, 2.0]), C=0.0), p, atol=1e-6)
    assert torch.allclose(rule_regularized_teacher(logits, r, torch.zeros(2), C=6.0), p, atol=1e-6)
    ones = torch.ones(2, 8, 5)  # rules satisfied by every class
    assert torch.allclose(rule_regularized_teacher(logits, ones, torch.ones(2), C=6.0), p, atol=1e-6)
    with pytest.raises(ValueError, match="C must be >= 0"):
        rule_regularized_teacher(logits, r, torch.ones(2), C=-1.0)


def test_teacher_is_stable_for_huge_rule_weights():
    logits = torch.tensor([[30.0, 0.0, -30.0]])
    r = torch.tensor([[[0.0, 0.0, 1.0]]])
    log_q = rule_regularized_teacher(logits, r, torch.tensor([1e6]), C=1e3)
    assert torch.isfinite(log_q).all()
    assert torch.allclose(log_q.exp(), torch.tensor([[0.0, 0.0, 1.0]]))


def test_student_loss_mixes_labels_and_teacher():
    logits, y = torch.randn(6, K), torch.randint(0, K, (6,))
    q = F.softmax(torch.randn(6, K), -1)
    ce = F.cross_entropy(logits, y)
    soft = -(q * F.log_softmax(logits, -1)).sum(-1).mean()
    for pi in (0.0, 0.3, 1.0):
        total, ce_t, soft_t = mutual_student_loss(logits, y, q, pi)
        assert torch.allclose(total, (1 - pi) * ce + pi * soft)
        assert torch.allclose(ce_t, ce) and torch.allclose(soft_t, soft)
    # a network teacher replaces the label term by Hinton's objective
    z_t = torch.randn(6, K)
    hinton, _, _ = response_kd_loss(logits, z_t, y, 4.0, 0.1, 0.9)
    total, _, _ = mutual_student_loss(logits, y, q, 0.25, label_loss=hinton)
    assert torch.allclose(total, 0.75 * hinton + 0.25 * soft)


def test_rule_weight_gradient_is_the_rule_expectation_gap():
    """dL/dlambda_l = -C mean_n (r_l(x_n, y_n) - E_q[r_l(x_n, .)]) for the NLL form of Eq. 6."""
    torch.manual_seed(1)
    logits, y, r = torch.randn(10, K), torch.randint(0, K, (10,)), torch.rand(2, 10, K)
    lam = torch.tensor([0.5, 1.5], requires_grad=True)
    C = 3.0
    loss = rule_weight_loss(logits, r, lam, y, C, objective="mean_log_q")
    loss.backward()
    q = rule_regularized_teacher(logits, r, lam.detach(), C).exp()
    r_true = r[:, torch.arange(10), y]
    expected = -C * (r_true - (q[None] * r).sum(-1)).mean(-1)
    assert torch.allclose(lam.grad, expected, atol=1e-5)
    assert torch.allclose(loss, F.nll_loss(q.log(), y), atol=1e-5)


def _mean_q_by_hand(logits, r, lam, y, C):
    """Eq. 6 of Hu et al. (EMNLP 2016) in float64 with explicit loops: the mean over the labelled
    examples of q_lambda(y_n | x_n), q ∝ p exp(C sum_l lambda_l (r_l - 1)), and its gradient
    C mean_n q(y_n) (r_l(y_n) - sum_y q(y) r_l(y))."""
    total, grad, n = 0.0, [0.0] * len(lam), 0
    for i, label in enumerate(y):
        if label < 0:
            continue
        n += 1
        z = [math.exp(logits[i][k] + C * sum(lam[l] * (r[l][i][k] - 1) for l in range(len(lam))))
             for k in range(len(logits[i]))]
        q = [v / sum(z) for v in z]
        total += q[label]
        for l in range(len(lam)):
            expected_r = sum(q[k] * r[l][i][k] for k in range(len(q)))
            grad[l] += C * q[label] * (r[l][i][label] - expected_r)
    return total / n, [g / n for g in grad]


def test_rule_weights_maximise_the_mean_of_q_by_default_against_hand_computed_values():
    logits = [[0.2, -1.0, 0.5], [1.5, 0.0, -0.5], [-0.3, 0.3, 0.9], [0.0, 2.0, 0.0]]
    r = [[[1.0, 0.0, 0.5], [0.2, 0.9, 0.1], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
         [[0.3, 0.6, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 1.0, 0.2]]]
    lam, y, C = [0.7, 1.8], [2, 0, -1, 1], 2.5  # the third example is unlabelled: left out
    expected, expected_grad = _mean_q_by_hand(logits, r, lam, y, C)
    lam_t = torch.tensor(lam, requires_grad=True)
    loss = rule_weight_loss(torch.tensor(logits), torch.tensor(r), lam_t, torch.tensor(y), C)
    loss.backward()
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(-expected, rel=1e-6)
    assert lam_t.grad.tolist() == pytest.approx([-g for g in expected_grad], rel=1e-5, abs=1e-7)
    explicit = rule_weight_loss(torch.tensor(logits), torch.tensor(r), lam_t, torch.tensor(y), C,
                                objective="mean_q")
    assert float(explicit.detach()) == float(loss.detach())
    with pytest.raises(ValueError, match="objective must be one of"):
        rule_weight_loss(torch.tensor(logits), torch.tensor(r), lam_t, torch.tensor(y), C, "q")


def test_mean_q_and_mean_log_q_choose_different_rule_weights():
    """p uniform over two classes, one rule saying class 0, right on 3 of 4 examples; with
    s = C lambda, q(y_n) = sigmoid(s) where the rule is right, sigmoid(-s) where it is wrong.
    The mean of q, 3/4 sigmoid(s) + 1/4 sigmoid(-s), grows with s: Eq. 6 as written takes the
    largest lambda on the grid. The mean log q peaks at sigmoid(s) = 3/4, s = log 3."""
    logits = torch.zeros(4, 2)
    r = torch.tensor([[1.0, 0.0]]).expand(4, 2)[None]
    y = torch.tensor([0, 0, 0, 1])
    grid = [i / 100 for i in range(501)]  # lambda in [0, 5], C = 1
    chosen = {}
    for objective in ("mean_q", "mean_log_q"):
        losses = [float(rule_weight_loss(logits, r, torch.tensor([lam]), y, 1.0, objective))
                  for lam in grid]
        chosen[objective] = grid[min(range(len(grid)), key=losses.__getitem__)]
    assert chosen["mean_q"] == 5.0
    assert chosen["mean_log_q"] == pytest.approx(math.log(3), abs=0.006)
    # and the gradients at lambda = 2 point in opposite directions
    grads = {}
    for objective in ("mean_q", "mean_log_q"):
        lam = torch.tensor([2.0], requires_grad=True)
        rule_weight_loss(logits, r, lam, y, 1.0, objective).backward()
        grads[objective] = float(lam.grad)
    assert grads["mean_q"] < 0 < grads["mean_log_q"]


def test_knowledge_objective_mixes_true_labels_and_teacher():
    torch.manual_seed(2)
    r = torch.rand(1, 5, K).softmax(-1)
    y, q = torch.randint(0, K, (5,)), F.softmax(torch.randn(5, K), -1)
    onehot = F.one_hot(y, K).float()
    for pi_prime in (0.0, 0.4, 1.0):
        target = (1 - pi_prime) * onehot + pi_prime * q
        assert torch.allclose(knowledge_loss(r, y, q, pi_prime, "r"), -(target * r[0]).sum(-1).mean())
        assert torch.allclose(knowledge_loss(r, y, q, pi_prime, "log_r"),
                              -(target * r[0].log()).sum(-1).mean(), atol=1e-6)


def test_imitation_schedule():
    assert imitation_weight(0, 0.9, 0.95) == 0.0
    assert imitation_weight(1, 0.9, 0.95) == pytest.approx(0.05)
    assert imitation_weight(10.5, 0.9, 0.95) == pytest.approx(1 - 0.95**10.5)
    assert imitation_weight(200, 0.9, 0.95) == 0.9
