"""Classification metrics the lab asks for, all derived from one confusion matrix, and the lab's evaluate().

Conventions:
  confusion[i, j] = number of examples of true class i predicted as class j (rows: truth, columns: predictions)
  precision[j] = confusion[j, j] / column sum j   (of the examples predicted j, the fraction that are j)
  recall[i]    = confusion[i, i] / row sum i      (of the examples of class i, the fraction found)
A class that is never predicted (or never occurs) has an undefined precision (recall); it is reported
as 0, as scikit-learn's zero_division=0 does, so that the macro averages stay finite.

Every evaluate() of the project returns the same scores dict (scores()): nn.evaluate for a NumPy net, and
evaluate() here for a PyTorch model. torch is imported by the functions that need it, so that the NumPy
scripts run without it.
"""
import numpy as np


def confusion_matrix(y_true, y_pred, num_classes):
    """Integer class indices (N,) twice -> int64 (num_classes, num_classes), rows = true class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(numerator, denominator):
    """numerator / denominator elementwise, 0 where the denominator is 0."""
    out = np.zeros(len(numerator))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def scores_from_confusion(confusion):
    """Confusion matrix (C, C) -> accuracy, per-class precision and recall (C,), and their macro averages."""
    confusion = np.asarray(confusion)
    correct = np.diag(confusion).astype(np.float64)
    precision = _ratio(correct, confusion.sum(axis=0))
    recall = _ratio(correct, confusion.sum(axis=1))
    return {
        'accuracy': correct.sum() / max(confusion.sum(), 1),
        'precision': precision, 'recall': recall,
        'macro_precision': precision.mean(), 'macro_recall': recall.mean(),
    }


def scores(y_true, y_pred, loss, num_classes):
    """True and predicted classes (N,) and the mean loss -> the scores dict of every evaluate(): loss,
    accuracy, confusion matrix (C, C), per-class precision and recall (C,), macro_precision, macro_recall."""
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    return {'loss': float(loss), 'confusion': confusion, **scores_from_confusion(confusion)}


EVAL_BATCH_SIZE = 500  # evaluation needs no gradients, and bigger batches only save a little time


def predict_logits(model, x, batch_size=EVAL_BATCH_SIZE):
    """Forward pass only, in eval mode, batch by batch: x (N, ...) -> logits (N, C) on the CPU.

    The model's training mode is restored afterwards; no gradients are recorded, so nothing here can
    update the weights. Batches are moved to the model's device, wherever x lives.
    """
    import torch
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                              for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def scores_from_logits(logits, y, loss_fn=None):
    """Logits (N, C) and int64 labels (N,), tensors -> scores(), the loss the mean of loss_fn (default:
    cross-entropy)."""
    import torch.nn.functional as F
    y = y.cpu()
    loss = (loss_fn or F.cross_entropy)(logits, y)
    return scores(y.numpy(), logits.argmax(dim=1).numpy(), loss, logits.shape[1])


def evaluate(model, x, y, loss_fn=None, batch_size=EVAL_BATCH_SIZE):
    """The lab's evaluate(): a PyTorch model on inputs x (N, ...) with int64 labels y (N,) -> scores().

    Runs the forward pass only (torch.no_grad, eval mode, previous mode restored) and never touches
    an optimizer. loss_fn(logits, y) must return the batch mean, like F.cross_entropy (the default).
    """
    return scores_from_logits(predict_logits(model, x, batch_size), y, loss_fn)


def summary(scores, class_names):
    """evaluate()'s dict -> what results.json keeps under 'test': per-class scores keyed by class name."""
    return {'loss': scores['loss'], 'accuracy': scores['accuracy'],
            'macro_precision': scores['macro_precision'], 'macro_recall': scores['macro_recall'],
            'precision': dict(zip(class_names, scores['precision'])),
            'recall': dict(zip(class_names, scores['recall'])), 'confusion': scores['confusion']}


def format_scores(scores, class_names, title=''):
    """A readable report of evaluate()'s dict: totals, then a per-class precision/recall table and
    the confusion matrix with class names (rows: true class, columns: predicted)."""
    width = max(len(name) for name in class_names)
    lines = [f"{title}loss {scores['loss']:.4f}  accuracy {scores['accuracy']:.2%}  "
             f"macro precision {scores['macro_precision']:.2%}  macro recall {scores['macro_recall']:.2%}",
             f"{'class':<{width}}  precision  recall"]
    lines += [f"{name:<{width}}  {p:9.2%}  {r:6.2%}" for name, p, r in zip(class_names, scores['precision'], scores['recall'])]
    short = [name[:5] for name in class_names]
    lines.append(f"confusion matrix (rows: true, columns: predicted)\n{'':<{width}} " + ' '.join(f"{s:>5}" for s in short))
    lines += [f"{name:<{width}} " + ' '.join(f"{n:5d}" for n in row) for name, row in zip(class_names, scores['confusion'])]
    return '\n'.join(lines)


def print_scores(scores, class_names, title=''):
    print(format_scores(scores, class_names, title))
