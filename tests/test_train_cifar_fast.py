"""train_cifar_fast.py: tensor augmentation, whitening, schedule, time budget, EMA, sharding, end-to-end runs on
synthetic data (SGD and Muon) whose saved model reproduces the reported accuracy, bad input, and two torchrun
processes that end with identical weights; bench_cifar.py's speeds and plots."""
import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import data
import metrics
import readback
from conftest import ROOT, truncate
from distributed import Distributed
from train_cifar_fast import (EMA_EVERY, WHITEN_BIAS_STEPS, Clock, FastNet, Schedule, TTAModel, alternating_flips,
                              augment, autocast_for, make_optimizers, one_cycle, parse_args, set_lr, shift,
                              shuffled_batches, state_sha256, update_ema)

SCRIPT = os.path.join(ROOT, 'train_cifar_fast.py')
TINY = ['--device', 'cpu', '--widths', '8,16,16', '--batch-size', '16', '--valid-size', '50', '--tta', '1',
        '--warmup-steps', '2', '--threads', '1']


def _images(n=64, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_flip_mirrors_exactly_the_images_it_is_told_to():
    x = _images()
    mirrored = torch.arange(len(x)) % 3 == 0
    out = augment(x, torch.Generator().manual_seed(1), translate=0, mirrored=mirrored)
    for o, xi, m in zip(out, x, mirrored):
        assert torch.equal(o, xi.flip(2) if m else xi)


def test_alternating_flips_show_every_image_both_ways_over_two_epochs():
    flips = alternating_flips(1000, seed=0, device='cpu')
    assert 400 < flips(0).sum() < 600
    assert torch.equal(flips(1), ~flips(0)) and torch.equal(flips(2), flips(0)) and torch.equal(flips(3), flips(1))
    assert torch.equal(alternating_flips(1000, seed=0, device='cpu')(0), flips(0))  # drawn from the seed
    assert not torch.equal(alternating_flips(1000, seed=1, device='cpu')(0), flips(0))


def test_translation_cuts_every_image_out_of_its_reflect_padded_copy():
    x, pad = _images(), 2
    out = augment(x, torch.Generator().manual_seed(2), translate=pad)
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


def test_tta_weights_the_logits_of_the_views_as_augmentation_would_draw_them():
    model = FastNet((8, 8, 8)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = {view: model(image) for view, image in
                  {'x': x, 'mirror': x.flip(3), 'up-left': shift(x, -1, -1), 'up-left mirror': shift(x, -1, -1).flip(3),
                   'down-right': shift(x, 1, 1), 'down-right mirror': shift(x, 1, 1).flip(3)}.items()}
        weights = {0: {'x': 1}, 1: {'x': 1 / 2, 'mirror': 1 / 2},
                   2: {'x': 1 / 4, 'mirror': 1 / 4, 'up-left': 1 / 8, 'up-left mirror': 1 / 8, 'down-right': 1 / 8,
                       'down-right mirror': 1 / 8}}
        for level, weight in weights.items():
            expected = sum(w * logits[view] for view, w in weight.items())
            torch.testing.assert_close(TTAModel(model, level, contextlib.nullcontext)(x), expected)


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
    args = parse_args(['--preset', 'gpu', '--head-lr', '0.3', '--optimizer', 'sgd'])
    assert args.widths == (64, 256, 256) and args.batch_size == 2000 and args.epochs == 10 and args.head_lr == 0.3
    assert args.optimizer == 'sgd' and args.muon_lr == 0.24 and args.muon_momentum == 0.6
    defaults = parse_args([])
    assert defaults.widths == (64, 256, 256) and defaults.batch_size == 500 and defaults.epochs == 7
    assert defaults.optimizer == 'muon' and defaults.muon_lr == 0.06 and defaults.muon_momentum == 0.8
    assert defaults.seed == 42 and defaults.label_smoothing == 0.2 and defaults.warmup == 0 and defaults.ema == 0


def test_the_whitening_bias_stops_training_early_and_every_lr_reaches_zero_at_the_end():
    args = parse_args([])
    optimizers = make_optimizers(FastNet((8, 8, 8)), args)
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    whiten = next(group for group in groups if group['horizon'] != 1)
    assert whiten['horizon'] == WHITEN_BIAS_STEPS and len(whiten['params']) == 1
    set_lr(optimizers, WHITEN_BIAS_STEPS / 2, args.warmup)
    assert whiten['lr'] == pytest.approx(whiten['peak_lr'] / 2)
    assert all(g['lr'] == pytest.approx(g['peak_lr'] * (1 - WHITEN_BIAS_STEPS / 2)) for g in groups if g is not whiten)
    set_lr(optimizers, (1 + WHITEN_BIAS_STEPS) / 2, args.warmup)
    assert whiten['lr'] == 0 and all(g['lr'] > 0 for g in groups if g is not whiten)
    set_lr(optimizers, 1.0, args.warmup)
    assert all(g['lr'] == 0 for g in groups)


def _budget_schedule(budget, clock):
    args = argparse.Namespace(time_budget=budget, epochs=None)
    speed = {'warmup_seconds': 2.0, 'final_eval_seconds': 3.0, 'seconds_per_step': 1.0}
    return Schedule(args, 100, speed, clock, Distributed(torch.device('cpu')))


def test_time_budget_leaves_room_for_the_warm_up_and_the_final_evaluation():
    clock = Clock(torch.device('cpu'))
    schedule = _budget_schedule(15.0, clock)
    assert schedule.seconds == 10.0 and schedule.total_steps == 10
    clock.total = 8.5  # the next step (1 s) ends at 9.5 s of the 10 s left for training
    assert schedule.progress(0) == pytest.approx(0.95)
    clock.total = 9.5
    assert schedule.progress(0) == 1.0
    with pytest.raises(cli.UserError, match='used up'):
        _budget_schedule(5.0, clock)


def test_schedule_by_epochs_counts_steps():
    args = argparse.Namespace(time_budget=None, epochs=2.5)
    schedule = Schedule(args, 10, {'seconds_per_step': 1.0}, clock=None, ranks=None)
    assert schedule.total_steps == 25 and schedule.progress(5) == 0.2


def test_ema_moves_every_few_steps_towards_the_model():
    model = torch.nn.BatchNorm1d(3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    update_ema(ema, model, EMA_EVERY - 1, 0.98)
    assert torch.equal(ema.weight, torch.ones(3))  # not an update step
    update_ema(ema, model, EMA_EVERY, 0.98)
    decay = min(0.98, (1 + EMA_EVERY) / (10 + EMA_EVERY)) ** EMA_EVERY
    torch.testing.assert_close(ema.weight, torch.full((3,), decay * 1.0 + (1 - decay) * 2.0))
    assert ema.num_batches_tracked.item() == 7


def test_each_process_takes_a_disjoint_shard_of_every_epoch():
    epochs = {rank: [] for rank in range(2)}
    for rank in epochs:
        batches = shuffled_batches(11, 2, types.SimpleNamespace(world=2, rank=rank), seed=0, device='cpu')
        epochs[rank] = [[next(batches) for _ in range(3)] for _ in range(2)]  # 5 images: 2 + 2 + 1
        assert [epoch for batches_of_epoch in epochs[rank] for epoch, _ in batches_of_epoch] == [0, 0, 0, 1, 1, 1]
        epochs[rank] = [torch.cat([indices for _, indices in batches_of_epoch]) for batches_of_epoch in epochs[rank]]
    for epoch in range(2):
        shard0, shard1 = epochs[0][epoch], epochs[1][epoch]
        assert len(shard0) == len(shard1) == 5
        assert len(set(shard0.tolist()) | set(shard1.tolist())) == 10  # disjoint; one image left over
    assert not torch.equal(epochs[0][0], epochs[0][1])  # a new permutation every epoch


def _run(*args, launcher=()):
    return subprocess.run([sys.executable, *launcher, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize('optimizer', ['sgd', 'muon'])
def test_run_writes_results_and_its_model_reproduces_the_reported_accuracy(optimizer, synthetic_cifar, tmp_path):
    result = _run('--data-dir', synthetic_cifar, '--save-dir', str(tmp_path), '--run-name', 'r', '--epochs', '2',
                  '--eval-every', '1', '--optimizer', optimizer, *TINY)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'r'
    assert (run_dir / 'time_to_accuracy.png').stat().st_size > 0
    results = json.loads((run_dir / 'results.json').read_text())
    run = results['runs'][0]
    assert results['data'] == 'CIFAR-10 (JPEG stand-in)'  # not the published files
    assert results['config']['optimizer'] == optimizer and np.isfinite(run['test']['loss'])
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['script'] == 'train_cifar_fast.py' and config['args']['optimizer'] == optimizer
    assert results['machine']['cores'] >= 1 and results['machine']['torch'] == torch.__version__
    assert results['test'] == run['test']  # the model of --seed, in the shape of every training script's 'test'
    assert set(run['test']) == {'loss', 'accuracy', 'macro_precision', 'macro_recall', 'precision', 'recall',
                                'confusion'}
    assert list(run['test']['recall']) == data.CIFAR_CLASSES
    assert len(results['load_average_at_start']) == 3 and len(results['load_average_at_end']) == 3
    assert len(run['load_average_at_start']) == 3 and len(run['load_average_at_end']) == 3
    steps_per_epoch = 200 // 16 + 1  # 150 training + 50 validation images, trained on too
    assert run['steps'] == 2 * steps_per_epoch and run['history']['step'] == [steps_per_epoch, 2 * steps_per_epoch]
    assert run['history']['seconds'][0] < run['history']['seconds'][1] == run['train_seconds']
    assert set(run['seconds_to_accuracy']) == {'85%', '90%', '94%'}
    assert run['test']['accuracy'] == run['history']['test_acc'][-1] == results['summary']['test_accuracy_mean']
    assert run['budget_seconds'] == pytest.approx(run['warmup_seconds'] + run['train_seconds'] + run['final_eval_seconds'])

    state = torch.load(run_dir / 'model_seed42.pt', weights_only=True)
    assert state_sha256(state) == run['weights_sha256_per_process'][0]['ema_sha256']
    model = FastNet((8, 16, 16))
    model.load_state_dict(state)
    model.to(memory_format=torch.channels_last)  # the same kernels as in training, so the same bf16 rounding
    prepared = data.prepare_cifar10(synthetic_cifar, valid_size=50)
    scores = metrics.evaluate(TTAModel(model, 1, autocast_for(torch.device('cpu'), 'bf16')),
                              torch.from_numpy(prepared['test_x']),
                              torch.from_numpy(prepared['test_y']))
    assert scores['accuracy'] == run['test']['accuracy']
    np.testing.assert_array_equal(scores['confusion'], run['test']['confusion'])


@pytest.mark.parametrize('bad, message', [(['--widths', '8,16'], 'three'), (['--widths', 'a,b,c'], 'three'),
                                          (['--widths', '8,16,0'], 'three'), (['--batch-size', '0'], 'positive'),
                                          (['--label-smoothing', '1'], '[0, 1)'), (['--label-smoothing', '-0.1'], '>= 0'),
                                          (['--ema', '1.5'], '[0, 1)'), (['--optimizer', 'adam'], 'invalid choice')])
def test_bad_options_are_one_line_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(bad)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('flags, message', [
    (['--batch-size', '50001'], '--batch-size 50001 is larger than the 50000 training images of CIFAR-10'),
    (['--batch-size', '46000', '--holdout'],
     '--batch-size 46000 is larger than the 45000 training images that --holdout leaves of CIFAR-10'),
    (['--batch-size', '300', '--limit', '200'], '--batch-size 300 is larger than the 200 training images left by --limit'),
    (['--valid-size', '50000'], '--valid-size 50000 leaves no CIFAR-10 training images'),
    (['--threads', '4096'], '--threads 4096 is more than the '),
    (['--seed', str(2 ** 32 - 2), '--seeds', '3'],
     f'--seed {2 ** 32 - 2} with --seeds 3 goes past the largest seed, 2**32 - 1'),
    (['--device', 'cpu', '--widths', '1024,1024,1024', '--batch-size', '40000'],
     'CIFAR-10 with --batch-size 40000 needs about'),
])
def test_an_impossible_run_is_one_line_before_any_data_or_folder(tmp_path, flags, message):
    result = _run('--data-dir', str(tmp_path / 'no-data'), '--save-dir', str(tmp_path / 'runs'), *flags)
    assert result.returncode == 2 and result.stderr.startswith(f'error: {message}'), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'no-data').exists() and not (tmp_path / 'runs').exists()


def test_the_last_seed_may_be_the_largest():
    assert parse_args(['--seed', str(2 ** 32 - 3), '--seeds', '3']).seeds == 3


@pytest.mark.parametrize('flags, message', [
    (['--time-budget', '0.01'], '--time-budget 0.01 s is used up by the warm-up'),
    (['--batch-size', '256'], '--batch-size 256 is larger than the 200 training images in '),
])
def test_what_only_the_data_can_tell_is_one_line_before_the_run_folder(synthetic_cifar, tmp_path, flags, message):
    result = _run('--data-dir', synthetic_cifar, '--save-dir', str(tmp_path / 'runs'), *TINY, *flags)  # flags last: they win
    assert result.returncode == 2 and result.stderr.startswith(f'error: {message}'), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'runs').exists()


def test_fp16_on_the_cpu_is_a_one_line_error(tmp_path):
    result = _run('--data-dir', str(tmp_path), '--save-dir', str(tmp_path), '--device', 'cpu', '--precision', 'fp16')
    assert result.returncode == 2 and 'cuda' in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_run_folder_when_the_data_does_not_load(synthetic_cifar, tmp_path):
    truncate(os.path.join(synthetic_cifar, 'cifar-10-batches-py', 'data_batch_3'), 100)
    result = _run('--data-dir', synthetic_cifar, '--save-dir', str(tmp_path / 'runs'), '--run-name', 'r', *TINY)
    assert result.returncode != 0 and 'data_batch_3' in result.stderr
    assert not (tmp_path / 'runs' / 'r').exists()


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
    state = torch.load(tmp_path / 'ddp' / 'model_seed42.pt', weights_only=True)
    assert state_sha256(state) == rank0['ema_sha256']


def _fast_results():
    """What the bench reads of a train_cifar_fast.py results.json."""
    history = {'seconds': [10.0, 20.0], 'test_acc': [0.8, 0.9], 'train_loss': [1.2, 1.0]}
    run = {'seed': 0, 'history': history, 'test': {'accuracy': 0.9}, 'train_seconds': 20.0,
           'seconds_to_accuracy': {'85%': 20.0, '90%': 20.0, '94%': None}}
    return {'script': 'train_cifar_fast.py', 'data': 'CIFAR-10 (JPEG stand-in)', 'runs': [run], 'summary': {}}


def test_bench_prints_speeds_and_plots_given_runs(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'results.json').write_text(json.dumps(_fast_results()))
    bench = os.path.join(ROOT, 'bench_cifar.py')
    common = ['--device', 'cpu', '--widths', '8,8,8', '--batch-size', '16', '--images', '50', '--rounds', '1',
              '--precision', 'fp32', '--optimizer', 'sgd', 'muon', '--threads', '1', '--save-dir', str(tmp_path)]
    result = subprocess.run([sys.executable, bench, str(tmp_path / 'a'), *common, '--run-name', 'b'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'lab ConvNet' in result.stdout and 'a seed 0: test accuracy 90.00% (CIFAR-10 (JPEG stand-in))' in result.stdout
    assert (tmp_path / 'b' / 'time_to_accuracy.png').stat().st_size > 0
    speeds = json.loads((tmp_path / 'b' / 'results.json').read_text())['speeds']
    assert list(speeds) == ['lab ConvNet, batch 50, fp32, sgd', 'FastNet 8/8/8, batch 16, fp32, sgd',
                            'FastNet 8/8/8, batch 16, fp32, muon']
    assert all(s['images_per_second'] > 0 and s['training_gflops_per_image'] > 0 for s in speeds.values())
    config = json.loads((tmp_path / 'b' / 'config.json').read_text())
    assert config['script'] == 'bench_cifar.py' and config['args']['rounds'] == 1
    assert json.loads((tmp_path / 'b' / 'results.json').read_text())['machine']['cores'] >= 1
    missing = subprocess.run([sys.executable, bench, str(tmp_path / 'nothing'), *common, '--run-name', 'c'],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == f"error: {tmp_path / 'nothing'}: cannot read (No such file or " \
                                                        "directory)\n"
    assert not (tmp_path / 'c').exists()


def _set(path, value):
    """A function that sets the item at `path` (a tuple of keys) of the results to `value`."""
    def tamper(results):
        *parents, last = path
        for key in parents:
            results = results[key]
        results[last] = value
    return tamper


@pytest.mark.parametrize('tamper, message', [
    (_set(('script',), 'train_cifar.py'), "not a train_cifar_fast.py run's results but those of 'train_cifar.py'"),
    (_set(('runs', 0, 'test', 'accuracy'), 'high'), 'runs[0].test.accuracy is a str, not a finite number in [0, 1]'),
    (_set(('runs', 0, 'history', 'seconds'), [10.0]), 'the history of seed 0 has lists of different lengths'),
    (_set(('runs', 0, 'seconds_to_accuracy', '90%'), '20 s'), "runs[0].seconds_to_accuracy.90% is a str"),
    (_set(('runs', 0, 'history', 'train_loss'), [1.2, [1.0]]), 'runs[0].history.train_loss[1] is a list'),
    (lambda results: results['runs'][0].pop('history'), "no 'history' in runs[0]"),
])
def test_bench_refuses_a_results_file_it_cannot_use_in_one_line(tmp_path, tamper, message):
    import bench_cifar
    results = _fast_results()
    tamper(results)
    path = tmp_path / 'results.json'
    path.write_text(json.dumps(results))
    with pytest.raises(readback.ReadBackError) as error:
        bench_cifar.read_run(str(tmp_path))
    assert str(error.value).startswith(f'{path}: ') and message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('make, message', [
    (lambda path: path.write_text('{"script": "train_cifar_fast.py", '), 'not valid JSON'),
    (lambda path: path.write_text('[' * 100 + ']' * 100), 'nested more than'),
    (lambda path: os.mkfifo(path), 'not a regular file'),  # open() would wait for a writer forever
])
def test_bench_reads_a_broken_results_file_as_one_line(tmp_path, make, message):
    import bench_cifar
    path = tmp_path / 'results.json'
    make(path)
    with pytest.raises(readback.ReadBackError, match=message):
        bench_cifar.read_run(str(path))


def test_bench_threads_beyond_the_cpus_are_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'bench_cifar.py'), '--threads', '4096',
                             '--save-dir', str(tmp_path / 'runs')], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith('error: --threads 4096 is more than the ')
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'runs').exists()
