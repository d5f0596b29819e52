"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning", CVPR 2017."""

from __future__ import annotations

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import fsp_loss, fsp_matrix
from kd_lightning.methods.feature import Shape, TwoStageFeatureDistillation, describe, is_map


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


class FSP(TwoStageFeatureDistillation):
    r"""Flow-of-solution-procedure transfer (Yim et al., 2017).

    For each pair of layers ``(a, b)`` the FSP matrix
    :math:`G_{ij} = \sum_{s,t} F^a_{s,t,i} F^b_{s,t,j} / (h w)` (:func:`~kd_lightning.losses.fsp_matrix`)
    is computed in both
    networks. Stage 1: :math:`L_{FSP} = \frac1N \sum_x \sum_i \lambda_i \|G_i^T - G_i^S\|_2^2`
    only (:func:`~kd_lightning.losses.fsp_loss`). Stage 2: the original task, cross-entropy (the
    paper; ``kd_weight > 0`` adds KD). With ``stage1_epochs=0``: task loss + ``transfer_weight``
    x FSP loss.

    As in the paper, the two maps of a pair have the same spatial size: the first and the last map
    of a residual stage (on CIFAR ResNets ``[[relu, layer1], [layer2.0, layer2], [layer3.0,
    layer3]]``). ``pool="smaller"`` allows maps of different size by average-pooling the larger to
    the smaller (the CRD benchmark's convention across consecutive stages), for networks without
    two maps of one resolution (MNIST-1D's ConvNet1D halves the length at every layer).

    The student's FSP matrix must have the teacher's size, so each tapped student layer needs the
    channel count of its teacher layer (Yim et al. pair ResNets with equal stage widths; on CIFAR
    ResNets the stage outputs ``relu`` (stem), ``layer1``, ``layer2``, ``layer3``).

    Logged terms (weighted): ``loss``, ``loss_fsp`` (stage 1 / single stage), ``loss_ce`` (and ``loss_kd``)
    in stage 2, and ``stage``.

    Args:
        student_pairs: pairs of student module paths ``[[a, b], ...]`` (e.g. consecutive stage
            outputs ``[[relu1, relu2], [relu2, relu3]]``).
        teacher_pairs: the matching teacher pairs; default: the same paths as ``student_pairs``.
        layer_weights: :math:`\lambda_i` per pair; default equal weights (1 each), as in the paper.
        stage1_epochs: length of the FSP stage: epochs (int) or a fraction of ``max_epochs``
            (float in [0, 1)); 0 = single stage (default 0.2).
        pool: ``None`` (default, the paper: same-size maps only) or ``"smaller"``.
        **kwargs: ``ce_weight`` (1), ``kd_weight`` (0), ``temperature``, ``transfer_weight`` (1),
            ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_pairs: list[list[str]], teacher_pairs: list[list[str]] | None = None,
                 layer_weights: list[float] | None = None, stage1_epochs: int | float = 0.2,
                 pool: str | None = None, **kwargs) -> None:
        if pool not in (None, "smaller"):
            raise KDConfigError(f"FSP: pool must be null (the paper: pairs of maps of the same "
                                f"size) or 'smaller' (pool the larger map), got {pool!r}.")
        student_pairs = [list(p) for p in student_pairs]
        teacher_pairs = student_pairs if teacher_pairs is None else [list(p) for p in teacher_pairs]
        bad = [p for p in student_pairs + teacher_pairs if len(p) != 2]
        if not student_pairs or bad or len(teacher_pairs) != len(student_pairs):
            raise KDConfigError(
                f"FSP needs pairs of module paths, one teacher pair per student pair, e.g. "
                f"student_pairs: [[relu1, relu2], [relu2, relu3]]; got student_pairs={student_pairs}, "
                f"teacher_pairs={teacher_pairs}.")
        if layer_weights is not None and (len(layer_weights) != len(student_pairs)
                                          or any(v < 0 for v in layer_weights)):
            raise KDConfigError(f"layer_weights must give one weight >= 0 per FSP pair "
                                f"({len(student_pairs)}), got {layer_weights}; leave it unset for "
                                f"equal weights.")
        super().__init__(stage1_epochs=stage1_epochs, **kwargs)
        self.pool = pool
        self.student_pairs, self.teacher_pairs = student_pairs, teacher_pairs
        self.layer_weights = list(layer_weights) if layer_weights is not None else [1.0] * len(student_pairs)
        s_layers = _unique([p for pair in student_pairs for p in pair])
        t_layers = _unique([p for pair in teacher_pairs for p in pair])
        # positions of each pair's layers in the tapped-feature lists
        self._s_idx = [(s_layers.index(a), s_layers.index(b)) for a, b in student_pairs]
        self._t_idx = [(t_layers.index(a), t_layers.index(b)) for a, b in teacher_pairs]
        self.init_features(s_layers, t_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        for k, (sp, tp, si, ti) in enumerate(zip(self.student_pairs, self.teacher_pairs,
                                                 self._s_idx, self._t_idx)):
            s_shapes = [student_shapes[i] for i in si]
            t_shapes = [teacher_shapes[i] for i in ti]
            desc = (f"student layers '{sp[0]}' {describe(s_shapes[0])} and '{sp[1]}' "
                    f"{describe(s_shapes[1])}, teacher layers '{tp[0]}' {describe(t_shapes[0])} and "
                    f"'{tp[1]}' {describe(t_shapes[1])}")
            if not all(is_map(s) for s in s_shapes + t_shapes):
                raise KDConfigError(
                    f"FSP pair {k} ({desc}): FSP matrices need feature maps [B, C, L] or "
                    f"[B, C, H, W] in both networks. Tap convolutional layers or blocks (e.g. "
                    f"relu1/relu2/relu3 of ConvNet1D, relu/layer1/layer2/layer3 of a CIFAR ResNet), "
                    f"not flattened or linear layers.")
            if self.pool is None and any(a[1:] != b[1:] for a, b in (s_shapes, t_shapes)):
                raise KDConfigError(
                    f"FSP pair {k} ({desc}): Yim et al.'s FSP matrix relates two maps of the same "
                    f"spatial size. Pair the first and last map of one stage (e.g. [[relu, layer1], "
                    f"[layer2.0, layer2], [layer3.0, layer3]] on CIFAR ResNets), or set "
                    f"model.init_args.pool: smaller to average-pool the larger map.")
            dims = {len(s) for s in s_shapes + t_shapes}
            if len(dims) != 1:
                raise KDConfigError(f"FSP pair {k} ({desc}): all four maps must be 1D or all 2D.")
            g_s = (s_shapes[0][0], s_shapes[1][0])
            g_t = (t_shapes[0][0], t_shapes[1][0])
            if g_s != g_t:
                raise KDConfigError(
                    f"FSP pair {k} ({desc}): the student's FSP matrix is {g_s[0]}x{g_s[1]} but the "
                    f"teacher's is {g_t[0]}x{g_t[1]}; FSP compares them entry by entry, so each "
                    f"student layer needs its teacher layer's channel count. Pair layers with equal "
                    f"channels (e.g. the same stage of two CIFAR ResNets of the same width), or use "
                    f"a student of the teacher's width (e.g. ConvNet1D width=64 groups=4 for the "
                    f"width-64 MNIST-1D teacher).")

    def transfer_loss(self, feats, t_feats):
        g_s = [fsp_matrix(feats[a], feats[b], self.pool) for a, b in self._s_idx]
        g_t = [fsp_matrix(t_feats[a], t_feats[b], self.pool) for a, b in self._t_idx]
        return "loss_fsp", fsp_loss(g_s, g_t, self.layer_weights)

    def inspection_figures(self, batch):
        """The FSP matrices of every pair, teacher vs student, averaged over the shown examples."""
        from kd_lightning.training.figures import matrix_pairs_figure

        x = batch[0]
        _, feats = self.student_forward(x)
        _, t_feats = self.teacher_forward(x)
        g_s = [fsp_matrix(feats[a], feats[b], self.pool).mean(0) for a, b in self._s_idx]
        g_t = [fsp_matrix(t_feats[a], t_feats[b], self.pool).mean(0) for a, b in self._t_idx]
        names = [f"{sp[0]} x {sp[1]}" + ("" if sp == tp else f" (teacher {tp[0]} x {tp[1]})")
                 for sp, tp in zip(self.student_pairs, self.teacher_pairs)]
        return {"fsp_matrices": matrix_pairs_figure(g_t, g_s, names)}
