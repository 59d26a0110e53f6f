"""train_pytorch.py: the PyTorch model is the NumPy model (same init scheme, same steps to 1e-8 in float64),
weights travel between the frameworks, and the script's outputs and errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import cli
import fast_layers
import layers
import nn as numpy_nn
import train
import train_pytorch as tp
from conftest import ROOT, make_synthetic_mnist

SCRIPT = os.path.join(ROOT, 'train_pytorch.py')
EPOCH_KEYS = {'epoch', 'lr', 'train_loss', 'train_acc', 'train_precision', 'train_recall', 'valid_loss', 'valid_acc',
              'valid_precision', 'valid_recall', 'reg_loss', 'seconds', 'images_per_second'}
RESULT_KEYS = {'script', 'config', 'machine', 'epochs', 'initial_loss', 'initial_reg_loss', 'initial_acc', 'test',
               'finished', 'seconds_per_epoch', 'images_per_second'}
NUMPY_SHAPES = {'conv1.weights': (16, 25), 'conv1.bias': (16,), 'conv2.weights': (32, 400), 'conv2.bias': (32,),
                'fc3.weights': (512, 1568), 'fc3.bias': (512,), 'logits.weights': (10, 512), 'logits.bias': (10,)}


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def mnist_5200(tmp_path_factory):
    """Synthetic MNIST files with enough training images for the 5000 validation images prepare_mnist keeps."""
    return make_synthetic_mnist(str(tmp_path_factory.mktemp('data')), num_train=5200, num_test=100)


def synthetic_batches(num_images, seed=0):
    """MNIST-like float64 images (bright bars on integer noise, so with ties) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num_images)
    images = rng.integers(0, 60, (num_images, 1, 28, 28)).astype(np.float64)
    for image, label in zip(images, labels):
        image[0, 2 + 2 * label:4 + 2 * label, 4:24] = 255
    images /= 255
    return images - images.mean(), labels.astype(np.int64)


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize('module', [layers, fast_layers], ids=['textbook', 'fast'])
def test_twenty_sgd_steps_match_numpy_in_float64(module):
    x, y = synthetic_batches(20 * 25)
    rows, weight_diffs = tp.compare_with_numpy(x, y, steps=20, batch_size=25, lr=0.1, weight_decay=1e-2, seed=3,
                                               layers=module)
    assert [row[0] for row in rows] == list(range(1, 21))
    for step, numpy_loss, torch_loss, diff in rows:
        assert abs(numpy_loss - torch_loss) <= 1e-8 * abs(numpy_loss), step
        assert diff <= 1e-8
    assert set(weight_diffs) == set(NUMPY_SHAPES)
    assert max(weight_diffs.values()) <= 1e-8
    assert rows[-1][1] < rows[0][1] - 0.3  # it trained, so the comparison covered real updates


def test_weight_decay_is_the_gradient_of_the_l2_term():
    """Independent of the NumPy side: SGD with the parameter groups == plain SGD on cross-entropy + (lambda/2) sum w^2
    over conv1, conv2 and fc3 weights, differentiated by autograd."""
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in synthetic_batches(8))
    model = tp.LabMnistNet().double()
    reference = tp.LabMnistNet().double()
    reference.load_state_dict(model.state_dict())
    optimizer = tp.make_optimizer(model, lr=0.1, weight_decay=0.05)
    expected_penalty = 0.5 * 0.05 * sum(getattr(reference, name).weight.square().sum() for name in ('conv1', 'conv2', 'fc3'))
    assert tp.reg_loss(optimizer) == pytest.approx(expected_penalty.item(), rel=1e-12)

    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    loss = F.cross_entropy(reference(x), y) + expected_penalty
    loss.backward()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            torch.testing.assert_close(dict(model.named_parameters())[name], param - 0.1 * param.grad,
                                       rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- initialisation and weights on disk

def test_init_is_the_labs():
    torch.manual_seed(0)
    model = tp.LabMnistNet()
    for name, fan_in in (('conv1', 25), ('conv2', 400), ('fc3', 1568)):
        layer = getattr(model, name)
        assert torch.all(layer.bias == 0), name
        std = np.sqrt(2 / fan_in)  # He: kaiming_normal_, fan_in, relu
        assert layer.weight.std().item() == pytest.approx(std, rel=0.15), name
        assert abs(layer.weight.mean().item()) < 0.2 * std, name
    assert model.fc3.weight.abs().max().item() > 3 * np.sqrt(2 / 1568)  # a normal, not truncated at 2 sigma
    bound = 1 / np.sqrt(512)  # nn.Linear's default: uniform in +-1/sqrt(fan_in), weights and bias
    assert 0.99 * bound < model.logits.weight.abs().max().item() <= bound
    assert 0 < model.logits.bias.abs().max().item() <= bound


def test_weights_round_trip_between_the_frameworks(tmp_path):
    np.random.seed(5)
    net = train.make_net(fast_layers, 4, np.float64)
    numpy_nn.save_params(net, str(tmp_path / 'numpy.npz'))
    model = tp.LabMnistNet().double()
    tp.load_numpy_layout(model, checkpoint.load_npz(str(tmp_path / 'numpy.npz')), 'test')
    x, _ = synthetic_batches(4)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), numpy_nn.forward_pass(net, x),
                               rtol=1e-12, atol=1e-12)

    tp.save_numpy_layout(model, str(tmp_path / 'torch.npz'))
    saved = checkpoint.load_npz(str(tmp_path / 'torch.npz'))
    assert {key: value.shape for key, value in saved.items()} == NUMPY_SHAPES
    np.random.seed(6)
    other = train.make_net(fast_layers, 4, np.float64)
    numpy_nn.load_params(other, str(tmp_path / 'torch.npz'))
    for key, value in numpy_nn.parameters(net).items():
        np.testing.assert_array_equal(numpy_nn.parameters(other)[key], value)


@pytest.mark.parametrize('broken, needle', [
    ('missing', ["'fc3.bias'", '(512,)']),
    ('shape', ["'conv1.weights'", '(16, 9)', '(16, 25)']),
])
def test_bad_init_from_is_one_line_exit_2(tmp_path, broken, needle):
    params = {key: np.zeros(shape, np.float32) for key, shape in NUMPY_SHAPES.items()}
    if broken == 'missing':
        del params['fc3.bias']
    else:
        params['conv1.weights'] = np.zeros((16, 9), np.float32)
    np.savez(tmp_path / 'init.npz', **params)
    result = run_script('--init-from', str(tmp_path / 'init.npz'), '--save-dir', str(tmp_path / 'runs'),
                        '--data-dir', str(tmp_path / 'nowhere'))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in needle:
        assert text in result.stderr
    assert not os.path.exists(tmp_path / 'runs')  # refused before any work


# ----------------------------------------------------------------------------- devices

@pytest.mark.skipif(torch.cuda.is_available(), reason='tests the behaviour without a GPU')
def test_device_without_gpu(tmp_path):
    assert cli.torch_device('auto') == torch.device('cpu')
    result = run_script('--device', 'cuda', '--save-dir', str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and 'CUDA' in result.stderr


# ----------------------------------------------------------------------------- data and the script end to end

def test_the_batches_are_the_numpy_scripts_for_the_same_seed(tmp_path, mnist_5200, monkeypatch):
    """train_pytorch.py and train.py draw the same order from the same seed, so they see the same batches."""
    seen = {}
    real_cross_entropy = tp.F.cross_entropy
    monkeypatch.setattr(tp.F, 'cross_entropy', lambda logits, y, **kw: (
        seen.setdefault('torch', []).append(y.tolist()) if logits.requires_grad else None,
        real_cross_entropy(logits, y, **kw))[1])
    flags = ['--data-dir', mnist_5200, '--limit', '40', '--batch-size', '10', '--epochs', '2', '--draw-every', '1000']
    tp.main(flags + ['--save-dir', str(tmp_path), '--run-name', 'torch', '--device', 'cpu'])
    mnist = train.mnist_split(train.parse_args(flags))
    rng = np.random.default_rng(42)  # the scripts' default seed, the order's own generator (run.Run)
    expected = [mnist['train_y'][order[i * 10:(i + 1) * 10]].tolist()
                for order in (rng.permutation(40), rng.permutation(40)) for i in range(4)]
    assert seen['torch'] == expected


def test_quick_run_writes_everything(tmp_path, mnist_5200):
    np.random.seed(1)
    net = train.make_net(fast_layers, 50, np.float32)
    numpy_nn.save_params(net, str(tmp_path / 'numpy_init.npz'))
    result = run_script('--data-dir', mnist_5200, '--save-dir', str(tmp_path), '--run-name', 'quick',
                        '--limit', '100', '--epochs', '3', '--batch-size', '20', '--lr-policy', '1:0.1,2:0.05,3:0.01',
                        '--draw-every', '2', '--init-from', str(tmp_path / 'numpy_init.npz'), '--tensorboard')
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'quick'
    results = json.loads((run_dir / 'results.json').read_text())
    assert set(results) == RESULT_KEYS
    assert [set(row) for row in results['epochs']] == [EPOCH_KEYS] * 3
    assert [row['lr'] for row in results['epochs']] == [0.1, 0.05, 0.01]  # the policy, through the LR scheduler
    assert results['config']['limit'] == 100 and results['config']['weight_decay'] == 1e-3
    for row in results['epochs']:
        assert 0 <= row['train_acc'] <= 1 and 0 <= row['valid_acc'] <= 1 and row['reg_loss'] > 0
    assert 0 <= results['test']['accuracy'] <= 1 and results['initial_loss'] > np.log(10) * 0.8
    assert results['images_per_second'] > 0 and results['seconds_per_epoch'] > 0

    # the initial weights are the NumPy ones given, bit for bit, and both files are in the NumPy layout
    init = checkpoint.load_npz(str(run_dir / 'init_weights.npz'))
    for key, value in numpy_nn.parameters(net).items():
        np.testing.assert_array_equal(init[key], value)
    assert {k: v.shape for k, v in checkpoint.load_npz(str(run_dir / 'weights.npz')).items()} == NUMPY_SHAPES

    files = set(os.listdir(run_dir))
    steps = [f'conv1_epoch_{e:02d}_step_{s:06d}.png' for e, s in ((0, 0), (1, 2), (1, 4), (1, 5), (2, 10), (3, 15))]
    assert set(steps) <= files
    assert {'training_plot.png', 'log.csv', 'tensorboard'} <= files
    assert os.listdir(run_dir / 'tensorboard')
    log = (run_dir / 'log.csv').read_text().splitlines()
    assert log[0].split(',') == list(results['epochs'][0]) and len(log) == 4


def test_sweep(tmp_path, mnist_5200):
    result = run_script('--data-dir', mnist_5200, '--save-dir', str(tmp_path), '--run-name', 'sweep',
                        '--limit', '40', '--batch-size', '20', '--epochs', '1', '--sweep', '0', '0.1')
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / 'sweep' / 'sweep.json').read_text())['rows']
    assert [row['weight_decay'] for row in rows] == [0, 0.1]
    assert rows[0]['reg_loss'] == 0 and rows[1]['reg_loss'] > 0
    for name, weight_decay in (('wd_0', 0), ('wd_0.1', 0.1)):
        assert json.loads((tmp_path / 'sweep' / name / 'results.json').read_text())['config']['weight_decay'] == weight_decay
    table = (tmp_path / 'sweep' / 'sweep.md').read_text().splitlines()
    assert len(table) == 9 and 'mean abs conv1 weight' in table[0] and 'roughness' in table[0]
    assert table[-2].startswith('- lambda = 0: the weights are') and table[-1].startswith('- lambda = 0.1:')


def test_compare_numpy_cli(mnist_5200, tmp_path):
    result = run_script('--compare-numpy', '--steps', '3', '--data-dir', mnist_5200, '--save-dir', str(tmp_path),
                        '--run-name', 'cmp')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = [line.split() for line in lines if line.split() and line.split()[0] in ('1', '2', '3')]
    assert len(table) == 3 and all(float(row[3]) <= 1e-8 for row in table)
    assert lines[-1].endswith('-> EQUAL')
    saved = json.loads((tmp_path / 'cmp' / 'compare_numpy.json').read_text())
    assert saved['verdict'] == 'EQUAL' and [f"{row['rel_diff']:.2e}" for row in saved['steps']] == [r[3] for r in table]


@pytest.mark.integration
def test_learns_real_mnist(tmp_path, mnist_dir):
    result = run_script('--data-dir', mnist_dir, '--save-dir', str(tmp_path), '--run-name', 'real',
                        '--limit', '2000', '--epochs', '1')
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / 'real' / 'results.json').read_text())
    assert results['epochs'][-1]['valid_acc'] > 0.8
