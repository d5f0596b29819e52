r"""Contrastive representation distillation (CRD): embeddings, memory bank and NCE loss.

Reference:
    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020
    (arXiv:1910.10699).

CRD maximises a lower bound on the mutual information between the student's and the teacher's
penultimate representations with noise-contrastive estimation (NCE): for each example, the pair
(student embedding, teacher embedding of the *same* example) is the positive, and the teacher
embeddings of ``K`` other examples -- kept in a memory bank, not recomputed -- are the
negatives. The contrast is symmetric: the student embedding is contrasted against the teacher
bank, and the teacher embedding against the student bank.

Pieces, and how a method uses them (one training step)::

    v_s, v_t = embed_s(f_s), embed_t(f_t)                          # CRDEmbed, [B, 128] each
    neg = bank.sample_negatives(index, K, generator, targets=y)    # [B, K] dataset indices
    logits_s, logits_t = bank.logits(v_s, v_t, index, neg)         # [B, 1 + K], positive first
    log_z_s, log_z_t = bank.log_normalisers(logits_s, logits_t)    # estimated once, then stored
    loss = crd_loss(logits_s, logits_t, log_z_s, log_z_t, bank.num_candidates)
    bank.update(index, v_s.detach(), v_t.detach())                 # after the loss, as the paper

The CIFAR-100 setting of the paper (and of its reference code): embedding dimension 128,
``K = 16384`` negatives, temperature 0.07, bank momentum 0.5, loss weight ``beta = 0.8`` next to
the cross entropy (CRD alone; CRD+KD adds the KD term with weight 1). The reference code draws
each example's negatives among the training examples *of other classes*, without replacement
(pass ``targets`` and register the labels with :meth:`CRDMemoryBank.set_negative_pool`); without
``targets`` the negatives are drawn uniformly among all other examples, the paper's description.

**Sharing the bank under DDP.** Every rank holds the whole bank, and the ranks keep their banks
identical by applying the same updates, so the bank is never communicated:

1. each rank embeds its own batch; the method all-gathers (in rank order) the batch indices, the
   labels, and the *detached* embeddings ``v_s``, ``v_t`` of every rank (Lightning:
   ``self.all_gather``, then flatten the leading world dimension);
2. negatives come from a ``torch.Generator`` created on the bank's device and seeded with the
   same seed on every rank; every rank draws the negatives for the *gathered* batch and keeps the
   rows of its own examples (``neg_all[rank * B:(rank + 1) * B]``), so the generators stay in
   lockstep and each example's negatives do not depend on the rank it landed on. (Negatives need
   not be identical across ranks for the loss to be right; drawing only the local rows from a
   generator seeded per rank is also valid and cheaper, but the draws then depend on the world
   size.)
3. the loss is computed on the local rows only (its gradient reaches the local embeddings; DDP
   averages the gradients);
4. the normalising constants are estimated on the first step from the mean of
   :math:`e^{\mathrm{logit}}`, averaged across ranks by the ``reduce`` callable given to
   :meth:`CRDMemoryBank.log_normalisers` (e.g.
   ``lambda x: self.trainer.strategy.reduce(x, reduce_op="mean")``), so every rank stores the same
   constants;
5. every rank calls :meth:`CRDMemoryBank.update` with the *gathered* indices and embeddings.

The bank's tensors are persistent buffers (``memory_s``, ``memory_t``, ``log_z``), so they are
in ``state_dict()`` and in Lightning checkpoints, and a resumed run continues with the same bank
and constants. Since the ranks keep the bank identical, DDP's per-step buffer broadcast from rank
0 (``broadcast_buffers=True``, the default) only costs bandwidth (``2 N D`` floats per step);
``DDPStrategy(broadcast_buffers=False)`` avoids it. The negative pool (:meth:`set_negative_pool`)
is derived from the data, so it is not saved: set it again in ``setup``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError

__all__ = ["CRDEmbed", "CRDMemoryBank", "crd_nce_loss", "crd_loss"]


class CRDEmbed(nn.Module):
    r"""CRD embedding head: a linear map to ``dim`` followed by L2 normalisation.

    .. math:: v = \frac{W f + b}{\|W f + b\|_2}

    on the flattened feature ``f`` (the penultimate, pooled feature in the paper). One head for
    the student, one for the teacher; both are trained (the teacher's feature itself is a
    constant). The output is float32.

    Args:
        in_features: flattened feature size.
        dim: embedding dimension (128 in the paper).
    """

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        if int(in_features) < 1 or int(dim) < 1:
            raise KDConfigError(f"CRDEmbed: in_features and dim must be positive integers, got "
                                f"{in_features} and {dim}.")
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.linear.in_features:
            raise KDConfigError(f"CRDEmbed expects {self.linear.in_features} features per example, "
                                f"got shape {tuple(x.shape)} after flattening; build it with "
                                f"in_features equal to the tapped layer's size.")
        return F.normalize(self.linear(x).float(), p=2, dim=1)


def _below(high: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Integers uniform in ``[0, high)`` (``high`` broadcast against ``shape``), from 62 random
    bits each: the modulo's bias is below ``high / 2**62``."""
    bits = torch.randint(0, 2 ** 62, shape, generator=generator, device=high.device)
    return bits % high


class CRDMemoryBank(nn.Module):
    r"""CRD memory bank: one L2-normalised embedding per training example and per side.

    ``memory_s[i]`` holds a running average of the student embeddings of example ``i``,
    ``memory_t[i]`` that of the teacher embeddings. After each step (:meth:`update`):

    .. math:: m_i \leftarrow \frac{\mu\, m_i + (1 - \mu)\, v_i}{\|\mu\, m_i + (1 - \mu)\, v_i\|_2}

    for the examples ``i`` of the batch, with momentum :math:`\mu` (0.5 in the paper). The
    initial rows are drawn uniformly from :math:`[-a, a]` with :math:`a = \sqrt{3 / D}` (so each
    row has expected squared norm 1), as in the reference code; they are not normalised until
    first updated.

    Args:
        num_data: ``N``, the size of the index space of the batches' ``index`` (the length of the
            training source; indices are positions in it).
        dim: ``D``, the embedding dimension (128).
        temperature: :math:`\tau` of the scores :math:`v^\top m / \tau` (0.07).
        momentum: :math:`\mu \in [0, 1)` (0.5).
        generator: optional generator for the initial rows (reproducible banks).

    Buffers (persistent, so checkpointed): ``memory_s`` ``[N, D]``, ``memory_t`` ``[N, D]``,
    ``log_z`` ``[2]`` (:math:`\log Z_s, \log Z_t`, NaN until estimated).
    """

    def __init__(self, num_data: int, dim: int = 128, temperature: float = 0.07,
                 momentum: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if int(num_data) < 2:
            raise KDConfigError(f"CRDMemoryBank: num_data must be at least 2 (one positive and one "
                                f"negative), got {num_data}.")
        if int(dim) < 1:
            raise KDConfigError(f"CRDMemoryBank: dim must be a positive integer, got {dim}.")
        if not temperature > 0:
            raise KDConfigError(f"CRDMemoryBank: temperature must be > 0 (the paper uses 0.07), "
                                f"got {temperature}.")
        if not 0.0 <= momentum < 1.0:
            raise KDConfigError(f"CRDMemoryBank: momentum must be in [0, 1) (the paper uses 0.5), "
                                f"got {momentum}.")
        self.num_data, self.dim = int(num_data), int(dim)
        self.temperature, self.momentum = float(temperature), float(momentum)
        bound = math.sqrt(3.0 / self.dim)
        for name in ("memory_s", "memory_t"):
            init = torch.rand(self.num_data, self.dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, init)
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self.register_buffer("pool", None, persistent=False)
        self.register_buffer("pool_labels", None, persistent=False)

    # ---- negative pool and sampling ------------------------------------------------------------
    @property
    def num_candidates(self) -> int:
        """The number of examples negatives are drawn from (the noise distribution's support)."""
        return self.num_data if self.pool is None else int(self.pool.numel())

    def set_negative_pool(self, indices: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Restrict the negatives to ``indices`` (dataset positions), optionally with their labels.

        With few-data training subsets the batch indices are positions in the whole training
        source, but only the subset's rows of the bank are ever updated: pass the subset's
        indices so that negatives are drawn from it. ``labels`` (one per pool entry, or one per
        dataset row when ``indices`` is ``None``) enable class-aware negatives
        (:meth:`sample_negatives` with ``targets``). ``indices=None, labels=None`` restores the
        default pool (every row, no labels). Not saved in the state dict.
        """
        device = self.memory_s.device
        if indices is None:
            pool = None if labels is None else torch.arange(self.num_data, device=device)
        else:
            pool = torch.as_tensor(indices, device=device).long().flatten()
            if pool.numel() < 2:
                raise KDConfigError(f"set_negative_pool: the pool needs at least 2 examples, got "
                                    f"{pool.numel()}.")
            if pool.min() < 0 or pool.max() >= self.num_data:
                raise KDConfigError(f"set_negative_pool: indices must lie in [0, {self.num_data}) "
                                    f"(the bank's num_data), got range [{int(pool.min())}, "
                                    f"{int(pool.max())}].")
            if torch.unique(pool).numel() != pool.numel():
                raise KDConfigError("set_negative_pool: indices contain duplicates; pass each "
                                    "training example once.")
        if labels is not None:
            labels = torch.as_tensor(labels, device=device).long().flatten()
            expected = self.num_data if pool is None else pool.numel()
            if labels.numel() != expected:
                raise KDConfigError(f"set_negative_pool: {labels.numel()} labels for a pool of "
                                    f"{expected} examples; give one label per pool entry.")
        self.pool, self.pool_labels = pool, labels

    def _sampling_tables(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """The pool sorted by label (unlabelled first, then each class as one contiguous run,
        each in dataset order), its sorted labels (``None`` without labels), and each dataset
        row's position in it (-1 outside the pool). Cached until the pool or the device changes."""
        device = self.memory_s.device
        cache = getattr(self, "_tables", None)
        if cache is not None and cache[0] is self.pool and cache[1] is self.pool_labels \
                and cache[2].device == device:
            return cache[2], cache[3], cache[4]
        order = self.pool if self.pool is not None else torch.arange(self.num_data, device=device)
        sorted_labels = None
        if self.pool_labels is not None:
            sorted_labels, perm = torch.sort(self.pool_labels, stable=True)
            order = order[perm]
        position = torch.full((self.num_data,), -1, dtype=torch.long, device=device)
        position[order] = torch.arange(order.numel(), device=device)
        self._tables = (self.pool, self.pool_labels, order, sorted_labels, position)
        return order, sorted_labels, position

    def sample_negatives(self, indices: Tensor, num_negatives: int, generator: torch.Generator,
                         targets: Tensor | None = None) -> Tensor:
        r"""Draw ``num_negatives`` negative dataset indices for each anchor, ``[B, K]`` long.

        Negatives are drawn from the pool (:meth:`set_negative_pool`; default all ``N`` rows),
        never the anchor's own index and, when ``targets`` (the anchors' labels) are given,
        never an example of the anchor's class (the reference code's CIFAR-100 setting; needs
        pool labels). Each anchor's negatives are a uniformly random set of distinct candidates
        (drawn without replacement), unless ``K`` exceeds the smallest number of candidates of
        an anchor, in which case every anchor's are drawn uniformly with replacement (the
        reference code does the same per example). Anchors draw independently of each other.

        Unlabelled examples (label ``-1``, in ``targets`` or in the pool labels) have no known
        class: an unlabelled anchor gets uniform negatives (any pool example but itself), and an
        unlabelled pool example is a candidate negative for every anchor.

        How: the pool is kept sorted by label, so an anchor's candidates are the pool minus at
        most two runs of it (its class, and its own position); each anchor draws ``K`` ranks in
        ``[0, candidates)`` and a rank maps to a pool position by skipping those runs. Without
        replacement, ranks that repeat one drawn before are drawn again until all are distinct
        (every set of ``K`` candidates is then equally likely, since the procedure treats all
        candidates alike); when ``K`` is more than half the candidates of some anchor, the ``K``
        smallest of uniform random keys are taken instead. Time :math:`O(B K \log K)` per round
        (:math:`O(B \cdot \text{pool})` in the second case); one host-device synchronisation per
        round on a GPU.

        All randomness comes from ``generator`` (on the bank's device), so ranks seeded alike
        draw alike (see the module docstring).
        """
        k = int(num_negatives)
        if k < 1:
            raise KDConfigError(f"sample_negatives: num_negatives must be >= 1 (the paper uses "
                                f"16384 on CIFAR-100), got {num_negatives}.")
        device = self.memory_s.device
        if torch.device(generator.device).type != device.type:
            raise KDConfigError(f"sample_negatives: the generator is on {generator.device} but the "
                                f"bank is on {device}; create it with "
                                f"torch.Generator(device=bank.memory_s.device).")
        idx = self._check_indices(indices, "sample_negatives")
        order, sorted_labels, position = self._sampling_tables()
        size = order.numel()
        anchor = position[idx]  # the anchor's pool position, -1 outside the pool
        start = end = torch.zeros_like(idx)  # the run of the anchor's class (empty: none)
        if targets is not None:
            if self.pool_labels is None:
                raise KDConfigError("sample_negatives: targets were given for class-aware "
                                    "negatives, but the bank has no labels; call "
                                    "bank.set_negative_pool(indices, labels) first (or pass "
                                    "targets=None for uniform negatives).")
            y = torch.as_tensor(targets, device=device).long().flatten()
            if y.shape != idx.shape:
                raise KDConfigError(f"sample_negatives: {y.numel()} targets for {idx.numel()} "
                                    f"indices.")
            labelled = y >= 0  # -1 (unlabelled) excludes no class
            start = torch.where(labelled, torch.searchsorted(sorted_labels, y), 0)
            end = torch.where(labelled, torch.searchsorted(sorted_labels, y, right=True), 0)
        own = (anchor >= 0) & ((anchor < start) | (anchor >= end))  # the anchor outside its run
        available = size - (end - start) - own.long()
        fewest = int(available.min())
        if fewest == 0:
            raise KDConfigError("sample_negatives: some anchor has no candidate negative (every "
                                "pool example is the anchor itself or of its class); widen the "
                                "pool or drop targets.")
        high = available.unsqueeze(1)
        if k > fewest:
            ranks = _below(high, (idx.numel(), k), generator)
        elif 2 * k <= fewest:
            ranks = _below(high, (idx.numel(), k), generator)
            while True:
                ranks = ranks.sort(dim=1).values
                repeat = ranks[:, 1:] == ranks[:, :-1]
                if not bool(repeat.any()):
                    break
                ranks[:, 1:] = torch.where(repeat, _below(high, repeat.shape, generator), ranks[:, 1:])
        else:
            keys = torch.rand(idx.numel(), int(available.max()), generator=generator, device=device)
            keys.masked_fill_(torch.arange(keys.shape[1], device=device) >= high, 2.0)
            ranks = keys.topk(k, dim=1, largest=False).indices
        # skip the two excluded runs of pool positions, the earlier one first: the class
        # [start, end) and the anchor [anchor, anchor + 1) (length 0 where not excluded)
        run, own_len = (end - start).unsqueeze(1), own.long().unsqueeze(1)
        start, anchor = start.unsqueeze(1), anchor.unsqueeze(1)
        anchor_first = (own.unsqueeze(1)) & (anchor < start)
        s1, n1 = torch.where(anchor_first, anchor, start), torch.where(anchor_first, own_len, run)
        s2, n2 = torch.where(anchor_first, start, anchor), torch.where(anchor_first, run, own_len)
        pos = ranks + n1 * (ranks >= s1)
        pos = pos + n2 * (pos >= s2)
        return order[pos]

    # ---- scores, normalisation, update -----------------------------------------------------
    def _check_indices(self, indices: Tensor, who: str) -> Tensor:
        idx = torch.as_tensor(indices, device=self.memory_s.device).long()
        if idx.dim() != 1:
            raise KDConfigError(f"{who}: indices must be a 1-D tensor of dataset positions, got "
                                f"shape {tuple(idx.shape)}.")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_data):
            raise KDConfigError(f"{who}: indices must lie in [0, {self.num_data}) (the bank's "
                                f"num_data), got range [{int(idx.min())}, {int(idx.max())}]; build "
                                f"the bank with num_data = the length of the training source.")
        return idx

    def _check_embeddings(self, v: Tensor, batch: int, who: str, name: str) -> None:
        if v.dim() != 2 or v.shape != (batch, self.dim):
            raise KDConfigError(f"{who}: {name} must be [B={batch}, D={self.dim}] (CRDEmbed "
                                f"outputs), got {tuple(v.shape)}.")

    @staticmethod
    def _scores(v: Tensor, memory: Tensor, contrast: Tensor, pool: Tensor | None,
                slot: Tensor | None) -> Tensor:
        """``v[b] . memory[contrast[b, j]]`` for every ``b, j``, computed in float32: as one
        product with the rows the contrast can use (the pool's, ``slot`` = each contrast entry's
        position among them, when every entry is in the pool) where that product is no larger
        than the gathered rows, else from the gathered rows (``[B, K, D]``)."""
        rows = memory if pool is None else memory[pool]
        if rows.shape[0] <= contrast.shape[1] * memory.shape[1]:
            return (v @ rows.t()).gather(1, contrast if pool is None else slot)
        return torch.bmm(memory[contrast], v.unsqueeze(2)).squeeze(2)

    def logits(self, v_s: Tensor, v_t: Tensor, indices: Tensor,
               negatives: Tensor) -> tuple[Tensor, Tensor]:
        r"""Scores of the anchors against the other side's bank, ``[B, 1 + K]`` each.

        .. math:: \ell^s_{b,j} = \frac{v^s_b \cdot m^t_{c_{b,j}}}{\tau}, \qquad
                  \ell^t_{b,j} = \frac{v^t_b \cdot m^s_{c_{b,j}}}{\tau}

        with :math:`c_{b,0}` the anchor's own index (the positive) and :math:`c_{b,1..K}` its
        negatives. Gradients reach ``v_s`` and ``v_t``; the bank is a constant.

        Args:
            v_s, v_t: ``[B, D]`` student and teacher embeddings (:class:`CRDEmbed`).
            indices: ``[B]`` dataset indices of the batch.
            negatives: ``[B, K]`` (:meth:`sample_negatives`).
        """
        idx = self._check_indices(indices, "CRDMemoryBank.logits")
        b = idx.numel()
        self._check_embeddings(v_s, b, "CRDMemoryBank.logits", "v_s")
        self._check_embeddings(v_t, b, "CRDMemoryBank.logits", "v_t")
        neg = torch.as_tensor(negatives, device=idx.device).long()
        if neg.dim() != 2 or neg.shape[0] != b or neg.shape[1] < 1:
            raise KDConfigError(f"CRDMemoryBank.logits: negatives must be [B={b}, K>=1], got "
                                f"{tuple(neg.shape)}.")
        contrast = torch.cat([idx.unsqueeze(1), neg], dim=1)
        # a few-data pool: scores against its rows only (the negatives are drawn from it; the
        # anchors are in it unless the pool was set to other examples than the training set's)
        pool = slot = None
        if self.pool is not None and self.pool.numel() < self.num_data:
            order, _, position = self._sampling_tables()
            slot = position[contrast]
            pool = order if bool((slot[:, 0] >= 0).all()) else None
        with torch.autocast(device_type=idx.device.type, enabled=False):
            logits_s = self._scores(v_s.float(), self.memory_t, contrast, pool, slot) / self.temperature
            logits_t = self._scores(v_t.float(), self.memory_s, contrast, pool, slot) / self.temperature
        return logits_s, logits_t

    def log_normalisers(self, logits_s: Tensor, logits_t: Tensor,
                        reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        r"""The NCE normalising constants :math:`\log Z_s, \log Z_t`, estimated once.

        .. math:: Z = N_c \cdot \mathrm{mean}_{b,j}\, e^{\ell_{b,j}}

        over the scores of the first batch (positives and negatives), with :math:`N_c` the number
        of candidates (:attr:`num_candidates`), as in the reference code: a Monte-Carlo estimate
        of the partition function :math:`\sum_i e^{v \cdot m_i / \tau}` that is then kept fixed.
        The first call computes and stores them (``log_z`` buffer); later calls return the
        stored values. ``reduce`` maps the ``[2]`` float32 tensor of means to its mean over DDP
        ranks (identity by default). Computed in float32 through ``logsumexp`` (a score is at most
        :math:`\|m\| / \tau` with :math:`\|m\| \le \sqrt 3`, so the means stay far inside
        float32's range). Returned as detached float32 scalars.
        """
        if bool(torch.isnan(self.log_z).any()):
            with torch.no_grad():
                means = []
                for lg in (logits_s, logits_t):
                    flat = lg.detach().float().flatten()
                    means.append(torch.exp(torch.logsumexp(flat, 0) - math.log(flat.numel())))
                mean_exp = torch.stack(means)
                if reduce is not None:
                    mean_exp = reduce(mean_exp).float()
                log_z = torch.log(mean_exp) + math.log(self.num_candidates)
                self.log_z.copy_(log_z.to(self.log_z.dtype))
        return self.log_z[0].detach().clone(), self.log_z[1].detach().clone()

    @torch.no_grad()
    def update(self, indices: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        r"""Momentum update of the rows ``indices`` with the (already gathered) embeddings.

        :math:`m_i \leftarrow \mathrm{normalize}(\mu m_i + (1 - \mu) v_i)` on both banks. Under
        DDP pass the indices and detached embeddings of *every* rank, in the same order on every
        rank (module docstring). If an index occurs more than once (``DistributedSampler`` pads
        with repeated examples), its first occurrence is used, so the result does not depend on
        the scatter order.
        """
        idx = self._check_indices(indices, "CRDMemoryBank.update")
        b = idx.numel()
        self._check_embeddings(v_s, b, "CRDMemoryBank.update", "v_s")
        self._check_embeddings(v_t, b, "CRDMemoryBank.update", "v_t")
        uniq, inverse = torch.unique(idx, return_inverse=True)
        first = torch.full((uniq.numel(),), b, dtype=torch.long, device=idx.device)
        first.scatter_reduce_(0, inverse, torch.arange(b, device=idx.device), reduce="amin")
        mu = self.momentum
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = memory[uniq] * mu + v.detach().to(memory)[first] * (1.0 - mu)
            memory.index_copy_(0, uniq, F.normalize(rows, p=2, dim=1))


def crd_nce_loss(logits: Tensor, log_z: Tensor | float, num_candidates: int) -> Tensor:
    r"""One side of the CRD objective: the NCE loss of Tian et al. (ICLR 2020, Eq. 18).

    With :math:`P_j = e^{\ell_j} / Z` the (unnormalised-model) probability of contrast ``j``,
    :math:`K` negatives and the uniform noise :math:`P_n = 1 / N_c`,

    .. math:: h_j = \frac{P_j}{P_j + K P_n}, \qquad
              L = -\frac{1}{B} \sum_b \Big( \log h_{b,0} + \sum_{j=1}^{K} \log (1 - h_{b,j}) \Big)

    i.e. the positive (column 0) should be classified as data, the ``K`` negatives as noise;
    summed over the negatives, averaged over the anchors. Computed in log space
    (:math:`\log h = \log P - \mathrm{logaddexp}(\log P, \log K P_n)`), which drops the reference
    code's ``1e-7`` in the denominators (negligible against :math:`K P_n \ge 1/N_c`).

    Args:
        logits: ``[B, 1 + K]`` scores (:meth:`CRDMemoryBank.logits`), positive first.
        log_z: :math:`\log Z` (:meth:`CRDMemoryBank.log_normalisers`), a constant.
        num_candidates: :math:`N_c` (:attr:`CRDMemoryBank.num_candidates`).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise KDConfigError(f"crd_nce_loss: logits must be [B, 1 + K] with K >= 1 (positive "
                            f"first), got {tuple(logits.shape)}.")
    if int(num_candidates) < 1:
        raise KDConfigError(f"crd_nce_loss: num_candidates must be >= 1, got {num_candidates}.")
    k = logits.shape[1] - 1
    log_p = logits.float() - torch.as_tensor(log_z, dtype=torch.float32,
                                             device=logits.device).detach()
    log_kpn = math.log(k / int(num_candidates))
    denom = torch.logaddexp(log_p, torch.full_like(log_p, log_kpn))
    log_h_pos = log_p[:, 0] - denom[:, 0]
    log_noise_neg = log_kpn - denom[:, 1:]
    return -(log_h_pos.sum() + log_noise_neg.sum()) / logits.shape[0]


def crd_loss(logits_s: Tensor, logits_t: Tensor, log_z_s: Tensor | float, log_z_t: Tensor | float,
             num_candidates: int) -> Tensor:
    r"""The symmetric CRD loss: :math:`L_{CRD} = L_{NCE}(\ell^s, Z_s) + L_{NCE}(\ell^t, Z_t)`.

    The student anchor against the teacher bank plus the teacher anchor against the student bank
    (:func:`crd_nce_loss` each), as in the reference code; multiplied by ``beta = 0.8`` on
    CIFAR-100 by the caller.
    """
    return (crd_nce_loss(logits_s, log_z_s, num_candidates)
            + crd_nce_loss(logits_t, log_z_t, num_candidates))
