"""multiclass_hinge_loss against PyTorch's own multi_margin_loss (an independent implementation) and by hand."""
import json
import os
import subprocess
import sys

import pytest
import skimage.io
import torch
import torch.nn.functional as F

from conftest import ROOT
import hinge_loss
from hinge_loss import multiclass_hinge_loss


@pytest.mark.parametrize('batch_size, num_classes, delta', [(1, 10, 1.0), (7, 2, 1.0), (16, 10, 0.5), (5, 3, 2.0)])
def test_matches_multi_margin_loss_and_its_gradient(batch_size, num_classes, delta):
    # multi_margin_loss averages the margins over C as well; ours sums them, as CS231n's L_i does
    generator = torch.Generator().manual_seed(batch_size * num_classes)
    logits = torch.randn(batch_size, num_classes, generator=generator, dtype=torch.float64) * 2
    target = torch.randint(0, num_classes, (batch_size,), generator=generator)
    ours_in = logits.clone().requires_grad_()
    reference_in = logits.clone().requires_grad_()
    ours = multiclass_hinge_loss(ours_in, target, delta)
    reference = F.multi_margin_loss(reference_in, target, margin=delta) * num_classes
    assert ours.shape == ()
    torch.testing.assert_close(ours, reference)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours_in.grad, reference_in.grad)
    assert ours_in.grad.abs().sum() > 0  # the random logits violate some margins: the test compares real gradients


def test_hand_computed_example_and_per_example_losses():
    logits = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])  # CS231n's cat/car/frog example
    target = torch.tensor([0, 1, 2])
    per_example = multiclass_hinge_loss(logits, target, reduction='none')
    torch.testing.assert_close(per_example, torch.tensor([2.9, 0.0, 12.9]))
    torch.testing.assert_close(multiclass_hinge_loss(logits, target), torch.tensor(15.8 / 3))


def test_zero_margin_gives_zero_for_well_separated_logits():
    target = torch.tensor([2, 0, 1, 1])
    logits = torch.randn(4, 3) - 10 + 20 * F.one_hot(target, 3)
    assert multiclass_hinge_loss(logits, target, delta=0.0).item() == 0.0
    assert multiclass_hinge_loss(logits, target, delta=1.0).item() == 0.0  # separated by far more than 1
    assert multiclass_hinge_loss(logits, target, delta=30.0).item() > 0


@pytest.mark.parametrize('logits_shape, target', [
    ((4, 3), torch.tensor([0, 1, 2])),            # one label too few
    ((4,), torch.tensor([0, 1, 2, 0])),           # logits not (B, C)
    ((4, 3), torch.tensor([[0], [1], [2], [0]])),  # target not (B,)
    ((4, 3), torch.tensor([0, 1, 3, 0])),         # class 3 of 3
    ((4, 3), torch.tensor([0, -1, 2, 0])),
    ((4, 3), torch.tensor([0., 1., 2., 0.])),     # float labels
])
def test_bad_input_raises_value_error_naming_both_shapes(logits_shape, target):
    with pytest.raises(ValueError) as error:
        multiclass_hinge_loss(torch.zeros(logits_shape), target)
    assert str(tuple(logits_shape)) in str(error.value) and str(tuple(target.shape)) in str(error.value)


def test_compare_trains_both_losses_from_the_same_start_and_writes_the_comparison(synthetic_cifar, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'hinge_loss.py'), '--compare', '--data-dir', synthetic_cifar,
                             '--valid-size', '40', '--limit', '100', '--epochs', '1', '--save-dir', str(tmp_path),
                             '--run-name', 'cmp', '--device', 'cpu'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'cmp'
    assert {'compare.md', 'compare.json', 'compare.png', 'hinge', 'cross-entropy'} <= set(os.listdir(run_dir))
    hinge, ce = (json.loads((run_dir / name / 'results.json').read_text()) for name in ('hinge', 'cross-entropy'))
    assert (hinge['loss'], hinge['config']['lr']) == ('Multiclass hinge loss', hinge_loss.HINGE_LR)
    assert (ce['loss'], ce['config']['lr']) == ('Cross-entropy loss', 0.1)
    # the same seed: the same initial filters, the same data
    first_filters = 'conv1_epoch_00_step_000000.png'
    assert (run_dir / 'hinge' / first_filters).read_bytes() == (run_dir / 'cross-entropy' / first_filters).read_bytes()
    assert hinge['data'] == ce['data']
    comparison = json.loads((run_dir / 'compare.json').read_text())
    assert set(comparison['runs']) == {'hinge', 'cross-entropy'}
    assert comparison['runs']['hinge']['test']['accuracy'] == hinge['test']['accuracy']
    table = (run_dir / 'compare.md').read_text()
    assert '| hinge |' in table and '| cross-entropy |' in table and 'recall truck' in table
    assert '| hinge |' in result.stdout
    assert skimage.io.imread(run_dir / 'compare.png').ndim == 3


def test_divergence_is_a_one_line_error(synthetic_cifar, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'hinge_loss.py'), '--data-dir', synthetic_cifar,
                             '--valid-size', '40', '--epochs', '1', '--lr', '1e6', '--save-dir', str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: the loss became nan at epoch 1')
