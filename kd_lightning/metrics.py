"""Metrics of distillation beyond accuracy: how closely the student follows its teacher, and how
well calibrated a network's (MC-dropout) predictions are.

All are torchmetrics objects with sum/count (or concatenated) states, so they are exact under
DDP: each rank accumulates its shard and ``compute()`` reduces across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd_lightning import KDConfigError


def true_class_probability(logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    r""":math:`\phi_\gamma(f(x), y) = \exp(f(x)_y/\gamma) / \sum_j \exp(f(x)_j/\gamma)`, per example."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


class DistillationError(Metric):
    r"""The distillation error (Hsu, Ji, Telgarsky & Wang, "Generalization Bounds via
    Distillation", ICLR 2021; section 7 of the CS 541 scribe notes of November 9, 2021):

    .. math::
        \Phi_{\gamma,n}(f, g) = \frac{1}{n} \sum_{i=1}^n
            \left| \phi_\gamma(f(x_i), y_i) - \phi_\gamma(g(x_i), y_i) \right|,
        \qquad
        \phi_\gamma(f(x), y) = \frac{\exp(f(x)_y / \gamma)}{\sum_{j=1}^k \exp(f(x)_j / \gamma)},

    the mean absolute gap between the probabilities two predictors give to the *true* class at
    temperature :math:`\gamma > 0`; in the paper :math:`f` is the complex network (here the
    teacher) and :math:`g` the simpler one distilled from it (here the student). It enters the
    paper's bound on the test error of :math:`f` as :math:`8\,\Phi_{\gamma,n}(f, g)`: test error
    <= training error + distillation error + distillation complexity. 0 when the student
    reproduces the teacher's true-class probability on every example, at most 1 (symmetric in
    the two predictors).

    States: the sum of the gaps and the number of examples (summed across DDP ranks).

    Args:
        temperature: :math:`\gamma > 0` (default 1).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0:
            raise KDConfigError(f"the distillation error's temperature gamma must be > 0, got "
                                f"{temperature}.")
        self.temperature = float(temperature)
        self.add_state("gap_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> None:
        gap = (true_class_probability(teacher_logits, target, self.temperature)
               - true_class_probability(student_logits, target, self.temperature)).abs()
        self.gap_sum += gap.sum().double()
        self.count += gap.numel()

    def compute(self) -> Tensor:
        return (self.gap_sum / self.count.clamp(min=1)).float()


# ---- predictive uncertainty (MC dropout) ------------------------------------------------------
#: the dropout modules that MC dropout samples (functional ``F.dropout`` calls are not seen)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)


def dropout_modules(net: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``net`` with a non-zero drop probability."""
    return [m for m in net.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]


def entropy(probs: Tensor) -> Tensor:
    r""":math:`H(p) = -\sum_k p_k \log p_k` (nats) of each row of ``probs`` (``0 log 0 = 0``)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


@torch.no_grad()
def mc_dropout_probs(net: nn.Module, x: Tensor, samples: int) -> Tensor:
    r"""MC dropout (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016; part 2 of
    Liu's "Introduction to Some Parts of Deep Learning", Sheffield): the predictive distribution
    :math:`\frac{1}{T}\sum_{t=1}^T \mathrm{softmax}(f_{\hat W_t}(x))`, each :math:`\hat W_t` a fresh
    dropout mask. Only the dropout layers sample (they are switched to training mode for the
    passes); every other layer -- batch norm in
    particular -- stays in eval mode. Each module's mode is restored afterwards.

    Returns ``[B, K]`` probabilities (float32).
    """
    return mc_dropout_predictive(net, x, samples)[0]


@torch.no_grad()
def mc_dropout_predictive(net: nn.Module, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    r"""The MC-dropout predictive distribution (:func:`mc_dropout_probs`) and, per example, the
    expected entropy of the ``T`` passes, :math:`\frac{1}{T}\sum_t H(\mathrm{softmax}(f_{\hat
    W_t}(x)))` (nats): the aleatoric part of the predictive entropy in the decomposition
    :math:`H(\bar p) = \mathbb{E}_t H(p_t) + I` (Gal, "Uncertainty in Deep Learning", PhD thesis,
    Cambridge 2016; Depeweg et al., "Decomposition of Uncertainty in Bayesian Deep Learning",
    ICML 2018), whose rest :math:`I`, the mutual information between the prediction and the
    weights, is the epistemic part.

    Returns ``([B, K] probabilities, [B] expected entropies)``, float32; the same passes, in the
    same order, as :func:`mc_dropout_probs`.
    """
    drops = dropout_modules(net)
    if not drops:
        raise KDConfigError(f"MC dropout needs dropout layers, but {type(net).__name__} has none "
                            f"(nn.Dropout* with p > 0).")
    modes = {m: m.training for m in net.modules()}
    net.eval()
    for m in drops:
        m.train()
    try:
        total = total_entropy = None
        for _ in range(samples):
            p = F.softmax(net(x).float(), dim=-1)
            total = p if total is None else total + p
            total_entropy = entropy(p) if total_entropy is None else total_entropy + entropy(p)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return total / samples, total_entropy / samples


class PredictiveUncertainty(nn.Module):
    r"""Accuracy, expected calibration error, negative log-likelihood and predictive entropy of
    predicted class distributions :math:`p` (e.g. an MC-dropout mean), and for an MC-dropout mean
    the two parts of its entropy:

    * accuracy of :math:`\arg\max_k p_k`;
    * ECE (Guo et al., ICML 2017): :math:`\sum_b \frac{|B_b|}{n} |\mathrm{acc}(B_b) -
      \mathrm{conf}(B_b)|` over ``n_bins`` equal-width confidence bins (torchmetrics'
      :class:`~torchmetrics.classification.MulticlassCalibrationError`, L1 norm);
    * NLL: :math:`-\frac{1}{n}\sum_i \log p_{i, y_i}`;
    * predictive entropy (total uncertainty): :math:`\frac{1}{n}\sum_i H(p_i)`,
      :math:`H(p) = -\sum_k p_k \log p_k` (nats);
    * with ``mc=True``, from the ``T`` passes :math:`p_{i,t}` whose mean is :math:`p_i`: the
      expected entropy (aleatoric) :math:`\frac{1}{n}\sum_i \frac{1}{T}\sum_t H(p_{i,t})` and
      the mutual information (epistemic) :math:`\frac{1}{n}\sum_i \big(H(p_i) -
      \frac{1}{T}\sum_t H(p_{i,t})\big)`, total = aleatoric + epistemic (see
      :func:`mc_dropout_predictive`).

    Args:
        num_classes: number of classes.
        n_bins: confidence bins of the ECE (default 15, as Guo et al.).
        mc: also track the expected entropy and the mutual information (``update`` then takes
            each example's expected entropy).
    """

    def __init__(self, num_classes: int, n_bins: int = 15, mc: bool = False) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm="l1")
        self.nll = MeanMetric()
        self.entropy = MeanMetric()
        self.mc = mc
        if mc:
            self.expected_entropy, self.mutual_info = MeanMetric(), MeanMetric()

    def update(self, probs: Tensor, target: Tensor, expected_entropy: Tensor | None = None) -> None:
        """``probs``: ``[B, K]``; ``expected_entropy``: ``[B]``, each example's mean entropy over
        the MC passes (required with ``mc=True``)."""
        probs = probs.float()
        log_p = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        self.acc.update(probs, target)
        self.ece.update(probs, target)
        self.nll.update(-log_p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1))
        total = -(probs * log_p).sum(-1)
        self.entropy.update(total)
        if self.mc:
            if expected_entropy is None:
                raise ValueError("PredictiveUncertainty(mc=True).update needs expected_entropy.")
            self.expected_entropy.update(expected_entropy.float())
            self.mutual_info.update(total - expected_entropy.float())

    def _metrics(self) -> dict[str, Metric]:
        return {"acc": self.acc, "ece": self.ece, "nll": self.nll, "entropy": self.entropy,
                **({"expected_entropy": self.expected_entropy, "mutual_info": self.mutual_info}
                   if self.mc else {})}

    def compute(self) -> dict[str, Tensor]:
        return {name: metric.compute() for name, metric in self._metrics().items()}

    def reset(self) -> None:
        for metric in self._metrics().values():
            metric.reset()


class TestUncertainty(nn.Module):
    """The test-time uncertainty report of a student and (optionally) its teacher.

    For each network it tracks :class:`PredictiveUncertainty` of the deterministic prediction
    (dropout off, ``softmax`` of the logits of the ordinary test forward) and, for a network with
    dropout layers, of the MC-dropout mean over ``samples`` passes (:func:`mc_dropout_probs`).
    :meth:`compute` names them ``{prefix}ece``, ``{prefix}nll``, ``{prefix}entropy`` and
    ``{prefix}mc_acc``, ``{prefix}mc_ece``, ``{prefix}mc_nll``, ``{prefix}mc_entropy`` (total
    predictive uncertainty), ``{prefix}mc_expected_entropy`` (aleatoric) and
    ``{prefix}mc_mutual_info`` (epistemic; total = aleatoric + epistemic) (the deterministic
    accuracy is already ``test/acc`` / ``test/teacher_acc``).

    Args:
        num_classes: number of classes.
        samples: MC-dropout passes ``T`` per example.
        networks: log prefix -> whether that network is MC-sampled (has dropout), e.g.
            ``{"": True, "teacher_": False}``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, num_classes: int, samples: int, networks: dict[str, bool]) -> None:
        super().__init__()
        self.samples = samples
        self.mc = dict(networks)
        self.reports = nn.ModuleDict()
        for prefix, mc in networks.items():
            self.reports[f"{prefix}det"] = PredictiveUncertainty(num_classes)
            if mc:
                self.reports[f"{prefix}mc"] = PredictiveUncertainty(num_classes, mc=True)

    @torch.no_grad()
    def update(self, x: Tensor, target: Tensor, outputs: dict[str, tuple[nn.Module, Tensor]]) -> None:
        """``outputs``: log prefix -> (network, its deterministic logits for ``x``)."""
        for prefix, (net, logits) in outputs.items():
            self.reports[f"{prefix}det"].update(F.softmax(logits.float(), dim=-1), target)
            if self.mc[prefix]:
                probs, expected_entropy = mc_dropout_predictive(net, x, self.samples)
                self.reports[f"{prefix}mc"].update(probs, target, expected_entropy)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for prefix, mc in self.mc.items():
            det = self.reports[f"{prefix}det"].compute()
            out.update({f"{prefix}{k}": v for k, v in det.items() if k != "acc"})
            if mc:
                out.update({f"{prefix}mc_{k}": v for k, v in self.reports[f"{prefix}mc"].compute().items()})
        return out

    def reset(self) -> None:
        for report in self.reports.values():
            report.reset()
