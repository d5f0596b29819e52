r"""Demonstration knowledge for MNIST-1D: matching the ten digit templates the data are made from.

MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024) draws every
example from one of ten 12-knot templates (``mnist1d.data.get_templates()``) with the
transformations of ``mnist1d.transform.transform``: pad with ``p`` zeros (``p`` uniform in
36..60), dilate (linear interpolation) to 72 samples, scale by 1 +- 0.2, translate by 0..47
samples, replace the padding by correlated noise and add i.i.d. noise, subtract a random linear
trend (shear), and interpolate down to 40 samples. The data set is then normalised globally.

Knowing this generator is real prior knowledge, and it gives a rule without any training: slide
each template, at each dilation, over the signal and measure how well it fits.

The fit is a *detrended normalised cross-correlation* over the template's window. For every
placement ``n`` (a padding ``p`` and a translation ``k`` of the generator, pushed through the same
dilation and down-sampling, so the template lands where the generator would put it) let ``w_n`` be
the 40-sample window the template covers, ``P_n`` the projection that removes a constant and a
linear trend inside it (a window-wise least-squares fit of ``a + b t``; it cancels the shear, the
global normalisation and any offset) and ``g_{c,n}`` the placed template of class ``c``. Then

.. math::
    s_c(x) = \max_n \frac{\langle P_n x, P_n g_{c,n} \rangle}{\|P_n x\| \, \|P_n g_{c,n}\|}
    \in [-1, 1], \qquad
    r(x, c) = \mathrm{softmax}_c\big(\beta\, s_c(x)\big) \in [0, 1]

(scale-invariant, so the random amplitude does not matter either). ``beta`` is the sharpness.
Measured on the generated MNIST-1D data (``make_dataset(get_dataset_args())``), ``argmax_c s_c``
alone is 82.1% accurate on the 1,000 test examples and 83.8% on the 4,000 training examples with
the default grid (all 25 paddings x 48 translations; every 2nd padding: 80.9%, every 3rd: 76.3%).
For comparison, the reference MLP reaches about 68% and the reference CNN 94% (Greydanus & Kobak).
The permuted (wrong) rule below is 2.9% accurate on the test split.

Three variants:

* :class:`MNIST1DTemplateRule` -- fixed knowledge (no parameters; ACL 2016 setting).
* :class:`MNIST1DLearnableTemplateRule` -- the ten templates (10 x 12 knots) and the sharpness
  ``beta`` are ``phi``, initialised from the package's templates or at random.
* :class:`MNIST1DPermutedTemplateRule` -- deliberately wrong knowledge: class ``c`` is scored with
  the template of class ``permutation[c]`` (default ``c + 1``), so the rule is confidently wrong
  where the fixed rule is right and the learned rule weight ``lambda`` should shrink.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.rules.base import Rule

__all__ = ["MNIST1DTemplateRule", "MNIST1DLearnableTemplateRule", "MNIST1DPermutedTemplateRule",
           "mnist1d_templates", "template_placements"]


def mnist1d_templates() -> Tensor:
    """The ten 12-knot digit templates of the ``mnist1d`` package, ``[10, 12]`` float32."""
    from mnist1d.data import get_templates

    return torch.as_tensor(np.asarray(get_templates()["x"]), dtype=torch.float32)


def _interp_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]`` linear interpolation from ``linspace(0, 1, n_in)`` onto
    ``linspace(0, 1, n_out)`` (what ``mnist1d.transform.interpolate`` computes)."""
    pos = torch.linspace(0, 1, n_out, dtype=torch.float64) * (n_in - 1)
    lo = pos.floor().long().clamp(max=n_in - 2)
    w = pos - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m[rows, lo] += 1 - w
    m[rows, lo + 1] += w
    return m


def template_placements(dilation_step: int = 1, shift_step: int = 1) -> tuple[Tensor, Tensor]:
    """Where the MNIST-1D generator can put a template, as linear maps of its knots.

    Follows ``mnist1d.transform.transform`` with the package's default arguments: for every
    padding ``p`` in ``padding[0]..padding[1]`` (every ``dilation_step``-th) and translation ``k`` in
    ``0..max_translation-1`` (every ``shift_step``-th), the template padded with ``p`` zeros,
    dilated to ``template_len + padding[1]`` samples, shifted by ``k`` and down-sampled to
    ``final_seq_length``.

    Returns:
        ``(maps, windows)``: ``maps[n]`` is ``[L, template_len]`` (knots -> placed signal) and
        ``windows[n]`` the ``[L]`` 0/1 mask of the samples the template covers (where the generator
        keeps the template rather than noise), both float64, ``L = final_seq_length``.
    """
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    t_len, (p_lo, p_hi) = int(args.template_len), (int(args.padding[0]), int(args.padding[1]))
    dil_len, out_len = t_len + p_hi, int(args.final_seq_length)
    down = _interp_matrix(dil_len, out_len)
    maps, windows = [], []
    grid = torch.arange(dil_len, dtype=torch.float64)
    for p in range(p_lo, p_hi + 1, dilation_step):
        dilate = _interp_matrix(t_len + p, dil_len)[:, :t_len]  # only the knots are non-zero
        # a dilated sample is non-zero (template, not padding) iff it lies before padded index t_len
        keep = (grid < t_len * (dil_len - 1) / (t_len + p - 1)).double()
        for k in range(0, int(args.max_translation), shift_step):
            maps.append(down @ torch.roll(dilate, k, 0))
            windows.append(down @ torch.roll(keep, k, 0))
    maps_t = torch.stack(maps)
    windows_t = (torch.stack(windows) > 1e-9).double()
    return maps_t, windows_t


@functools.lru_cache(maxsize=None)
def _group_count(n: int) -> int:
    """The smallest divisor of ``n`` that is at least about ``sqrt(n) / 3`` (12 for 1,200)."""
    return min(d for d in range(1, n + 1) if n % d == 0 and d * d * 9 >= n)


def _max_and_maximisers(t: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``t.amax(-1)`` (``[B, K]``) and every ``(b, c, n)`` where ``t[b, c, n]`` reaches it (several
    per row only at exact ties), ``[R]`` indices each.

    The last dimension is cut in ``nb`` interleaved groups of ``size`` (``n = i * size + j``):
    the maximum over ``i`` for every ``j`` (a reduction across rows of ``size`` contiguous
    values, which vectorises) gives the row maximum and the columns ``j`` that reach it; only
    those columns' ``nb`` entries are then searched for the maximisers. This costs about one
    pass over ``t`` instead of the three of ``amax``, a comparison with it and ``nonzero``."""
    b, k, n = t.shape
    nb = _group_count(n)
    size = n // nb
    columns = t.reshape(b * k, nb, size)
    column_max = columns.amax(1)  # [B * K, size]
    values = column_max.amax(-1)
    hit_row, hit_column = (column_max == values[:, None]).nonzero(as_tuple=True)
    inside = columns[hit_row, :, hit_column] == values[hit_row, None]  # [hits, nb]
    hit, group = inside.nonzero(as_tuple=True)
    row = hit_row[hit]
    return values.view(b, k), (row // k, row % k, group * size + hit_column[hit])


class _BestPlacements(torch.autograd.Function):
    """``s[b, c] = max_n t[b, c, n]`` given as its value (computed without autograd) and the
    recomputed, differentiable entries ``t`` at its maximisers, with ``torch.amax``'s gradient:
    all of it to a unique maximum, split evenly among tied maxima (``grad / count``).

    ``forward(selected, values, row, count)``: ``selected[i]`` is the entry ``t[b, c, n]`` at a
    maximiser of flat row ``row[i] = b * K + c`` (every tied maximiser of a row appears once),
    ``count[i]`` that row's number of maximisers, ``values`` the ``[B, K]`` maxima (returned as
    they are, so the value is exactly ``amax``'s)."""

    @staticmethod
    def forward(ctx, selected: Tensor, values: Tensor, row: Tensor, count: Tensor) -> Tensor:
        ctx.save_for_backward(row, count)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        row, count = ctx.saved_tensors
        return grad.reshape(-1)[row] / count, None, None, None


class MNIST1DTemplateRule(Rule):
    r"""Fixed template-matching knowledge for MNIST-1D (see the module docstring for the formula).

    ``r(x, c) = softmax_c(beta * s_c(x))`` with ``s_c`` the best detrended normalised
    cross-correlation of template ``c`` over all of the generator's dilations and translations.

    Input: MNIST-1D signals ``[B, 1, 40]`` or ``[B, 40]`` (any affine normalisation). Output:
    ``[B, 10]`` in [0, 1]. Computed in float32 even under mixed precision. Cost: one
    ``[B, 40] x [40, 10 * placements]`` product (12,000 columns with the default grid), without
    autograd; a learnable rule's backward pass goes through the ``B x 10`` best placements only
    (see :meth:`scores`).

    Args:
        sharpness: ``beta``; ``None`` (default) fits it by maximum likelihood of the rule alone
            on the run's labelled training examples (:meth:`fit_to_labelled`), so a run with
            ``M`` labels uses only those. On all 3,600 training examples the fit gives about 200
            (rule-only NLL 0.50 there, 0.59 on the test split): the best correlations of
            competing classes are close, so ``r`` needs a large ``beta`` to be confident.
        templates: ``"mnist1d"`` (the package's templates) or ``"random"`` (Gaussian knots,
            seeded by ``seed``).
        permutation: score class ``c`` with template ``permutation[c]`` (a permutation of
            0..9); ``None`` keeps the identity.
        learnable: make the templates and ``log(beta)`` parameters (``phi``).
        dilation_step: use every n-th padding of the generator (1 = all 25; 2 is about 3x
            cheaper at 81% accuracy).
        shift_step: use every n-th translation (1 = all 48).
        seed: seed of ``templates="random"``.
        name: shown in error messages.
    """

    def __init__(self, sharpness: float | None = None, templates: str = "mnist1d",
                 permutation: list[int] | None = None, learnable: bool = False,
                 dilation_step: int = 1, shift_step: int = 1, seed: int = 0,
                 name: str | None = None) -> None:
        super().__init__(name)
        if sharpness is not None and not sharpness > 0:
            raise KDConfigError(f"{self.rule_name}: sharpness must be > 0 (or null: fitted on the "
                                f"run's labelled examples), got {sharpness}.")
        self.fit_sharpness = sharpness is None
        if templates not in ("mnist1d", "random"):
            raise KDConfigError(f"{self.rule_name}: templates must be 'mnist1d' or 'random', "
                                f"got {templates!r}.")
        if dilation_step < 1 or shift_step < 1:
            raise KDConfigError(f"{self.rule_name}: dilation_step and shift_step must be >= 1, got "
                                f"{dilation_step} and {shift_step}.")
        base = mnist1d_templates()
        if templates == "random":
            gen = torch.Generator().manual_seed(seed)
            base = torch.randn(base.shape, generator=gen) * float(base.std())
        if permutation is not None:
            perm = [int(i) for i in permutation]
            if sorted(perm) != list(range(len(base))):
                raise KDConfigError(f"{self.rule_name}: permutation must be a permutation of "
                                    f"0..{len(base) - 1}, got {permutation}.")
            base = base[perm]
        self.num_classes, self.template_len = base.shape
        log_beta = torch.tensor(float(np.log(sharpness if sharpness is not None else 200.0)))
        if learnable:
            self.templates = nn.Parameter(base.clone())
            self.log_sharpness = nn.Parameter(log_beta)
        else:
            self.register_buffer("templates", base.clone())
            self.register_buffer("log_sharpness", log_beta)
        maps, windows = template_placements(dilation_step, shift_step)
        self.signal_len = maps.shape[1]
        # orthonormal basis of {constant, linear trend} inside each window: P_n = I - e1 e1^T - e2 e2^T
        n = windows.sum(1, keepdim=True)
        t = torch.arange(self.signal_len, dtype=torch.float64)
        e1 = windows / n.sqrt()
        trend = (t - (windows * t).sum(1, keepdim=True) / n) * windows
        e2 = trend / trend.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("maps", maps.float(), persistent=False)  # [N, L, template_len]
        # the detrended maps P_n M_n on each placement's window (W samples from window_index[n];
        # zero outside it): what the best placements' recomputation with autograd needs
        width = int(windows.sum(1).max())
        start = windows.argmax(1).clamp(max=self.signal_len - width)  # windows are contiguous
        index = start[:, None] + torch.arange(width)
        detrended = maps - sum(e[:, :, None] * (e[:, None, :] @ maps) for e in (e1, e2))
        self.register_buffer("window_index", index, persistent=False)  # [N, W]
        self.register_buffer("window_maps", detrended.gather(
            1, index[:, :, None].expand(-1, -1, self.template_len)).float(), persistent=False)
        self.register_buffer("windows", windows.float(), persistent=False)  # [N, L]
        self.register_buffer("trend_basis", torch.stack([e1, e2]).float(), persistent=False)  # [2, N, L]

    @property
    def sharpness(self) -> Tensor:
        return self.log_sharpness.exp()

    def placed_templates(self) -> Tensor:
        """``[K, N, L]``: every template at every placement, detrended in its window and of unit norm."""
        g = torch.einsum("nlt,ct->cnl", self.maps, self.templates.float())
        if torch.is_grad_enabled() and g.requires_grad:
            for e in self.trend_basis:
                g = g - (g * e).sum(-1, keepdim=True) * e
            return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        for e in self.trend_basis:  # the same operations in place (no graph to keep)
            g.sub_((g * e).sum(-1, keepdim=True) * e)
        return g.div_(g.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def window_correlations(self, x: Tensor, norm: Tensor, examples: Tensor, classes: Tensor,
                            placements: Tensor) -> Tensor:
        """The correlations of some ``(example, class, placement)`` triples (``[R]`` indices
        each), ``[R]``: the entries of :meth:`scores`' ``[B, K, N]`` correlations, computed from
        the placements' windows alone (a placed template is zero outside its window), with
        autograd. ``x``: ``[B, L]`` float32; ``norm``: :meth:`example_features` of ``x``."""
        u = torch.bmm(self.window_maps[placements],
                      self.templates.float()[classes].unsqueeze(-1)).squeeze(-1)  # P_n M_n t_c
        g = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        x_window = x[examples.unsqueeze(-1), self.window_index[placements]]  # [R, W]
        return (x_window * g).sum(-1) / norm[examples, placements]

    def example_features(self, x: Tensor) -> Tensor:
        """``||P_n x||``, ``[B, N]``: the norm of the signal in every placement's window after
        detrending, the denominator of the correlation. It depends on ``x`` alone (not on the
        templates or ``beta``), so it can be computed once per training example."""
        b = x.shape[0]
        if x[0].numel() != self.signal_len or (x.dim() == 3 and x.shape[1] != 1) or x.dim() > 3:
            raise KDConfigError(
                f"{self.rule_name} expects MNIST-1D signals of length {self.signal_len} ([batch, 1, "
                f"{self.signal_len}] or [batch, {self.signal_len}]), got input of shape "
                f"{tuple(x.shape)}.")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.reshape(b, -1).float()
            energy = (x * x) @ self.windows.T  # [B, N]
            e1, e2 = self.trend_basis
            resid = energy - (x @ e1.T) ** 2 - (x @ e2.T) ** 2  # ||P_n x||^2
            return resid.clamp_min(1e-6).sqrt()

    def scores(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """``s_c(x)``: ``[B, K]`` best detrended normalised cross-correlation per class, in [-1, 1].
        ``features``: :meth:`example_features` of ``x`` (computed here when ``None``).

        The correlation of every placement is computed without autograd; only each example's
        best placement of each class gets a gradient (the max's gradient), so only those
        ``B x K`` placements (and every tied one, sharing the gradient evenly as ``torch.amax``
        does) are recomputed with autograd: the backward pass touches ``B x K`` placed templates
        instead of ``B x K x N``."""
        norm = self.example_features(x) if features is None else features
        b = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.reshape(b, -1).float()
            need_grad = torch.is_grad_enabled() and (
                self.templates.requires_grad or x.requires_grad or norm.requires_grad)
            with torch.no_grad():
                g = self.placed_templates()  # [K, N, L]
                k, n, length = g.shape
                ratio = (x @ g.reshape(k * n, length).T).view(b, k, n).div_(norm[:, None, :])
                if not need_grad:
                    return ratio.amax(-1)
                # the maximum of every row and its maximisers (b, c, n): several only at exact ties
                values, (hit_b, hit_c, hit_n) = _max_and_maximisers(ratio)
                row = hit_b * k + hit_c
                count = torch.bincount(row, minlength=b * k)[row].to(values.dtype)
            selected = self.window_correlations(x, norm, hit_b, hit_c, hit_n)  # with autograd
            return _BestPlacements.apply(selected, values, row, count)

    def forward(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        s = self.scores(x, features)
        return F.softmax(self.sharpness * s, dim=-1)

    @torch.no_grad()
    def fit_to_labelled(self, x: Tensor, y: Tensor) -> None:
        """With ``sharpness=None``: ``beta`` maximising the likelihood of the labels under
        ``softmax(beta * s(x))``, searched on a log grid from 1 to 10^4 (401 points)."""
        if not self.fit_sharpness or len(y) == 0:
            return
        s = torch.cat([self.scores(x[i:i + 1024]) for i in range(0, len(x), 1024)])
        betas = torch.logspace(0, 4, 401, device=s.device)
        nll = torch.stack([F.cross_entropy(b * s, y) for b in betas])
        self.log_sharpness.copy_(betas[nll.argmin()].log())


class MNIST1DLearnableTemplateRule(MNIST1DTemplateRule):
    """Learnable template knowledge: ``phi`` = the ten templates and ``log(beta)``.

    Same computation as :class:`MNIST1DTemplateRule`; the templates (10 x 12 knots) start from
    the ``mnist1d`` package's (``templates="mnist1d"``) or from seeded noise
    (``templates="random"``) and are learned with Eq. 5 of Hu et al. (EMNLP 2016) by
    :class:`~kd_lightning.methods.MutualDistillation`.
    """

    def __init__(self, sharpness: float | None = None, templates: str = "mnist1d",
                 permutation: list[int] | None = None, dilation_step: int = 1,
                 shift_step: int = 1, seed: int = 0, name: str | None = None) -> None:
        super().__init__(sharpness=sharpness, templates=templates, permutation=permutation,
                         learnable=True, dilation_step=dilation_step, shift_step=shift_step,
                         seed=seed, name=name)


class MNIST1DPermutedTemplateRule(MNIST1DTemplateRule):
    """Deliberately wrong knowledge: the fixed rule with its templates permuted among classes.

    Class ``c`` is scored with template ``permutation[c]``; the default ``c -> c + 1 (mod 10)``
    moves every template, so wherever the correct rule is confident this one is confidently
    wrong (its rule-only accuracy is near zero). Use it to watch ``lambda`` shrink.
    """

    def __init__(self, sharpness: float | None = None, permutation: list[int] | None = None,
                 learnable: bool = False, dilation_step: int = 1, shift_step: int = 1,
                 name: str | None = None) -> None:
        perm = permutation if permutation is not None else [(c + 1) % 10 for c in range(10)]
        super().__init__(sharpness=sharpness, templates="mnist1d", permutation=perm,
                         learnable=learnable, dilation_step=dilation_step, shift_step=shift_step,
                         name=name)
