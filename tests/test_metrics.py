"""Confusion matrix and the scores derived from it, checked against hand-computed values; evaluate()'s side effects."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics


def test_confusion_matrix_rows_are_true_classes():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 1, 0, 2, 1, 2]
    expected = np.array([[2, 1, 0],
                         [0, 2, 0],
                         [1, 1, 2]])
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, 3), expected)


def test_scores_from_hand_computed_confusion_matrix():
    confusion = np.array([[2, 1, 0],
                          [0, 2, 0],
                          [1, 1, 2]])
    scores = metrics.scores_from_confusion(confusion)
    assert scores['accuracy'] == pytest.approx(6 / 9)
    np.testing.assert_allclose(scores['precision'], [2 / 3, 2 / 4, 2 / 2])  # diagonal / column sums
    np.testing.assert_allclose(scores['recall'], [2 / 3, 2 / 2, 2 / 4])  # diagonal / row sums
    assert scores['macro_precision'] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert scores['macro_recall'] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_never_predicted_class_has_precision_zero_without_warnings():
    # class 2 is never predicted (column 2 is empty) and class 3 never occurs (row 3 is empty);
    # pytest.ini turns RuntimeWarnings (0/0) into errors
    confusion = np.array([[3, 1, 0, 0],
                          [1, 2, 0, 0],
                          [2, 1, 0, 0],
                          [0, 0, 0, 0]])
    scores = metrics.scores_from_confusion(confusion)
    np.testing.assert_allclose(scores['precision'], [3 / 6, 2 / 4, 0, 0])
    np.testing.assert_allclose(scores['recall'], [3 / 4, 2 / 3, 0, 0])
    assert np.isfinite(scores['macro_precision']) and scores['macro_precision'] == pytest.approx((0.5 + 0.5) / 4)
    assert scores['accuracy'] == pytest.approx(5 / 10)


def test_scores_from_logits_uses_argmax_and_the_mean_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.1, 0.2]])
    y = torch.tensor([0, 1, 2, 2])  # predicted 0, 1, 0, 2
    scores = metrics.scores_from_logits(logits, y)
    np.testing.assert_array_equal(scores['confusion'], [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    assert scores['accuracy'] == pytest.approx(0.75)
    assert scores['loss'] == pytest.approx(F.cross_entropy(logits, y).item())


def _model():
    torch.manual_seed(0)
    # dropout and batch norm behave differently in train and eval mode, so the mode matters
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize('training', [True, False])
def test_evaluate_changes_neither_weights_nor_mode(training):
    model = _model().train(training)
    x, y = torch.randn(23, 3, 2, 2), torch.randint(0, 3, (23,))
    before = {name: value.clone() for name, value in model.state_dict().items()}  # includes batch-norm statistics
    scores = metrics.evaluate(model, x, y, batch_size=5)  # 23 = 4 full batches and a partial one
    assert model.training is training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert scores['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert scores['accuracy'] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert scores['confusion'].sum() == 23


def test_format_scores_names_every_class():
    scores = metrics.scores_from_logits(torch.eye(3), torch.tensor([0, 1, 1]))
    text = metrics.format_scores(scores, ['cat', 'dog', 'frog'])
    assert 'accuracy 66.67%' in text
    assert all(name in text for name in ('cat', 'dog', 'frog'))
