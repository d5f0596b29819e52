"""Stratified few-data subsets (a total or a number per class), unlabelled transfer subsets and
seeded validation splits.

All are pure functions of their arguments (no global RNG), so every DDP rank, every rerun and
every machine draws the same indices for the same ``(labels, m, seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kd_lightning import KDConfigError


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def stratified_subset(labels: Sequence[int] | np.ndarray, m: int, seed: int = 0,
                      num_classes: int | None = None,
                      class_names: Sequence[str] | None = None) -> np.ndarray:
    """Return ``m`` positions into ``labels``, stratified per class, as a sorted int64 array.

    Each class gets ``m // K`` examples (``K`` = number of classes); the ``m % K`` left over go
    one each to classes picked at random (seeded). Within a class the examples are a seeded
    random choice without replacement. The result depends only on ``(labels, m, seed)``.

    Raises :class:`KDConfigError` if ``m`` is smaller than the number of classes, larger than the
    number of labels, or asks a class for more examples than it has (naming the class, by
    ``class_names`` when given, and its count).
    """
    y = _as_labels(labels)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    m = int(m)
    if m < k:
        raise KDConfigError(
            f"train_subset={m} is smaller than the number of classes ({k}): a stratified subset "
            f"needs at least one example per class. Use train_subset >= {k}, or null for the full set.")
    if m > len(y):
        raise KDConfigError(
            f"train_subset={m} is larger than the training set ({len(y)} examples after the "
            f"validation split). Use train_subset <= {len(y)}, or null for the full set.")
    rng = np.random.Generator(np.random.PCG64(seed))
    per_class = np.full(k, m // k, dtype=np.int64)
    extra = rng.permutation(k)[: m % k]
    per_class[extra] += 1
    counts = np.bincount(y, minlength=k)
    short = np.nonzero(per_class > counts)[0]
    if len(short):
        c = int(short[0])
        name = f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else ""
        fix = (f"Use a smaller train_subset (at most {int(counts.min()) * k} keeps every class "
               f"feasible) or a smaller val_split." if counts.min() > 0 else
               f"A stratified subset needs every class: give class {c} training examples, or "
               f"relabel the data without it.")
        raise KDConfigError(
            f"train_subset={m} asks for {per_class[c]} examples of class {c}{name}, but the "
            f"training set (after the validation split) has only {counts[c]}. {fix}")
    chosen = []
    for c in range(k):
        pos = np.nonzero(y == c)[0]
        chosen.append(rng.choice(pos, size=per_class[c], replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_subset_per_class(labels: Sequence[int] | np.ndarray, per_class: int, seed: int = 0,
                                num_classes: int | None = None,
                                class_names: Sequence[str] | None = None) -> np.ndarray:
    """Return ``per_class`` positions of every class of ``labels``, as a sorted int64 array.

    The draw is :func:`stratified_subset`'s with ``m = per_class * K`` (``K`` = number of
    classes; no remainder), so ``per_class = 50`` on ten classes gives exactly the examples of
    ``m = 500`` for the same seed.

    Raises :class:`KDConfigError` if ``per_class`` is not a positive integer or a class has fewer
    than ``per_class`` examples (naming the class, by ``class_names`` when given, and its count).
    """
    y = _as_labels(labels)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1:
        raise KDConfigError(f"train_subset_per_class={per_class!r} must be a positive integer (the "
                            f"labelled examples drawn from each class), or null for the full set.")
    per_class = int(per_class)
    counts = np.bincount(y, minlength=k)
    short = np.nonzero(counts < per_class)[0]
    if len(short):
        c = int(short[0])
        name = f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else ""
        raise KDConfigError(
            f"train_subset_per_class={per_class} asks for {per_class} examples of class {c}{name}, "
            f"but the training set (after the validation split) has only {counts[c]}. Use "
            f"train_subset_per_class <= {int(counts.min())} (the smallest class), a smaller "
            f"val_split, or null for the full set.")
    return stratified_subset(y, per_class * k, seed, k, class_names)


def train_val_split(n: int, val_split: float | int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted (train, val) positions with a seeded permutation.

    ``val_split`` is a fraction in [0, 1) or an absolute count (>= 1).
    """
    if val_split < 0 or (val_split >= 1 and float(val_split) != int(val_split)):
        raise KDConfigError(f"val_split={val_split} must be a fraction in [0, 1) or an integer count.")
    n_val = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if not 0 <= n_val < n:
        raise KDConfigError(f"val_split={val_split} leaves no training data out of {n} examples.")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def unlabelled_subset(n: int, labelled: Sequence[int] | np.ndarray, count: int | str,
                      seed: int = 0) -> np.ndarray:
    """Return positions into ``range(n)`` outside ``labelled``, as a sorted int64 array: the
    unlabelled transfer examples beside a labelled subset.

    ``count`` is a number of examples (drawn uniformly at random without replacement, seeded;
    the draw looks at no label, as unlabelled data comes in practice) or ``"rest"`` (every
    position outside ``labelled``). The random stream is ``PCG64([seed, 1])``, separate from
    :func:`stratified_subset`'s ``PCG64(seed)``; the result depends only on
    ``(n, labelled, count, seed)``.

    Raises :class:`KDConfigError` if ``count`` is negative or larger than what is left.
    """
    taken = np.zeros(n, dtype=bool)
    taken[np.asarray(labelled, dtype=np.int64)] = True
    rest = np.nonzero(~taken)[0].astype(np.int64)
    if isinstance(count, str):
        if count != "rest":
            raise KDConfigError(f"unlabelled={count!r}: give a number of examples or 'rest'.")
        return rest
    count = int(count)
    if count < 0:
        raise KDConfigError(f"unlabelled={count} is negative; give a number of unlabelled "
                            f"examples >= 0, 'rest' or null.")
    if count > len(rest):
        raise KDConfigError(
            f"unlabelled={count} is larger than what the training split has left beside the "
            f"{int(taken.sum())} labelled examples ({len(rest)}). Use unlabelled <= {len(rest)}, "
            f"or 'rest' for all of them.")
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    return np.sort(rng.choice(rest, size=count, replace=False)).astype(np.int64)
