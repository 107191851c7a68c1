"""Object-level agreement between two label images (segmentation accuracy).

A true object and a predicted object *match* when their intersection over union
(IoU) reaches a threshold; each object matches at most one partner (optimal
one-to-one assignment). From the matches follow the object counts and the
F1 score that segmentation papers report ("F1 at IoU 0.5").

Examples
--------
>>> import numpy as np
>>> from qdplex.metrics import match_labels
>>> truth = np.zeros((8, 8), np.uint32); truth[1:4, 1:4] = 1; truth[5:8, 5:8] = 2
>>> pred = np.zeros_like(truth); pred[1:4, 1:5] = 7
>>> m = match_labels(truth, pred, iou=0.5)
>>> m["tp"], m["fp"], m["fn"], round(m["f1"], 3)
(1, 0, 1, 0.667)
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from .errors import SegmentationError

__all__ = ["iou_pairs", "match_labels", "mean_matched_iou"]


def _as_labels(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise SegmentationError(f"expected an integer label image for {what}, found dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise SegmentationError(f"expected non-negative labels for {what}, found minimum {a.min()}")
    return a


def iou_pairs(truth, pred):
    """IoU of every overlapping (true object, predicted object) pair.

    Parameters
    ----------
    truth, pred : array of int
        Label images of one shape (0 is background). IDs need not be contiguous.

    Returns
    -------
    t_ids, p_ids : ndarray
        The true and predicted IDs of every overlapping pair.
    iou : ndarray of float
        Their intersection over union.
    truth_ids, pred_ids : ndarray
        All object IDs present in ``truth`` and in ``pred``.
    """
    truth = _as_labels(truth, "truth")
    pred = _as_labels(pred, "prediction")
    if truth.shape != pred.shape:
        raise SegmentationError(
            f"expected truth and prediction of one shape, found {truth.shape} and {pred.shape}"
        )
    t = truth.ravel()
    p = pred.ravel()
    truth_ids, t_inv = np.unique(t, return_inverse=True)
    pred_ids, p_inv = np.unique(p, return_inverse=True)
    # contingency table (background included at index 0 when present)
    table = sparse.coo_matrix(
        (np.ones(t.size, dtype=np.int64), (t_inv.ravel(), p_inv.ravel())),
        shape=(truth_ids.size, pred_ids.size),
    ).tocsr()
    t_area = np.asarray(table.sum(axis=1)).ravel()
    p_area = np.asarray(table.sum(axis=0)).ravel()
    coo = table.tocoo()
    keep = (truth_ids[coo.row] != 0) & (pred_ids[coo.col] != 0)
    rows, cols, inter = coo.row[keep], coo.col[keep], coo.data[keep].astype(float)
    iou = inter / (t_area[rows] + p_area[cols] - inter)
    return (
        truth_ids[rows],
        pred_ids[cols],
        iou,
        truth_ids[truth_ids != 0],
        pred_ids[pred_ids != 0],
    )


def _matches(truth, pred, iou):
    t_ids, p_ids, ious, truth_ids, pred_ids = iou_pairs(truth, pred)
    ok = ious >= iou
    t_ids, p_ids, ious = t_ids[ok], p_ids[ok], ious[ok]
    if t_ids.size == 0:
        return np.zeros(0), truth_ids.size, pred_ids.size
    if iou > 0.5:
        # IoU > 0.5 pairs are already one-to-one
        return ious, truth_ids.size, pred_ids.size
    # optimal one-to-one assignment among the candidate pairs
    tu, ti = np.unique(t_ids, return_inverse=True)
    pu, pi = np.unique(p_ids, return_inverse=True)
    cost = np.zeros((tu.size, pu.size))
    cost[ti, pi] = ious
    r, c = linear_sum_assignment(cost, maximize=True)
    vals = cost[r, c]
    return vals[vals >= iou], truth_ids.size, pred_ids.size


def match_labels(truth, pred, iou: float = 0.5) -> dict:
    """Match objects of two label images one-to-one at an IoU threshold.

    Parameters
    ----------
    truth, pred : array of int
        Reference and predicted label images of one shape (0 is background).
    iou : float
        Minimum intersection over union for a match, in (0, 1].

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (object counts), ``precision``, ``recall``, ``f1``,
        ``mean_iou`` (mean IoU of the matched pairs, NaN when none),
        ``n_true`` and ``n_pred``. With no objects on either side all scores are 1.
    """
    if not 0 < iou <= 1:
        raise SegmentationError(f"expected an IoU threshold in (0, 1], found {iou}")
    matched, n_true, n_pred = _matches(truth, pred, iou)
    tp = int(matched.size)
    fp = n_pred - tp
    fn = n_true - tp
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else 1.0
    return {
        "tp": tp,
        "fp": int(fp),
        "fn": int(fn),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "mean_iou": float(matched.mean()) if tp else float("nan"),
        "n_true": int(n_true),
        "n_pred": int(n_pred),
    }


def mean_matched_iou(truth, pred, iou: float = 0.5) -> float:
    """Mean IoU of the object pairs matched at threshold ``iou`` (NaN when none match)."""
    return match_labels(truth, pred, iou=iou)["mean_iou"]
