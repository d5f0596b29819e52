"""Methods that distil relations between the penultimate embeddings of a batch:

- PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018;
- CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.

Both compare ``B x B`` matrices built from each network's embeddings of the same batch, so the
student's and the teacher's embeddings may have different widths and no connector is needed.
"""

from __future__ import annotations

import math

from kd_lightning import KDConfigError
from kd_lightning.losses.correlation import cc_loss
from kd_lightning.losses.probabilistic import pkt_loss
from kd_lightning.methods.feature import FeatureDistillation, Shape
from kd_lightning.methods.relation import _embedding_layer
from kd_lightning.models.taps import resolve_module


class _EmbeddingDistillation(FeatureDistillation):
    """Base of the embedding-relation methods: taps one embedding per network.

    By default the embedding is the *input* of the network's last ``nn.Linear`` (its classifier),
    i.e. the pooled penultimate features: ``fc`` in every zoo model and in torchvision ResNets,
    ``model.fc`` inside :class:`~kd_lightning.models.TorchvisionModel`, ``classifier.1`` in
    MobileNetV2 (the same default as :class:`~kd_lightning.methods.RelationKD`). The tapped
    feature is flattened per example.

    Args:
        student_layer, teacher_layer: module paths of the embeddings; default ``None``: the input
            of the last ``nn.Linear``.
        layer_input: for explicit layer paths, tap each module's input instead of its output
            (``student_layer: fc, layer_input: true`` is the default embedding). Both networks
            are tapped the same way.
        **kwargs: see :class:`~kd_lightning.methods.feature.FeatureDistillation`.
    """

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None,
                 layer_input: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        (s_layer,), s_input = self._embedding(self.student, "student", student_layer, layer_input)
        (t_layer,), t_input = self._embedding(self.teacher, "teacher", teacher_layer, layer_input)
        resolve_module(self.student, s_layer)  # an unknown path is reported first
        resolve_module(self.teacher, t_layer)
        if s_input != t_input:
            default, explicit = ("student", "teacher") if student_layer is None else ("teacher", "student")
            raise KDConfigError(
                f"{name}: the {default}'s default embedding is the input of its classifier, but "
                f"the {explicit} layer '{t_layer if explicit == 'teacher' else s_layer}' is tapped "
                f"at its output (layer_input: false). Both networks are tapped the same way: give "
                f"both student_layer and teacher_layer, or set layer_input: true.")
        self.init_features([s_layer], [t_layer], pre_activation=s_input)

    def _embedding(self, net, role: str, layer: str | None, layer_input: bool) -> tuple[list[str], bool]:
        try:
            return _embedding_layer(net, role, layer, layer_input)
        except KDConfigError as err:  # the shared helper's message names RelationKD
            raise KDConfigError(str(err).replace("RelationKD", type(self).__name__, 1)) from None

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        """Any embedding shapes work (flattened per example; the widths may differ)."""


class ProbabilisticKnowledgeTransfer(_EmbeddingDistillation):
    r"""Probabilistic knowledge transfer, PKT (Passalis & Tefas, ECCV 2018).

    .. math::
        L = w_{ce}\, CE(y, z_s) + w\, \frac{1}{B^2} \sum_{i, j} p_{j|i}
            \log \frac{p_{j|i} + \epsilon}{q_{j|i} + \epsilon}
            \;(+\, w_{kd}\, T^2\, \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)))

    with :math:`p_{j|i}` (teacher) and :math:`q_{j|i}` (student) the conditional probabilities
    of the cosine-similarity kernel between the embeddings of the batch
    (:func:`~kd_lightning.losses.pkt_loss`). The student learns which examples are neighbours
    in the teacher's embedding, not the embedding itself. Relations are those within each
    process's batch (under DDP, within each rank's share). :math:`w` is ``transfer_weight``.

    Layers: the penultimate embedding (the input of the classifier) of both networks, as in the
    paper's classification experiments and the CRD benchmark.

    Logged terms (weighted): ``loss``, ``loss_pkt``, ``loss_ce`` (and ``loss_kd``).

    Args:
        transfer_weight: :math:`w` (default 30000, the CRD benchmark's CIFAR-100 value; the
            paper has no CIFAR-100 run).
        **kwargs: ``student_layer``, ``teacher_layer`` (module paths of the embeddings;
            default: the input of the last ``nn.Linear``), ``layer_input`` (tap those modules'
            inputs), ``ce_weight`` (1), ``kd_weight`` (0: CE + PKT as in the CRD benchmark),
            ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, transfer_weight: float = 30000.0, **kwargs) -> None:
        super().__init__(transfer_weight=transfer_weight, **kwargs)

    def transfer_loss(self, feats, t_feats):
        return "loss_pkt", pkt_loss(feats[0], t_feats[0])


class CorrelationCongruence(_EmbeddingDistillation):
    r"""Correlation congruence, CC (Peng et al., ICCV 2019).

    .. math::
        L = w_{ce}\, CE(y, z_s) + \beta\, \frac{1}{n^2} \big\| \psi(F_t) - \psi(F_s) \big\|_2^2
            \;(+\, w_{kd}\, T^2\, \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)))

    with :math:`\psi(F)_{ij} = k(f_i, f_j)` the batch's ``n x n`` correlation matrix under the
    Gaussian RBF kernel :math:`k(x, y) = e^{-\gamma \|x - y\|^2}`, approximated by its Taylor
    expansion of order :math:`P` on the L2-normalised embeddings
    (:func:`~kd_lightning.losses.cc_loss`). The paper's objective is
    :math:`\alpha\, CE + (1 - \alpha)\, KD + \beta\, L_{CC}`: ``ce_weight`` and ``kd_weight``
    give both parts. Correlations are those within each process's batch (under DDP, within each
    rank's share). :math:`\beta` is ``transfer_weight``.

    Embedding: the penultimate features (the input of the classifier) of both networks, with no
    projection head. The paper correlates the networks' feature embeddings; the Taylor expansion
    is exact for unit-norm rows, which the normalisation provides. A trainable linear head on
    each side (as in torchdistill's CCKD) adds parameters and, on the teacher's side, lets both
    heads agree on a constant embedding, for which every correlation matrix is the same and the
    loss is zero whatever the student's features; the frozen teacher embedding has no such
    solution. (The CRD benchmark's "CC" uses linear heads too, but a different formula, so its
    weight 0.02 does not apply here.)

    Logged terms (weighted): ``loss``, ``loss_cc``, ``loss_ce`` (and ``loss_kd``).

    Args:
        transfer_weight: :math:`\beta` (default 200). No published weight fits this form
            (squared distance of kernel correlations of normalised embeddings): torchdistill's
            0.003 multiplies an unsquared norm of raw linear embeddings, the CRD benchmark's 0.02
            another formula. Like SP, CC compares the batch's cosine-similarity structure; 200
            puts the CC term at the scale of SP's term with its benchmark weight 3000 for batches
            of 64-100 examples.
        kernel_gamma: :math:`\gamma > 0` of the RBF kernel (default 0.4).
        taylor_order: :math:`P`, an integer >= 1 (default 2).
        normalize_embeddings: L2-normalise each embedding before the expansion (default true).
        **kwargs: ``student_layer``, ``teacher_layer`` (module paths of the embeddings;
            default: the input of the last ``nn.Linear``), ``layer_input`` (tap those modules'
            inputs), ``ce_weight`` (1), ``kd_weight`` (0), ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, transfer_weight: float = 200.0, kernel_gamma: float = 0.4,
                 taylor_order: int = 2, normalize_embeddings: bool = True, **kwargs) -> None:
        if not (kernel_gamma > 0 and math.isfinite(kernel_gamma)):
            raise KDConfigError(f"CorrelationCongruence: kernel_gamma must be a finite number > 0, "
                                f"got {kernel_gamma!r} (the RBF kernel is exp(-gamma |x - y|^2); "
                                f"0.4 is the usual value).")
        if isinstance(taylor_order, bool) or not isinstance(taylor_order, int) or taylor_order < 1:
            raise KDConfigError(f"CorrelationCongruence: taylor_order must be an integer >= 1, got "
                                f"{taylor_order!r} (the paper uses P = 2).")
        super().__init__(transfer_weight=transfer_weight, **kwargs)
        self.kernel_gamma, self.taylor_order = kernel_gamma, taylor_order
        self.normalize_embeddings = normalize_embeddings

    def transfer_loss(self, feats, t_feats):
        return "loss_cc", cc_loss(feats[0], t_feats[0], self.kernel_gamma, self.taylor_order,
                                  self.normalize_embeddings)
