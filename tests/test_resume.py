"""Interrupted runs: killed (SIGKILL), stopped (SIGTERM) or Ctrl-C'd (SIGINT) in the middle of an epoch and
resumed with --resume, every script ends with exactly the weights and metrics of an uninterrupted run.

The runs are tiny (synthetic data, a few steps per epoch). tests/pause_runner.py runs a script so that it
prints 'paused at ...' and waits in the middle of epoch 2, so that the signal always lands there. The run
that is stopped is a process of its own; the reference runs and the resumed ones call main() in this
process, which saves the seconds it takes to import PyTorch again.
"""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import cli
from conftest import ROOT, make_synthetic_cifar, make_synthetic_mnist
from run import Run

MNIST_FLAGS = ['--valid-size', '60', '--limit', '40', '--batch-size', '10', '--epochs', '2', '--seed', '3']
SCRIPTS = {  # script -> (data set, flags): 4 steps per epoch, 2 epochs
    'train.py': ('mnist', MNIST_FLAGS + ['--draw-every', '1000']),
    'train_pytorch.py': ('mnist', MNIST_FLAGS + ['--draw-every', '1000']),
    'train_cifar.py': ('cifar', ['--valid-size', '40', '--limit', '40', '--batch-size', '10', '--epochs', '2',
                                 '--device', 'cpu']),
}
# what differs between two runs of the same training: timings, and where the run lives
NOT_COMPARED = {'seconds', 'images_per_second', 'seconds_per_epoch', 'train_seconds', 'epoch_seconds',
                'run_name', 'save_dir', 'resume', 'run_dir', 'machine'}


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data'))
    make_synthetic_mnist(root, num_train=120, num_test=20)
    make_synthetic_cifar(root, per_batch=40)
    return {'mnist': root, 'cifar': root}


def flags_for(run_dir, data_dir, flags):
    return ['--data-dir', data_dir, '--save-dir', os.path.dirname(run_dir), '--run-name', os.path.basename(run_dir),
            *flags]


def command(script, run_dir, data_dir, flags):
    return [sys.executable, os.path.join(ROOT, script), *flags_for(run_dir, data_dir, flags)]


def pausing(pause, args):
    """The command `args` (from command()), run so that it pauses at EPOCH:STEP[:NTH] (tests/pause_runner.py)."""
    return [args[0], os.path.join(ROOT, 'tests', 'pause_runner.py'), pause, os.path.basename(args[1]), *args[2:]]


def main(script, argv):
    """The script's main(argv), here in this process."""
    importlib.import_module(script.removesuffix('.py')).main(argv)


def start_and_pause(args, pause, tmp_path):
    """Starts a run that pauses at `pause` (EPOCH:STEP[:NTH]) and returns the process once it has paused there."""
    stderr = open(tmp_path / f'stderr-{time.monotonic_ns()}', 'w+')
    process = subprocess.Popen(pausing(pause, args), stdout=subprocess.PIPE, stderr=stderr, text=True)
    for line in process.stdout:
        if line.startswith('paused at'):
            return process, stderr
    process.wait()
    stderr.seek(0)
    pytest.fail(f"the run ended (exit {process.returncode}) without pausing: {stderr.read()[-2000:]}")


def final_weights(run_dir, script):
    """{name: array} of what the run ended with."""
    if script == 'train_cifar.py':  # the last epoch's model and the best-validation one
        state = checkpoint.load_torch(os.path.join(run_dir, checkpoint.PT))
        best = checkpoint.load_torch(os.path.join(run_dir, 'best_model.pt'))
        return {**{f'last.{k}': v.numpy() for k, v in state['model'].items()},
                **{f'best.{k}': v.numpy() for k, v in best.items()}}
    return checkpoint.load_npz(os.path.join(run_dir, 'weights.npz'))


def metrics(run_dir):
    """results.json without what NOT_COMPARED names."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in NOT_COMPARED}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    with open(os.path.join(run_dir, 'results.json')) as f:
        return strip(json.load(f))


def assert_same_run(run_dir, reference, script):
    expected, got = final_weights(reference, script), final_weights(run_dir, script)
    assert set(got) == set(expected)
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key
    assert metrics(run_dir) == metrics(reference)


@pytest.fixture(scope='module')
def reference_runs(data_dirs, tmp_path_factory):
    """Uninterrupted runs, one per script, made when first asked for."""
    root, runs = tmp_path_factory.mktemp('reference'), {}

    def get(script):
        if script not in runs:
            data_set, flags = SCRIPTS[script]
            runs[script] = str(root / script)
            main(script, flags_for(runs[script], data_dirs[data_set], flags))
        return runs[script]
    return get


def where_checkpoint_stands(run_dir):
    """(epochs finished, steps done of the next epoch) of the run's checkpoint, loaded without unpickling code."""
    npz = os.path.join(run_dir, checkpoint.NPZ)
    if os.path.exists(npz):
        state = checkpoint.load_npz(npz)  # allow_pickle=False
    else:
        state = checkpoint.load_torch(os.path.join(run_dir, checkpoint.PT))  # weights_only=True
    fields = json.loads(str(state['run']))
    return fields['epochs_done'], fields['steps_done']


@pytest.mark.parametrize('script, signum', [
    ('train.py', signal.SIGKILL),
    ('train_pytorch.py', signal.SIGKILL),
    ('train_cifar.py', signal.SIGKILL),
    ('train.py', signal.SIGTERM),
    ('train_pytorch.py', signal.SIGINT),
    ('train_cifar.py', signal.SIGTERM),
])
def test_stopped_mid_epoch_then_resumed_ends_as_if_never_stopped(script, signum, data_dirs, reference_runs, tmp_path,
                                                                 capsys):
    data_set, flags = SCRIPTS[script]
    run_dir = str(tmp_path / 'run')
    process, stderr = start_and_pause(command(script, run_dir, data_dirs[data_set], flags), '2:2', tmp_path)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    stderr.seek(0)
    errors = stderr.read()
    if signum == signal.SIGKILL:  # no chance to save: the checkpoint of the last finished epoch resumes
        assert process.returncode == -signal.SIGKILL
        assert where_checkpoint_stands(run_dir) == (1, 0)
        resumed = f'resuming {run_dir} after epoch 1\n'
    else:  # a clean stop: the state after step 2 of epoch 2 saved, one line saying how to resume, no traceback
        assert process.returncode == 128 + signum
        assert f'saved {run_dir} after epoch 1 and 2 steps of epoch 2' in output
        last_line = errors.replace('\r', '\n').strip().splitlines()[-1]
        assert last_line.startswith(f'interrupted: stopped by {signal.Signals(signum).name}')
        assert last_line.endswith(f'--resume {run_dir}') and 'Traceback' not in errors
        assert where_checkpoint_stands(run_dir) == (1, 2)
        resumed = f'resuming {run_dir} after epoch 1 and 2 steps of epoch 2\n'
    assert not [name for name in os.listdir(run_dir) if name.startswith('.')]  # no temporary file left

    main(script, ['--resume', run_dir])
    assert resumed in capsys.readouterr().out
    assert_same_run(run_dir, reference_runs(script), script)


def test_resuming_a_sweep_keeps_finished_lambdas_and_continues_the_stopped_one(data_dirs, tmp_path, capsys):
    flags = MNIST_FLAGS + ['--draw-every', '1000', '--sweep', '0', '0.1']
    reference, run_dir = str(tmp_path / 'reference'), str(tmp_path / 'run')
    main('train_l2reg.py', flags_for(reference, data_dirs['mnist'], flags))
    # killed in the second lambda's first epoch: the third number counts the loops reaching 1:1
    process, _ = start_and_pause(command('train_l2reg.py', run_dir, data_dirs['mnist'], flags), '1:1:2', tmp_path)
    process.kill()
    process.wait(timeout=60)
    finished = os.path.getmtime(os.path.join(run_dir, 'wd_0', 'weights.npz'))
    assert not os.path.exists(os.path.join(run_dir, 'sweep.json'))

    capsys.readouterr()
    main('train_l2reg.py', ['--resume', run_dir])
    assert f"{os.path.join(run_dir, 'wd_0')} finished already" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(run_dir, 'wd_0', 'weights.npz')) == finished  # not trained again
    for name in ('wd_0', 'wd_0.1'):
        assert_same_run(os.path.join(run_dir, name), os.path.join(reference, name), 'train_l2reg.py')
    rows, expected = (json.load(open(os.path.join(d, 'sweep.json')))['rows'] for d in (run_dir, reference))
    assert [{k: v for k, v in row.items() if k != 'run_dir'} for row in rows] == \
           [{k: v for k, v in row.items() if k != 'run_dir'} for row in expected]


def test_resume_of_a_finished_run_changes_nothing(data_dirs, reference_runs, capsys):
    run_dir = reference_runs('train.py')
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    main('train.py', ['--resume', run_dir])
    assert 'finished already' in capsys.readouterr().out
    assert {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)} == before


# ----------------------------------------------------------------------------- the pieces, in process

def folder_args(tmp_path, name='run'):
    """The flags cli.run_folder reads, for a new run folder tmp_path/name."""
    return argparse.Namespace(resume=None, save_dir=str(tmp_path), run_name=name, overwrite=False)


def signal_now(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # the handler runs in the main thread between bytecodes: here, not in kill()


def test_the_batch_order_round_trips_through_a_checkpoint(tmp_path, signals_as_scripts_have_them):
    """Stopped after a step, a run saves rng's state of the epoch's start: resumed, it draws the same order
    and leaves out the step done."""
    with pytest.raises(cli.Interrupted):
        with cli.run_folder(folder_args(tmp_path), 'train') as run_dir:
            run = Run(run_dir, 7, False, 1, 10, 2, arrays={'w': np.ones(3)})
            for _ in run.epochs():
                order = run.rng.permutation(10)
                run.rng.integers(0, 2 ** 31, dtype=np.uint32)  # leaves a buffered 32-bit draw in the state
                for _ in run.steps():
                    signal_now()
    restored = Run(run_dir, 0, True, 1, 10, 2, arrays={'w': np.zeros(3)})
    for _ in restored.epochs():
        assert np.array_equal(restored.rng.permutation(10), order)
        assert list(restored.steps()) == [1, 2, 3, 4]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.npz')
    checkpoint.save_npz(path, {'w': np.ones(3)})

    def write_half_then_fail(tmp_path, **arrays):
        with open(tmp_path, 'wb') as f:
            f.write(b'PK\x03\x04 half a zip')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'savez', write_half_then_fail)
    with pytest.raises(OSError, match='No space'):
        checkpoint.save_npz(path, {'w': np.zeros(3)})
    assert os.listdir(tmp_path) == ['checkpoint.npz']
    assert np.array_equal(checkpoint.load_npz(path)['w'], np.ones(3))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': {}, 'epoch': _Evil(marker)}, tmp_path / 'checkpoint.pt')
    with pytest.raises(cli.UserError, match='checkpoint.pt: not a checkpoint of this run'):
        checkpoint.load_torch(str(tmp_path / 'checkpoint.pt'))
    np.savez(tmp_path / 'checkpoint.npz', evil=np.array([_Evil(marker)], dtype=object))
    with pytest.raises(cli.UserError, match='checkpoint.npz: not a checkpoint of this run'):
        checkpoint.load_npz(str(tmp_path / 'checkpoint.npz'))
    assert not marker.exists()


def test_resuming_hinge_compare_keeps_the_finished_loss_and_continues_cross_entropy(data_dirs, reference_runs,
                                                                                    tmp_path, capsys):
    run_dir = str(tmp_path / 'compare')
    flags = SCRIPTS['train_cifar.py'][1] + ['--compare']
    # killed in cross-entropy's second epoch: the second training loop of the process to reach 2:2
    process, _ = start_and_pause(command('hinge_loss.py', run_dir, data_dirs['cifar'], flags), '2:2:2', tmp_path)
    process.kill()
    process.wait(timeout=60)
    assert not os.path.exists(os.path.join(run_dir, 'compare.json'))
    main('hinge_loss.py', ['--resume', run_dir])
    out = capsys.readouterr().out
    assert f"{os.path.join(run_dir, 'hinge')} finished already" in out and 'resuming' in out
    assert {'compare.md', 'compare.json', 'compare.png'} <= set(os.listdir(run_dir))
    # cross-entropy here is train_cifar.py's run with the same flags: the same weights, bit for bit
    expected = final_weights(reference_runs('train_cifar.py'), 'train_cifar.py')
    got = final_weights(os.path.join(run_dir, 'cross-entropy'), 'train_cifar.py')
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


@pytest.fixture
def signals_as_scripts_have_them():
    """SIGINT and SIGTERM handled as cli.run() handles them, for the length of one test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, cli._on_signal)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_in_a_run_folder_the_first_signal_waits_for_the_loop_and_a_second_stops_at_once(
        signals_as_scripts_have_them, tmp_path):
    with pytest.raises(cli.Interrupted) as stopped:
        with cli.run_folder(folder_args(tmp_path), 'train'):
            signal_now(signal.SIGTERM)
            assert cli.stop_requested()  # noted, nothing raised: the step in progress finishes
            signal_now(signal.SIGINT)
    assert stopped.value.signum == signal.SIGINT and not cli.stop_requested()
    assert str(stopped.value).endswith(f"continue with: python train.py --resume {tmp_path / 'run'}")


def test_stop_raises_the_kind_of_the_signal_it_acts_on(signals_as_scripts_have_them, tmp_path):
    with pytest.raises(cli.Interrupted) as stopped:
        with cli.run_folder(folder_args(tmp_path), 'train'):
            signal_now(signal.SIGTERM)
            cli.stop()
    assert stopped.value.signum == signal.SIGTERM and not cli.stop_requested()


def test_a_signal_the_loop_did_not_act_on_stops_the_program_when_the_block_ends(signals_as_scripts_have_them,
                                                                                tmp_path):
    after_block = []
    with pytest.raises(cli.Interrupted) as stopped:
        with cli.run_folder(folder_args(tmp_path), 'train'):
            signal_now(signal.SIGINT)
            after_block.append('the rest of the block ran')
    assert after_block and stopped.value.signum == signal.SIGINT and not cli.stop_requested()
    with pytest.raises(KeyboardInterrupt):  # outside the block a signal stops at once
        signal_now(signal.SIGINT)
