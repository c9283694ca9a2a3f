"""Confusion matrix and zero-shot metrics against sklearn and plain per-class formulas."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from clipzss.metrics import ConfusionMatrix, format_table, zero_shot_metrics


def reference_metrics(m: np.ndarray, unseen: list[int]) -> dict:
    """Plain per-class loop: IoU = TP / (GT + Pred - TP) over classes present in GT or prediction."""
    ious = []
    for c in range(len(m)):
        tp, gt, pr = m[c, c], m[c, :].sum(), m[:, c].sum()
        ious.append(tp / (gt + pr - tp) * 100 if gt + pr > 0 else math.nan)
    present = [c for c in range(len(m)) if not math.isnan(ious[c])]
    seen = [ious[c] for c in present if c not in unseen]
    uns = [ious[c] for c in present if c in unseen]
    s, u = sum(seen) / len(seen), sum(uns) / len(uns)
    return {
        "pAcc": np.trace(m) / m.sum() * 100,
        "mIoU": sum(ious[c] for c in present) / len(present),
        "mIoU_S": s,
        "mIoU_U": u,
        "hIoU": 2 * s * u / (s + u),
        "iou": ious,
    }


def random_batch(rng, n, shape, absent):
    target = rng.integers(0, n, size=shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, n, size=shape))
    for c in absent:  # absent from both GT and prediction
        target[target == c] = (c + 1) % n
        pred[pred == c] = (c + 1) % n
    target[rng.random(shape) < 0.1] = 255
    return torch.from_numpy(pred), torch.from_numpy(target)


def test_matrix_and_metrics_match_sklearn_and_plain_formulas():
    rng = np.random.default_rng(0)
    n, unseen, absent = 9, [2, 5, 7], [3, 7]
    cm = ConfusionMatrix(n)
    preds, targets = [], []
    for _ in range(3):
        pred, target = random_batch(rng, n, (2, 17, 13), absent)
        cm.update(pred, target)
        preds.append(pred.flatten()), targets.append(target.flatten())
    pred, target = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    keep = target != 255
    expected = confusion_matrix(target[keep], pred[keep], labels=list(range(n)))
    assert cm.matrix.dtype == torch.long and torch.equal(cm.matrix, torch.from_numpy(expected))

    got, ref = zero_shot_metrics(cm.matrix, unseen), reference_metrics(expected, unseen)
    for key in ("pAcc", "mIoU", "mIoU_S", "mIoU_U", "hIoU"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert np.allclose(got["iou"], ref["iou"], atol=1e-6, equal_nan=True)
    assert math.isnan(got["iou"][3]) and math.isnan(got["iou"][7])
    from_numpy = zero_shot_metrics(expected, unseen)
    assert np.allclose(from_numpy.pop("iou"), got["iou"], equal_nan=True)
    assert from_numpy == pytest.approx({k: v for k, v in got.items() if k != "iou"})


def test_predicted_but_absent_class_counts_as_zero_iou():
    m = np.array([[5, 1, 0], [0, 4, 0], [0, 0, 0]])
    m[0, 2] = 2  # class 2 never in GT but predicted: IoU 0, included in the mean
    out = zero_shot_metrics(m, [1])
    assert out["iou"][2] == 0.0
    assert out["mIoU"] == pytest.approx((5 / 8 * 100 + 4 / 5 * 100 + 0) / 3)
    assert out["mIoU_S"] == pytest.approx((5 / 8 * 100 + 0) / 2)


def test_hiou_edge_cases():
    m = np.diag([3, 4, 5])
    no_unseen = zero_shot_metrics(m, [])
    assert no_unseen["mIoU_S"] == 100 and math.isnan(no_unseen["mIoU_U"]) and math.isnan(no_unseen["hIoU"])
    all_wrong = np.array([[0, 3], [2, 0]])
    out = zero_shot_metrics(all_wrong, [1])
    assert out["mIoU_S"] == 0 and out["mIoU_U"] == 0 and out["hIoU"] == 0 and out["pAcc"] == 0


def test_update_rejects_ids_outside_the_classes():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    cm.update(torch.tensor([2, 0]), torch.tensor([255, 0]))
    assert cm.matrix.sum() == 1 and cm.matrix[0, 0] == 1


def test_format_table_lists_summary_and_classes():
    m = np.array([[5, 1], [2, 4]])
    metrics = zero_shot_metrics(m, [1])
    text = format_table(metrics, ["cat", "sheep"], [1])
    assert "hIoU" in text and "mIoU(U)" in text
    assert f"{metrics['hIoU']:8.2f}" in text
    sheep = next(line for line in text.splitlines() if line.startswith("sheep"))
    assert "U" in sheep and f"{metrics['iou'][1]:.2f}" in sheep
