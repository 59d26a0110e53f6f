"""train.py and train_l2reg.py: the lr policy, seeding, the NaN guard, results.json, and (integration) a short
run on the real MNIST. Bad input on the command line: test_bad_input.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import checkpoint
import cli
import data
import fast_layers
import layers
import nn
import train
import train_l2reg
from conftest import ROOT, make_synthetic_mnist
from run import Diverged, Run

EPOCH_KEYS = ['epoch', 'lr', 'train_loss', 'train_acc', 'train_precision', 'train_recall', 'valid_loss',
              'valid_acc', 'valid_precision', 'valid_recall', 'reg_loss', 'seconds', 'images_per_second']
RESULT_KEYS = ['script', 'config', 'machine', 'epochs', 'initial_loss', 'initial_reg_loss', 'initial_acc', 'answers',
               'test', 'finished', 'seconds_per_epoch', 'images_per_second']


@pytest.fixture(scope='module')
def small_mnist(tmp_path_factory):
    """Synthetic MNIST, split small enough to train on in a second: 200 train, 100 validation, 50 test."""
    root = make_synthetic_mnist(str(tmp_path_factory.mktemp('mnist')), num_train=300, num_test=50)
    return data.prepare_mnist(root, np.float32, valid_size=100, download=False)


def parse(*flags):
    return train.make_parser().parse_args(['--draw-every', '1000', *flags])


def train_small(mnist, run_dir, policy='1:0.1', epochs=2, net=None):
    """nn.train on the lab's net (fast layers, seed 0) -> (net, results)."""
    np.random.seed(0)
    net = net or train.make_net(fast_layers, 50, np.float32)
    run = Run(str(run_dir), 0, False, epochs, len(mnist['train_x']), 50, arrays=nn.parameters(net))
    with np.errstate(over='ignore', invalid='ignore'):  # as train.train_model runs it
        nn.train(net, layers.SoftmaxCrossEntropyWithLogits(), mnist, run, batch_size=50,
                 lr_policy=cli.lr_policy(policy), draw_every=1000)
    return net, run.results


def test_the_lab_lr_policy():
    policy = cli.lr_policy(train.LR_POLICY)
    assert [nn.lr_at(policy, epoch) for epoch in range(1, 9)] == [1e-1, 1e-1, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4]
    assert train.make_parser().parse_args([]).lr_policy == policy  # the scripts' default


def test_train_steps_with_the_policy_lr(small_mnist, tmp_path, monkeypatch):
    used = []
    real_update = nn.sgd_update_params
    monkeypatch.setattr(nn, 'sgd_update_params', lambda grads, config: (used.append(config['lr']),
                                                                         real_update(grads, config)))
    _, results = train_small(small_mnist, tmp_path, policy='1:0.1,2:0.01,3:0.001', epochs=3)
    assert used == [0.1] * 4 + [0.01] * 4 + [0.001] * 4  # 200 images / 50 = 4 steps per epoch
    assert [record['lr'] for record in results['epochs']] == [0.1, 0.01, 0.001]


def test_same_seed_same_numbers(small_mnist, tmp_path):
    def run(seed, name):
        args = parse('--seed', str(seed), '--epochs', '1')
        results, net = train.train_model(args, small_mnist, str(tmp_path / name))
        losses = [(r['train_loss'], r['valid_loss'], r['valid_acc']) for r in results['epochs']]
        return results['initial_loss'], losses, nn.parameters(net)

    for name in ('a', 'b', 'c'):
        os.makedirs(tmp_path / name)
    first, again, other = run(1, 'a'), run(1, 'b'), run(2, 'c')
    assert first[:2] == again[:2]
    for key, value in first[2].items():
        np.testing.assert_array_equal(value, again[2][key])
    assert first[0] != other[0] and first[1] != other[1]


def test_results_json_schema_and_outputs(small_mnist, tmp_path):
    results, _ = train.train_model(parse('--epochs', '2'), small_mnist, str(tmp_path))
    with open(tmp_path / 'results.json') as f:
        saved = json.load(f)
    assert list(saved) == RESULT_KEYS
    assert [list(record) for record in saved['epochs']] == [EPOCH_KEYS] * 2
    assert saved['config']['epochs'] == 2 and saved['config']['batch_size'] == 50
    for record in saved['epochs']:
        assert 0 <= record['train_acc'] <= 1 and 0 <= record['valid_acc'] <= 1 and record['reg_loss'] == 0
    assert 0 <= saved['test']['accuracy'] <= 1 and saved['script'] == 'train.py'
    assert saved['epochs'][-1]['train_loss'] < saved['initial_loss']  # it learned something
    # the initial loss of a fresh net is about ln(10): a nearly uniform softmax over 10 classes
    assert abs(saved['initial_loss'] - np.log(10)) < 0.3
    for name in ('init_weights.npz', 'weights.npz', 'training_plot.png', 'conv1_epoch_00_step_000000.png',
                 'conv1_epoch_02_step_000008.png'):
        assert (tmp_path / name).is_file(), name


def test_regularized_losses_add_up(small_mnist, tmp_path):
    results, net = train.train_model(parse('--epochs', '1'), small_mnist, str(tmp_path),
                                     lambda net, module: train_l2reg.regularized_loss(net, 0.01, module))
    record = results['epochs'][0]
    weights = nn.parameters(net)
    expected_reg = 0.005 * sum(np.sum(weights[f'{name}.weights'].astype(np.float64) ** 2)
                               for name in ('conv1', 'conv2', 'fc3'))
    assert record['reg_loss'] == pytest.approx(expected_reg, rel=1e-5)
    # the recorded losses are the cross-entropy alone: the L2 term is recorded beside them
    plain = nn.evaluate(net, layers.SoftmaxCrossEntropyWithLogits(), small_mnist['train_x'], small_mnist['train_y'])
    assert record['train_loss'] == pytest.approx(plain['loss'], rel=1e-6)


def test_injected_nan_stops_at_the_first_step(small_mnist, tmp_path):
    np.random.seed(0)
    net = train.make_net(fast_layers, 50, np.float32)
    net[0].weights[0, 0] = np.nan
    with pytest.raises(Diverged, match=r'nan at epoch 1, step 1;.*after epoch 0'):
        train_small(small_mnist, tmp_path, epochs=1, net=net)
    assert not (tmp_path / 'results.json').exists()


def test_huge_lr_stops_training_and_keeps_the_last_good_weights(small_mnist, tmp_path):
    with pytest.raises(Diverged, match=r'epoch 2.*after epoch 1'):
        train_small(small_mnist, tmp_path, policy='1:0.01,2:1e9', epochs=2)
    saved = checkpoint.load_npz(str(tmp_path / checkpoint.NPZ))  # epoch 1's weights, untouched by epoch 2
    assert all(np.isfinite(saved[key]).all() for key in saved if key != 'run')
    with open(tmp_path / 'results.json') as f:
        assert [record['epoch'] for record in json.load(f)['epochs']] == [1]


def run_script(*args, script='train.py'):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_summary_only_answers_the_model_questions_without_data(tmp_path):
    result = run_script('--summary-only', '--save-dir', str(tmp_path), '--run-name', 's')
    assert result.returncode == 0 and '821,706' in result.stdout and '14x14' in result.stdout
    assert sorted(os.listdir(tmp_path / 's')) == ['config.json', 'net.png', 'summary.json']
    saved = json.loads((tmp_path / 's' / 'summary.json').read_text())
    assert saved['memory']['activations'] == 1_502_100 and [row['name'] for row in saved['layers']][:2] == ['input', 'conv1']


def test_sweep_writes_the_comparison(small_mnist, tmp_path, capsys):
    args = train_l2reg.make_parser().parse_args(['--epochs', '1', '--draw-every', '1000', '--sweep', '0', '0.1'])

    def train_one(run_args, run_dir):
        results, net = train.train_model(run_args, small_mnist, run_dir,
                                         lambda net, module: train_l2reg.regularized_loss(net, run_args.weight_decay,
                                                                                          module))
        return results, nn.parameters(net)
    rows = train_l2reg.sweep(args, str(tmp_path), train_one)
    for name in ('sweep.json', 'sweep.md', 'sweep_filters.png'):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / 'sweep.json') as f:
        assert json.load(f)['rows'] == rows
    assert [row['weight_decay'] for row in rows] == [0, 0.1]
    for row, folder in zip(rows, ('wd_0', 'wd_0.1')):
        with open(tmp_path / folder / 'results.json') as f:
            results = json.load(f)
        assert results['config']['weight_decay'] == row['weight_decay']
        assert row['test_acc'] == results['test']['accuracy'] and row['reg_loss'] == results['epochs'][-1]['reg_loss']
        with np.load(tmp_path / folder / 'weights.npz') as weights:
            assert row['conv1_mean_abs_weight'] == pytest.approx(np.abs(weights['conv1.weights']).mean())
    assert rows[0]['reg_loss'] == 0 < rows[1]['reg_loss']
    with np.load(tmp_path / 'wd_0' / 'init_weights.npz') as a, np.load(tmp_path / 'wd_0.1' / 'init_weights.npz') as b:
        np.testing.assert_array_equal(a['conv1.weights'], b['conv1.weights'])  # every lambda starts alike
    table = capsys.readouterr().out
    assert '| 0.1 |' in table and '| 0.1 |' in (tmp_path / 'sweep.md').read_text()


@pytest.mark.integration
def test_quick_run_on_real_mnist(mnist_dir, tmp_path):
    result = run_script('--data-dir', mnist_dir, '--save-dir', str(tmp_path), '--run-name', 'q',
                        '--limit', '2000', '--epochs', '1', '--draw-every', '20')
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'q'
    with open(run_dir / 'results.json') as f:
        results = json.load(f)
    assert results['epochs'][-1]['valid_acc'] > 0.8
    assert results['test']['accuracy'] > 0.8
    for name in ('init_weights.npz', 'weights.npz', 'training_plot.png', 'conv1_epoch_00_step_000000.png',
                 'conv1_epoch_01_step_000020.png', 'conv1_epoch_01_step_000040.png'):
        assert (run_dir / name).is_file(), name
    assert 'ln 10 = 2.3026' in result.stdout and result.stdout.startswith('textbook layers (layers.py), float32')


def test_a_redirected_log_holds_whole_lines_and_no_progress_bars(tmp_path):
    """stdout and stderr both into one file, as `python train.py > log.txt 2>&1` does."""
    data_dir = make_synthetic_mnist(str(tmp_path / 'data'), num_train=300, num_test=50)
    with open(tmp_path / 'log.txt', 'w') as log:
        result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--data-dir', data_dir,
                                 '--save-dir', str(tmp_path), '--run-name', 'r', '--valid-size', '100',
                                 '--epochs', '2', '--batch-size', '20'], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, timeout=300)
    assert result.returncode == 0
    text = (tmp_path / 'log.txt').read_text()
    assert '\r' not in text and 'it/s' not in text and '\x1b' not in text
    epoch_lines = [line for line in text.splitlines() if 'epoch' in line and 'valid loss' in line]
    assert [line.split(':')[0] for line in epoch_lines] == ['epoch 1/2', 'epoch 2/2']


@pytest.mark.parametrize('reg_loss, loss_title, fourth_panel', [
    ([0.0, 0.0], 'Cross-entropy loss', None),
    ([0.43, 0.31], 'Cross-entropy loss (data term, without L2)', 'L2 term (lambda/2) * sum of squared weights')])
def test_the_training_plot_says_what_it_plots(tmp_path, monkeypatch, reg_loss, loss_title, fourth_panel):
    import plots
    saved = {}
    monkeypatch.setattr(plots, '_save', lambda fig, path, title=None: saved.update(
        titles=[ax.get_title() for ax in fig.axes if ax.axison], lines=[ax.get_lines() for ax in fig.axes]))
    history = {'train_loss': [0.2, 0.1], 'valid_loss': [0.25, 0.15], 'train_acc': [0.9, 0.95],
               'valid_acc': [0.88, 0.93], 'lr': [0.1, 0.01], 'reg_loss': reg_loss}
    plots.plot_training_progress(str(tmp_path), history)
    assert saved['titles'] == [loss_title, 'Accuracy', 'Learning rate'] + ([fourth_panel] if fourth_panel else [])
    # the loss panel draws the data loss alone, never data + L2
    assert [list(line.get_ydata()) for line in saved['lines'][0]] == [history['train_loss'], history['valid_loss']]
