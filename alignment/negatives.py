"""False-negative control: the (anchor, candidate) pairs of different rows the loss must not score as negatives.

Every sentence carries a text identity (``Batch.text_ids``, a hash of its
normalised text: :mod:`alignment.data.identity` defines "near-identical").
Two rows of the global batch that share a text are most likely the same
sentence pair twice (gettext: Django's "Save" and Wagtail's "Save", each with
its own German "Speichern"); scoring one as a negative of the other pushes
apart sentences that mean the same. ``--model.loss.mask_duplicates`` chooses:

``rows`` (default)
    When rows ``r != r'`` share at least one text identity, *every* pair of a
    sentence of ``r`` and a sentence of ``r'`` is masked: not only "Save"/"Save"
    but also "Save" (row 1) against "Speichern" (row 2), which is a translation
    of it as well.
``texts``
    Only pairs whose two texts have the same identity are masked.
``off``
    Nothing is masked (the behaviour before text identities existed).

*Masked*, not promoted to positives: a masked candidate leaves both the
numerator and the denominator of the anchor's softmax, exactly as padding
does; the anchor's positives stay its own row's translations. Promoting
duplicates to positives would trust the hash to mean "translation" (two rows
sharing "Open" may mean the verb and the adjective, whose German texts differ);
masking only ever drops a negative, so it cannot teach anything wrong. Pairs of
the *same* row are positives already and are never masked. The term weights
(``losses.term_weights``) do not change: they count positives only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

DuplicateMode = Literal["rows", "texts", "off"]
DUPLICATE_MODES: tuple[str, ...] = get_args(DuplicateMode)


def check_mode(mode: str) -> None:
    if mode not in DUPLICATE_MODES:
        raise ValueError(f"--model.loss.mask_duplicates must be one of {', '.join(DUPLICATE_MODES)}, got {mode!r}")


@dataclass
class AnchorMasks:
    """Which candidates take part in each local anchor's softmax (``losses.multiway_infonce``)."""

    candidate: Tensor  # (n, M) valid, not the anchor itself, not a masked duplicate
    positive: Tensor  # (n, M) candidate of the anchor's row
    masked: Tensor  # () long, other-row candidates masked as duplicates


def anchor_masks(cands, mask_duplicates: str = "rows") -> AnchorMasks:
    """The candidate and positive masks of the local anchors of ``cands`` (``losses.GlobalCandidates``)."""
    cols = torch.arange(cands.row_ids.shape[0], device=cands.row_ids.device)  # (M,)
    a_rows = cands.row_ids[cands.local_index]  # (n,)
    candidate = cands.valid[None, :] & (cols[None, :] != cands.local_index[:, None])  # (n, M)
    positive = candidate & (cands.row_ids[None, :] == a_rows[:, None])  # (n, M), never padding (row -1)
    duplicate = duplicate_mask(cands, mask_duplicates)  # (n, M) other rows only: positives untouched
    if duplicate is None:
        return AnchorMasks(candidate, positive, cols.new_zeros(()))
    return AnchorMasks(candidate & ~duplicate, positive, duplicate.sum())


def duplicate_mask(cands, mode: str) -> Tensor | None:
    """``(n, M)`` bool: which candidates are masked for each local anchor; ``None`` when nothing can be.

    Args:
        cands: the gathered candidates (``losses.GlobalCandidates``: ``text_ids``,
            ``row_ids``, ``valid``, ``local_index``, ``num_rows``). ``None`` is
            returned when ``cands.text_ids`` is ``None`` or ``mode`` is ``off``.
        mode: ``rows``, ``texts`` or ``off`` (module docstring).

    Cost: ``texts`` one ``(n, M)`` comparison; ``rows`` a ``torch.unique`` over
    the ``M`` identities (a device-to-host sync) and an ``(n, G) @ (G, M)``
    product over the ``G`` texts that several rows share (few in practice).
    """
    check_mode(mode)
    if mode == "off" or cands.text_ids is None:
        return None
    rows, valid, local = cands.row_ids, cands.valid, cands.local_index
    other_row = valid[None, :] & (rows[None, :] != rows[local][:, None])  # (n, M), padding excluded
    if mode == "texts":
        return other_row & (cands.text_ids[None, :] == cands.text_ids[local][:, None])
    incidence = shared_text_incidence(cands.text_ids[valid], rows[valid], cands.num_rows)  # (R, G)
    if incidence is None:
        return other_row & False
    shared = incidence[rows[local]] @ incidence[rows.clamp(min=0)].T  # (n, M) texts the two rows share
    return other_row & (shared > 0)


def shared_text_incidence(text_ids: Tensor, row_ids: Tensor, num_rows: int) -> Tensor | None:
    """``(num_rows, G)`` float 0/1: does row ``r`` hold text ``g``, for the ``G`` texts held by two rows or more.

    ``None`` when no text is shared. Inputs are the valid sentences' ``(V,)`` identities and global row ids.
    """
    if text_ids.numel() == 0:
        return None
    _, group = torch.unique(text_ids, return_inverse=True)  # (V,)
    pairs = torch.unique(torch.stack([group, row_ids]), dim=1)  # (2, P) distinct (text, row)
    rows_per_text = torch.bincount(pairs[0])  # (T,)
    shared = rows_per_text >= 2  # (T,)
    num_shared = int(shared.sum())  # the host sync
    if num_shared == 0:
        return None
    column = torch.cumsum(shared, 0) - 1  # (T,) column of each shared text
    keep = shared[pairs[0]]  # (P,)
    incidence = torch.zeros(max(num_rows, 1), num_shared, device=text_ids.device)
    incidence[pairs[1][keep], column[pairs[0][keep]]] = 1.0
    return incidence
