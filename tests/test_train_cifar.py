"""train_cifar.py end to end: every file it writes, and learning on the real stand-in.
Bad flags and data: test_bad_input.py; interrupting and resuming: test_resume.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.io
import torch

import data
import metrics
from conftest import ROOT
from hinge_loss import multiclass_hinge_loss
from train_cifar import ConvNet, worst_mistakes

SCRIPT = os.path.join(ROOT, 'train_cifar.py')


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize('padding, features', [(2, 32 * 7 * 7), (1, 32 * 5 * 5), (0, 32 * 4 * 4)])
def test_model_shapes(padding, features):
    model = ConvNet(padding)
    assert model.fc1.in_features == features
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('loss_fn', [torch.nn.functional.cross_entropy, multiclass_hinge_loss])
def test_worst_mistakes_are_the_misclassified_with_the_highest_loss(loss_fn):
    logits = torch.tensor([[5.0, 0, 0],   # right
                           [0, 1.0, 0],   # wrong, mildly
                           [0, 0, 9.0],   # wrong, badly
                           [0, 3.0, 0],   # right
                           [4.0, 0, 0]])  # wrong, in between
    y = torch.tensor([0, 0, 1, 1, 2])
    names = ['a', 'b', 'c']
    worst = worst_mistakes(logits, y, loss_fn, names, 20)
    assert [m['index'] for m in worst] == [2, 4, 1]
    assert [m['true'] for m in worst] == ['b', 'c', 'a']
    assert [m['top3'][0][0] for m in worst] == ['c', 'a', 'b']  # the predicted class comes first
    assert all(m['top3'][0][1] >= m['top3'][1][1] >= m['top3'][2][1] for m in worst)
    assert worst[0]['loss'] == pytest.approx(loss_fn(logits[2:3], y[2:3]).item())
    assert [m['index'] for m in worst_mistakes(logits, y, loss_fn, names, 2)] == [2, 4]


def test_quick_run_writes_every_file(synthetic_cifar, tmp_path):
    result = _run('--data-dir', synthetic_cifar, '--valid-size', '40', '--limit', '100', '--epochs', '1',
                  '--save-dir', str(tmp_path), '--run-name', 'quick', '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'quick'
    assert sorted(os.listdir(run_dir)) == ['best_model.pt', 'checkpoint.pt', 'config.json', 'confusion_matrix.png',
                                           'conv1_epoch_00_step_000000.png', 'conv1_epoch_01_step_000002.png',
                                           'misclassified.png', 'results.json', 'training_plot.png']
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['config']['epochs'] == 1 and results['config']['padding'] == 2
    assert results['loss'] == 'Cross-entropy loss'
    assert results['data'] | {'data_mean': None, 'data_std': None} == {
        'name': 'CIFAR-10 (JPEG stand-in)', 'originals': False, 'num_train': 100, 'num_valid': 40, 'num_test': 40,
        'data_mean': None, 'data_std': None}
    assert all(0 < value < 255 for value in results['data']['data_mean'] + results['data']['data_std'])
    [record] = results['epochs']
    assert record['lr'] == 0.1 and results['best_epoch'] == 1 and record['valid_acc'] == results['best_valid_acc']
    assert results['seconds_per_epoch'] > 0 and results['images_per_second'] > 0
    assert list(results['test']['recall']) == data.CIFAR_CLASSES and len(results['test']['precision']) == 10
    assert np.array(results['test']['confusion']).sum() == 40

    # the checkpoint loads safely and reproduces the reported test accuracy
    model = ConvNet(padding=2)
    model.load_state_dict(torch.load(run_dir / 'best_model.pt', weights_only=True))
    prepared = data.prepare_cifar10(synthetic_cifar, valid_size=40, seed=42, download=False)
    scores = metrics.evaluate(model, torch.from_numpy(prepared['test_x']), torch.from_numpy(prepared['test_y']))
    assert scores['accuracy'] == pytest.approx(results['test']['accuracy'])

    filters = skimage.io.imread(run_dir / 'conv1_epoch_00_step_000000.png')
    assert filters.ndim == 3 and filters.shape[2] == 3  # conv1's filters in colour
    assert not np.array_equal(filters, skimage.io.imread(run_dir / 'conv1_epoch_01_step_000002.png'))  # they learned
    for figure in ('training_plot.png', 'confusion_matrix.png', 'misclassified.png'):
        assert skimage.io.imread(run_dir / figure).shape[0] > 300


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_cuda_without_gpu_is_a_one_line_error_before_any_work(tmp_path):
    result = _run('--device', 'cuda', '--save-dir', str(tmp_path))
    assert result.returncode == 2 and result.stderr == 'error: --device cuda: no CUDA GPU is available here (use --device cpu or auto)\n'
    assert not os.listdir(tmp_path)


@pytest.mark.integration
def test_learns_on_the_real_stand_in(cifar_dir, tmp_path):
    # 240 steps of plain SGD: about 33% (JPEG stand-in)
    result = _run('--data-dir', cifar_dir, '--limit', '3000', '--batch-size', '25', '--epochs', '2',
                  '--valid-size', '1000', '--save-dir', str(tmp_path), '--run-name', 'real')
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / 'real' / 'results.json').read_text())
    assert results['data']['num_train'] == 3000 and results['data']['num_test'] == 10000
    assert results['test']['accuracy'] > 0.25  # chance is 0.10
    assert results['best_valid_acc'] > 0.25


def independent_scores(model, x, y, num_classes=10):
    """Accuracy and macro precision/recall by counting, class by class: no confusion matrix, no metrics.py."""
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    precision, recall = [], []
    for c in range(num_classes):
        true_positives = int(((predicted == c) & (y == c)).sum())
        predicted_c, actual_c = int((predicted == c).sum()), int((y == c).sum())
        precision.append(true_positives / predicted_c if predicted_c else 0.0)
        recall.append(true_positives / actual_c if actual_c else 0.0)
    return int((predicted == y).sum()) / len(y), float(np.mean(precision)), float(np.mean(recall))


def test_every_epoch_scores_the_training_and_validation_sets(synthetic_cifar, tmp_path):
    """evaluate() after each epoch, as the lab asks: accuracy and macro precision/recall on both sets, the same
    as counted independently with the epoch's model (the checkpoint of a one-epoch run holds it)."""
    result = _run('--data-dir', synthetic_cifar, '--valid-size', '40', '--limit', '100', '--epochs', '1',
                  '--save-dir', str(tmp_path), '--run-name', 'e', '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    [record] = json.loads((tmp_path / 'e' / 'results.json').read_text())['epochs']
    model = ConvNet(padding=2)
    model.load_state_dict(torch.load(tmp_path / 'e' / 'checkpoint.pt', weights_only=True)['model'])
    model.eval()
    prepared = data.prepare_cifar10(synthetic_cifar, valid_size=40, seed=42, download=False)
    for split, x, y in (('train', prepared['train_x'][:100], prepared['train_y'][:100]),
                        ('valid', prepared['valid_x'], prepared['valid_y'])):
        accuracy, precision, recall = independent_scores(model, torch.from_numpy(x), torch.from_numpy(y))
        assert record[f'{split}_acc'] == pytest.approx(accuracy, abs=1e-12)
        assert record[f'{split}_precision'] == pytest.approx(precision, abs=1e-12)
        assert record[f'{split}_recall'] == pytest.approx(recall, abs=1e-12)
    assert 'train loss' in result.stdout and ' P ' in result.stdout and ' R ' in result.stdout  # printed every epoch


def test_the_printed_worst_mistakes_are_the_ones_drawn(synthetic_cifar, tmp_path, monkeypatch, capsys):
    import plots
    import train_cifar
    drawn = {}
    monkeypatch.setattr(plots, 'save_image_grid', lambda path, images, titles, **kw: drawn.update(
        images=images, titles=titles))
    train_cifar.main(['--data-dir', synthetic_cifar, '--valid-size', '40', '--limit', '60', '--epochs', '1',
                      '--lr', '0.01', '--save-dir', str(tmp_path), '--run-name', 'w', '--device', 'cpu'])
    out = capsys.readouterr().out
    mistakes = json.loads((tmp_path / 'w' / 'results.json').read_text())['worst_mistakes']
    assert 0 < len(mistakes) <= 20 and len(drawn['titles']) == len(mistakes)
    printed = out.split('top 3 classes by softmax probability):\n')[1].splitlines()[:len(mistakes)]
    prepared = data.prepare_cifar10(synthetic_cifar, valid_size=40, seed=42, download=False)
    for mistake, line, title, image in zip(mistakes, printed, drawn['titles'], drawn['images']):
        assert line == train_cifar.format_mistake(mistake)
        assert title.splitlines()[0] == f"true: {mistake['true']}"
        assert title.splitlines()[1:] == [f"{name} {p:.2f}" for name, p in mistake['top3']]
        np.testing.assert_array_equal(image, plots.draw_image(prepared['test_x'][mistake['index']],
                                                              prepared['data_mean'], prepared['data_std']))
        assert mistake['true'] == prepared['class_names'][prepared['test_y'][mistake['index']]]
