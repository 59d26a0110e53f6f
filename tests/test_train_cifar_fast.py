"""train_cifar_fast.py: tensor augmentation, whitening, schedule, an end-to-end run on synthetic data whose saved
model reproduces the reported accuracy, bad input, and two torchrun processes that end with identical weights."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import metrics
from conftest import ROOT
from train_cifar_fast import FastNet, TTAModel, augment, one_cycle, parse_args, shift, state_sha256

SCRIPT = os.path.join(ROOT, 'train_cifar_fast.py')
TINY = ['--device', 'cpu', '--widths', '8,16,16', '--batch-size', '16', '--valid-size', '50', '--tta', '1',
        '--warmup-steps', '2', '--threads', '1']


def _images(n=64, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_flip_is_a_mirror_image_of_about_half_the_images():
    x = _images()
    out = augment(x, torch.Generator().manual_seed(1), translate=0)
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)
    assert 16 < flipped.sum() < 48


def test_translation_cuts_every_image_out_of_its_reflect_padded_copy():
    x, pad = _images(), 2
    out = augment(x, torch.Generator().manual_seed(2), translate=pad, flip=False)
    assert out.shape == x.shape
    padded = F.pad(x, (pad,) * 4, mode='reflect')
    offsets = []
    for o, p in zip(out, padded):  # the oracle: try every offset
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(o, p[:, dy:dy + 8, dx:dx + 8])]
        assert found, "an output image is no window of the padded input"
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # the offsets vary


def test_augmentation_is_deterministic_under_a_seed():
    x = _images()
    a = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))


def test_shift_moves_the_image():
    x = _images(2)
    assert torch.equal(shift(x, 1, 1)[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert torch.equal(shift(x, -1, -1)[:, :, :-1, :-1], x[:, :, 1:, 1:])


def test_tta_averages_the_logits_of_the_views():
    model = FastNet((8, 8, 8)).eval()
    x = torch.randn(4, 3, 32, 32)
    views = {0: [x], 1: [x, x.flip(3)], 2: [x, x.flip(3), shift(x, -1, -1), shift(x.flip(3), 1, 1)]}
    with torch.no_grad():
        for level, images in views.items():
            expected = torch.stack([model(v) for v in images]).mean(dim=0)
            got = TTAModel(model, level, contextlib.nullcontext)(x)
            torch.testing.assert_close(got, expected)


def test_whitening_decorrelates_the_patches():
    # correlated channels and neighbouring pixels, like photographs
    base = torch.randn(200, 1, 17, 17, generator=torch.Generator().manual_seed(5))
    smooth = F.avg_pool2d(base, 2, stride=1)
    images = torch.cat([smooth, 0.5 * smooth + 0.1 * torch.randn_like(smooth), -smooth], dim=1)
    model = FastNet((8, 8, 8))
    model.init_whitening(images, eps=1e-6)
    with torch.no_grad():
        features = F.conv2d(images, model.whiten.weight[:12]).transpose(0, 1).reshape(12, -1)
    covariance = torch.cov(features)
    assert model.whiten.weight.requires_grad is False
    torch.testing.assert_close(model.whiten.weight[12:], -model.whiten.weight[:12])
    # eigenvalues far above eps come out as 1, the rest (near-zero directions) shrink towards 0
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    assert off_diagonal.abs().max() < 1e-3
    assert torch.diag(covariance).max() < 1 + 1e-3 and (torch.diag(covariance) > 0.99).sum() >= 6


def test_one_cycle_schedule():
    assert one_cycle(0, 0.2) == pytest.approx(0.1)
    assert one_cycle(0.1, 0.2) == pytest.approx(0.55)
    assert one_cycle(0.2, 0.2) == pytest.approx(1)
    assert one_cycle(0.6, 0.2) == pytest.approx(0.5)
    assert one_cycle(1, 0.2) == 0


def test_presets_fill_only_what_is_not_given():
    args = parse_args(['--preset', 'gpu', '--lr', '0.3'])
    assert args.widths == (64, 256, 256) and args.batch_size == 1024 and args.lr == 0.3
    assert parse_args([]).widths == (64, 128, 256)


def _run(*args, launcher=()):
    return subprocess.run([sys.executable, *launcher, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def test_run_writes_results_and_its_model_reproduces_the_reported_accuracy(synthetic_cifar, tmp_path):
    result = _run('--data-dir', synthetic_cifar, '--save-dir', str(tmp_path), '--run-name', 'r', '--epochs', '2',
                  '--eval-every', '1', *TINY)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'r'
    assert (run_dir / 'time_to_accuracy.png').stat().st_size > 0
    results = json.loads((run_dir / 'results.json').read_text())
    run = results['runs'][0]
    assert results['data'] == 'CIFAR-10 (JPEG stand-in)'  # not the published files
    assert len(results['load_average_at_start']) == 3 and len(results['load_average_at_end']) == 3
    assert len(run['load_average_at_start']) == 3 and len(run['load_average_at_end']) == 3
    steps_per_epoch = 200 // 16 + 1  # 150 training + 50 validation images, trained on too
    assert run['steps'] == 2 * steps_per_epoch and run['history']['step'] == [steps_per_epoch, 2 * steps_per_epoch]
    assert run['history']['seconds'][0] < run['history']['seconds'][1] == run['train_seconds']
    assert set(run['seconds_to_accuracy']) == {'85%', '90%', '94%'}
    assert run['test_accuracy'] == run['history']['test_acc'][-1] == results['summary']['test_accuracy_mean']

    state = torch.load(run_dir / 'model_seed0.pt', weights_only=True)
    assert state_sha256(state) == run['weights_sha256_per_process'][0]['ema_sha256']
    model = FastNet((8, 16, 16))
    model.load_state_dict(state)
    model.to(memory_format=torch.channels_last)  # the same kernels as in training, so the same bf16 rounding
    prepared = data.prepare_cifar10(synthetic_cifar, valid_size=50)
    autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16)  # noqa: E731
    scores = metrics.evaluate(TTAModel(model, 1, autocast), torch.from_numpy(prepared['test_x']),
                              torch.from_numpy(prepared['test_y']))
    assert scores['accuracy'] == run['test_accuracy']
    np.testing.assert_array_equal(scores['confusion'], run['test_confusion'])


@pytest.mark.parametrize('bad, message', [(['--widths', '8,16'], 'three'), (['--precision', 'fp16'], 'cuda'),
                                          (['--batch-size', '0'], 'positive')])
def test_bad_input_is_one_line(bad, message, tmp_path):
    result = _run('--data-dir', str(tmp_path), '--save-dir', str(tmp_path), '--device', 'cpu', *bad)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_end_with_identical_weights(synthetic_cifar, tmp_path):
    launcher = ('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}')
    result = _run('--data-dir', synthetic_cifar, '--save-dir', str(tmp_path), '--run-name', 'ddp', '--epochs', '1',
                  *TINY, launcher=launcher)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    assert results['config']['world_size'] == 2
    run = results['runs'][0]
    rank0, rank1 = run['weights_sha256_per_process']
    assert rank0 == rank1  # trained weights, BN statistics and their EMA, bit for bit
    assert run['steps'] == 200 // 2 // 8 + 1  # each process: 100 images of its shard, 8 per step
    state = torch.load(tmp_path / 'ddp' / 'model_seed0.pt', weights_only=True)
    assert state_sha256(state) == rank0['ema_sha256']


def test_bench_prints_speeds_and_plots_given_runs(tmp_path):
    history = {'seconds': [10.0, 20.0], 'test_acc': [0.8, 0.9], 'train_loss': [1.2, 1.0]}
    run = {'seed': 0, 'history': history, 'test_accuracy': 0.9, 'train_seconds': 20.0,
           'seconds_to_accuracy': {'85%': 20.0, '90%': 20.0, '94%': None}}
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'results.json').write_text(json.dumps(
        {'script': 'train_cifar_fast.py', 'data': 'CIFAR-10 (JPEG stand-in)', 'runs': [run], 'summary': {}}))
    bench = os.path.join(ROOT, 'bench_cifar.py')
    common = ['--device', 'cpu', '--widths', '8,8,8', '--batch-size', '16', '--images', '50', '--rounds', '1',
              '--threads', '1', '--save-dir', str(tmp_path)]
    result = subprocess.run([sys.executable, bench, str(tmp_path / 'a'), *common, '--run-name', 'b'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'lab ConvNet' in result.stdout and 'a seed 0: test accuracy 90.00% (CIFAR-10 (JPEG stand-in))' in result.stdout
    assert (tmp_path / 'b' / 'time_to_accuracy.png').stat().st_size > 0
    speeds = json.loads((tmp_path / 'b' / 'results.json').read_text())['speeds']
    assert len(speeds) == 3 and all(s['images_per_second'] > 0 and s['training_gflops_per_image'] > 0
                                    for s in speeds.values())
    missing = subprocess.run([sys.executable, bench, str(tmp_path / 'nothing'), *common], capture_output=True, text=True)
    assert missing.returncode == 2 and 'not a train_cifar_fast.py run' in missing.stderr
