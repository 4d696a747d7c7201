"""Probes and alignment diagnostics from embeddings.

* STS: Spearman correlation between cosine similarity and gold scores
  (torchmetrics), for sets that carry scores.
* Cross-lingual classification transfer: a linear probe trained on the pivot
  language's embeddings, tested on every language (Conneau et al. 2018, XNLI
  zero-shot protocol; here with a frozen encoder and a linear head).
* Language-identity probe: how well a linear probe recovers the language of an
  embedding. Lower is more language-agnostic; compare to the majority and
  chance baselines reported beside it (Libovický et al. 2020, "On the
  language neutrality of pre-trained multilingual representations").

The unsupervised diagnostics (hubness, cosine gap) live in :mod:`alignment.evaluate.metrics`.

Every probe splits by *row*: the translations of a test row never appear in
training, otherwise a probe could memorise a row and "transfer" by lookup.
Probes are multinomial logistic regression on standardised features, fitted
full-batch with L-BFGS from zero weights: deterministic for a given input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.evaluate.embeddings import ArrayLike, MultiWayEmbeddings, as_float_matrix, check_vectors, l2_normalize


@dataclass
class ProbeConfig:
    """Linear-probe settings (``--probe.*``)."""

    test_fraction: float = 0.3
    """Share of rows held out for testing; the split is by row, so translations never straddle it."""
    max_iter: int = 100
    """L-BFGS iterations (full batch)."""
    weight_decay: float = 1e-3
    """L2 penalty 0.5 * weight_decay * ||W||^2 added to the mean cross-entropy."""
    seed: int = 0
    """Seed of the row split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--probe.test_fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if self.max_iter < 1:
            raise ValueError(f"--probe.max_iter must be >= 1, got {self.max_iter}")
        if self.weight_decay < 0:
            raise ValueError(f"--probe.weight_decay must be >= 0, got {self.weight_decay}")


# --------------------------------------------------------------------------- linear probe


def row_split(num_rows: int, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random train/test masks ``(R,), (R,)`` over rows, disjoint, each non-empty, seeded.

    Raises:
        ValueError: fewer than 2 rows.
    """
    if num_rows < 2:
        raise ValueError(f"need at least 2 rows to split into train and test, got {num_rows}")
    num_test = min(num_rows - 1, max(1, round(test_fraction * num_rows)))
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    test = torch.zeros(num_rows, dtype=torch.bool)
    test[perm[:num_test]] = True
    return ~test, test


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features.

    ``logits(x) = ((x - mean) / std) @ weight + bias``; weight ``(D, C)``.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias  # (n, C)

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=1)  # (n,)


def fit_linear_probe(
    features: Tensor, labels: Tensor, num_classes: int, *, max_iter: int = 100, weight_decay: float = 1e-3
) -> LinearProbe:
    """Fit multinomial logistic regression with full-batch L-BFGS (strong Wolfe line search).

    Args:
        features: ``(n, D)``; labels: ``(n,)`` long in ``[0, num_classes)``.

    Works when called from a validation loop: Lightning runs it under
    ``torch.inference_mode``, whose tensors cannot enter autograd, so the fit
    leaves inference mode and clones its inputs.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().clone().float()  # hazard: inference tensors cannot be saved for backward
        y = labels.detach().clone().long().to(x.device)
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False).clamp_min(1e-6)  # constant features would divide by zero
        z = (x - mean) / std  # (n, D)
        weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def _accuracy(pred: Tensor, labels: Tensor) -> float:
    return float((pred == labels).float().mean()) if labels.numel() else math.nan


# --------------------------------------------------------------------------- language identity


@dataclass(frozen=True)
class LanguageIdResult:
    """Language-identity probe: accuracy on held-out rows and its baselines.

    ``majority_baseline`` predicts the most frequent training language for
    every test sentence; ``chance`` is ``1 / num_languages``. An encoder whose
    translations are identical gets one sentence per test row right at best
    (``1 / num_languages`` when every row has every language).
    """

    accuracy: float
    majority_baseline: float
    chance: float
    num_train: int
    num_test: int
    per_language: dict[str, float] = field(default_factory=dict)


def language_id_probe(emb: MultiWayEmbeddings, config: ProbeConfig | None = None) -> LanguageIdResult:
    """Train a language-ID probe on the sentences of train rows, test on the other rows.

    Raises:
        ValueError: fewer than two languages or two rows.
    """
    config = config or ProbeConfig()
    if len(emb.language_codes) < 2:
        raise ValueError(f"the language-identity probe needs at least 2 languages, got {list(emb.language_codes)}")
    train_rows, test_rows = row_split(emb.num_rows, config.test_fraction, config.seed)
    train, test = train_rows[emb.row_index], test_rows[emb.row_index]  # (N,), (N,)
    x, labels = emb.embeddings, emb.lang_index.to(emb.embeddings.device)
    dev = x.device
    probe = fit_linear_probe(
        x[train.to(dev)],
        labels[train.to(dev)],
        len(emb.language_codes),
        max_iter=config.max_iter,
        weight_decay=config.weight_decay,
    )
    pred, gold = probe.predict(x[test.to(dev)]), labels[test.to(dev)]
    majority = int(torch.bincount(labels[train.to(dev)], minlength=len(emb.language_codes)).argmax())
    per_language = {
        lang: _accuracy(pred[gold == i], gold[gold == i])
        for i, lang in enumerate(emb.language_codes)
        if (gold == i).any()
    }
    return LanguageIdResult(
        accuracy=_accuracy(pred, gold),
        majority_baseline=_accuracy(torch.full_like(gold, majority), gold),
        chance=1.0 / len(emb.language_codes),
        num_train=int(train.sum()),
        num_test=int(test.sum()),
        per_language=per_language,
    )


# --------------------------------------------------------------------------- classification transfer


@dataclass(frozen=True)
class TransferResult:
    """Zero-shot transfer of a pivot-trained linear classifier.

    Attributes:
        pivot: the training language.
        pivot_accuracy: in-language accuracy on held-out pivot rows (the ceiling).
        accuracy: per other language, accuracy on its held-out rows.
        num_test: held-out sentences per language (pivot included).
        majority_baseline: accuracy of predicting the most frequent training class.
        classes: class names, in label-index order.
    """

    pivot: str
    pivot_accuracy: float
    accuracy: dict[str, float]
    num_test: dict[str, int]
    majority_baseline: float
    classes: tuple[str, ...]

    @property
    def mean_accuracy(self) -> float:
        """Mean over the non-pivot languages."""
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else math.nan


def row_label_tensor(emb: MultiWayEmbeddings, row_labels: Mapping | Sequence) -> tuple[Tensor, tuple[str, ...]]:
    """Labels per row of ``emb`` as ``(R,)`` long plus the sorted class names.

    ``row_labels`` maps row key -> label, or is a sequence aligned with ``emb.row_keys``.

    Raises:
        ValueError: rows without a label (count and examples named), or a length mismatch.
    """
    if isinstance(row_labels, Mapping):
        by_key = {str(k): v for k, v in row_labels.items()}
        missing = [k for k in emb.row_keys if k not in by_key]
        if missing:
            raise ValueError(
                f"{len(missing)} of {emb.num_rows} rows have no class label (e.g. {', '.join(map(repr, missing[:3]))})"
            )
        values = [by_key[k] for k in emb.row_keys]
    else:
        values = list(row_labels)
        if len(values) != emb.num_rows:
            raise ValueError(f"row_labels has {len(values)} labels but the embeddings have {emb.num_rows} rows")
    classes = tuple(sorted({str(v) for v in values}))
    position = {c: i for i, c in enumerate(classes)}
    return torch.tensor([position[str(v)] for v in values], dtype=torch.long), classes


def classification_transfer(
    emb: MultiWayEmbeddings, row_labels: Mapping | Sequence, config: ProbeConfig | None = None
) -> TransferResult:
    """Train on pivot embeddings of train rows; report accuracy per language on test rows.

    A row's label is shared by all its translations. Languages with no
    held-out sentence are left out of ``accuracy``.

    Raises:
        ValueError: the pivot is absent, fewer than 2 classes among pivot
            training rows, or unlabelled rows.
    """
    config = config or ProbeConfig()
    pivot = emb.require_language(emb.pivot)
    labels_per_row, classes = row_label_tensor(emb, row_labels)
    train_rows, test_rows = row_split(emb.num_rows, config.test_fraction, config.seed)
    pivot_col = emb.grid[:, emb.language_position(pivot)]  # (R,)
    fit_rows = train_rows & (pivot_col >= 0)
    fit_labels = labels_per_row[fit_rows]
    if fit_labels.unique().numel() < 2:
        raise ValueError(
            f"classification transfer needs at least 2 classes among the {pivot} training rows, "
            f"got {fit_labels.unique().numel()}"
        )
    dev = emb.embeddings.device
    probe = fit_linear_probe(
        emb.embeddings[pivot_col[fit_rows].to(dev)],
        fit_labels.to(dev),
        len(classes),
        max_iter=config.max_iter,
        weight_decay=config.weight_decay,
    )
    accuracy, num_test = {}, {}
    for pos, lang in enumerate(emb.language_codes):
        col = emb.grid[:, pos]
        rows = test_rows & (col >= 0)
        if not rows.any():
            continue
        pred = probe.predict(emb.embeddings[col[rows].to(dev)]).cpu()
        accuracy[lang] = _accuracy(pred, labels_per_row[rows])
        num_test[lang] = int(rows.sum())
    majority = int(torch.bincount(fit_labels, minlength=len(classes)).argmax())
    test_labels = labels_per_row[test_rows]
    return TransferResult(
        pivot=pivot,
        pivot_accuracy=accuracy.pop(pivot, math.nan),
        accuracy=accuracy,
        num_test=num_test,
        majority_baseline=_accuracy(torch.full_like(test_labels, majority), test_labels),
        classes=classes,
    )


# --------------------------------------------------------------------------- STS


@dataclass(frozen=True)
class StsResult:
    """Spearman correlation between cosine similarity and gold scores on ``num_pairs`` pairs."""

    name: str
    spearman: float
    num_pairs: int


def paired_cosine(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Cosine of each pair ``(a[i], b[i])``: ``(n,)``; NaN/zero vectors raise, naming their indices."""
    a, b = as_float_matrix(a, "first sentences"), as_float_matrix(b, "second sentences")
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_vectors(a, "first sentences")
    check_vectors(b, "second sentences")
    return (l2_normalize(a) * l2_normalize(b)).sum(dim=1)  # (n,)


def sts_spearman(a: ArrayLike, b: ArrayLike, scores: ArrayLike | Sequence[float], name: str = "sts") -> StsResult:
    """Spearman correlation (torchmetrics) between ``cos(a[i], b[i])`` and gold ``scores[i]``.

    Args:
        a, b: ``(n, D)`` embeddings of the two sides of each scored pair (the
            languages may differ: cross-lingual STS).
        scores: ``(n,)`` gold similarity, any monotone scale (e.g. 0-5).

    Raises:
        ValueError: fewer than 2 pairs, a length mismatch, or non-finite gold scores (indices named).
    """
    from torchmetrics.functional import spearman_corrcoef

    cos = paired_cosine(a, b).cpu().double()  # (n,)
    gold = (
        scores.detach().cpu() if isinstance(scores, Tensor) else torch.from_numpy(np.asarray(scores, dtype=np.float64))
    )
    gold = gold.double().flatten()  # (n,)
    if gold.numel() != cos.numel():
        raise ValueError(f"{name}: {gold.numel()} gold scores for {cos.numel()} sentence pairs")
    if cos.numel() < 2:
        raise ValueError(f"{name}: Spearman correlation needs at least 2 scored pairs, got {cos.numel()}")
    bad = torch.nonzero(~torch.isfinite(gold)).flatten()
    if bad.numel():
        raise ValueError(f"{name}: {bad.numel()} gold scores are not finite (pairs {bad[:3].tolist()})")
    return StsResult(name=name, spearman=float(spearman_corrcoef(cos, gold)), num_pairs=int(cos.numel()))
