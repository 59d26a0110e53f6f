"""Bad input, tried systematically: every data loader gets broken files, every script bad flags, garbage data
and bad --resume folders. Each must give one line naming the problem, exit code 2, no traceback, and leave
nothing behind (no run folder for errors found before the work starts).

Command lines are tried in this process (main(argv) inside cli.run, as the scripts run it), and once per
script in a process of its own, to see the real exit code and stderr.
"""
import gzip
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

import cli
import data
from conftest import ROOT, make_synthetic_cifar, make_synthetic_mnist, write_idx

MNIST_SCRIPTS = ['train.py', 'train_l2reg.py', 'train_pytorch.py']
CIFAR_SCRIPTS = ['train_cifar.py', 'hinge_loss.py']
SCRIPTS = MNIST_SCRIPTS + CIFAR_SCRIPTS


# ----------------------------------------------------------------------------- data loaders

class _Evil:
    """Pickles to 'call os.system(command)' when loaded."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


MNIST_BREAKAGE = {  # name -> (file content from the good content, what the message says)
    'empty': (lambda good: b'', 'too short for an IDX header'),
    'truncated': (lambda good: good[:len(good) - 7], 'truncated or corrupt'),
    'wrong magic': (lambda good: b'\x00\x00\x08\x07' + good[4:], 'magic 0x00000807'),
    'float32 data': (lambda good: good[:2] + b'\x0d' + good[3:], 'magic 0x00000d0'),  # IDX type code 0x0D
    'html page': (lambda good: b'<html>404 Not Found</html>', 'IDX'),
}


@pytest.mark.parametrize('gz', [True, False], ids=['gz', 'plain'])
@pytest.mark.parametrize('name', ['train-images-idx3-ubyte', 't10k-labels-idx1-ubyte'])
@pytest.mark.parametrize('breakage', list(MNIST_BREAKAGE))
def test_broken_mnist_files_are_one_line_errors_naming_the_file(tmp_path, gz, name, breakage):
    root = make_synthetic_mnist(str(tmp_path), num_train=20, num_test=10, gz=gz)
    path = os.path.join(root, 'MNIST', 'raw', name + ('.gz' if gz else ''))
    with (gzip.open if gz else open)(path, 'rb') as f:
        good = f.read()
    bad, message = MNIST_BREAKAGE[breakage]
    with (gzip.open if gz else open)(path, 'wb') as f:
        f.write(bad(good))
    with pytest.raises(data.DataError) as error:
        data.load_mnist(root, download=False)
    assert str(error.value).startswith(path) and message in str(error.value) and '\n' not in str(error.value)


def test_a_gz_that_is_not_gzip_is_named(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), num_train=20, num_test=10)
    path = os.path.join(root, 'MNIST', 'raw', 't10k-images-idx3-ubyte.gz')
    with open(path, 'wb') as f:
        f.write(b'\x1f\x8b\x08\x00 not really gzip')
    with pytest.raises(data.DataError, match=f'^{path}: cannot read'):
        data.load_mnist(root, download=False)


def test_mnist_files_that_are_not_the_originals_get_one_note(tmp_path, capsys):
    root = make_synthetic_mnist(str(tmp_path), num_train=20, num_test=10)
    raw = data.load_mnist(root, download=False)
    assert raw['originals'] is False
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('note: the MNIST files in') and 'not the published' in out


@pytest.mark.integration
def test_the_published_mnist_files_pass_and_a_replaced_one_is_named(mnist_dir, tmp_path, capsys):
    assert data.load_mnist(mnist_dir, download=False)['originals'] is True
    assert capsys.readouterr().out == ''
    raw = os.path.join(str(tmp_path), 'MNIST', 'raw')
    os.makedirs(raw)
    for name in data.MNIST_MD5:
        os.symlink(os.path.join(mnist_dir, 'MNIST', 'raw', name), os.path.join(raw, name))
    os.remove(os.path.join(raw, 't10k-labels-idx1-ubyte.gz'))
    write_idx(os.path.join(raw, 't10k-labels-idx1-ubyte.gz'), np.zeros(10000, np.uint8))  # valid, not the original
    assert data.load_mnist(str(tmp_path), download=False)['originals'] is False
    assert capsys.readouterr().out.startswith('note: t10k-labels-idx1-ubyte.gz in')


def _pickled(obj):
    return pickle.dumps(obj, protocol=2)


CIFAR_BREAKAGE = {  # name -> (file content, what the message says); {marker} is a file the evil pickle would create
    'empty': (lambda marker: b'', 'not a CIFAR-10 file (EOFError'),
    'truncated': (lambda marker: _pickled({b'data': np.zeros((3, 3072), np.uint8), b'labels': [0, 1, 2]})[:-40],
                  'not a CIFAR-10 file'),
    'runs code': (lambda marker: _pickled({b'data': _Evil(f'touch {marker}'), b'labels': [0]}), 'refusing to load'),
    'object array': (lambda marker: _pickled({b'data': np.array([1, 'x'], dtype=object), b'labels': [0]}),
                     'refusing an array of dtype object'),
    'float data': (lambda marker: _pickled({b'data': np.zeros((3, 3072), np.float32), b'labels': [0, 1, 2]}),
                   "'data' must be a (N, 3072) uint8 array"),
    'not a dict': (lambda marker: _pickled([1, 2, 3]), 'expected a dict'),
}


@pytest.mark.parametrize('name', ['data_batch_1', 'test_batch', 'batches.meta'])
@pytest.mark.parametrize('breakage', list(CIFAR_BREAKAGE))
def test_broken_cifar_files_are_one_line_errors_naming_the_file(tmp_path, name, breakage):
    root = make_synthetic_cifar(str(tmp_path / 'data'), per_batch=10)
    path = os.path.join(root, data.CIFAR_FOLDER, name)
    marker = tmp_path / 'pwned'
    content, message = CIFAR_BREAKAGE[breakage]
    if name == 'batches.meta' and breakage in ('float data', 'not a dict'):
        message = "expected a dict with 'label_names'"
    with open(path, 'wb') as f:
        f.write(content(marker))
    with pytest.raises(data.DataError) as error:
        data.load_cifar10(root, download=False)
    assert str(error.value).startswith(path) and message in str(error.value) and '\n' not in str(error.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- command lines

@pytest.fixture
def run_main(capsys):
    """run_main(script, argv) -> (exit code, stdout, stderr) of cli.run(main) in this process."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def run_main(script, argv):
        module = importlib.import_module(script.removesuffix('.py'))
        with pytest.raises(SystemExit) as exit_:
            cli.run(lambda: module.main(argv))
        out, err = capsys.readouterr()
        return exit_.value.code, out, err
    yield run_main
    for signum, handler in handlers.items():  # cli.run installs its own
        signal.signal(signum, handler)


def assert_one_line_error(code, out, err, message, save_dir):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert 'Traceback' not in err and out == ''
    assert not os.path.exists(save_dir) or os.listdir(save_dir) == []  # no run folder, nothing half-written


COMMON = [(['--epochs', '0'], 'argument --epochs: must be a positive integer, got 0'),
          (['--batch-size', '-1'], 'argument --batch-size: must be a positive integer, got -1'),
          (['--seed', 'x'], "argument --seed: 'x' is not an integer"),
          (['--seed', '-1'], 'argument --seed: must be in 0 .. 2**32 - 1'),
          (['--seed', str(2 ** 32)], 'argument --seed: must be in 0 .. 2**32 - 1'),
          (['--valid-size', '0'], 'argument --valid-size: must be a positive integer'),
          (['--limit', '-5'], 'argument --limit: must be a positive integer'),
          (['--resume', 'no/such/run'], '--resume no/such/run: no such run folder'),
          (['--bogus'], 'unrecognized arguments: --bogus')]
MNIST = [(['--lr-policy', '1:-0.1'], 'learning rates positive'),
         (['--lr-policy', '2:0.1'], 'must give a learning rate for epoch 1'),
         (['--lr-policy', 'fast'], "is not of the form 'epoch:lr,epoch:lr,...'"),
         (['--dtype', 'float16'], 'argument --dtype: invalid choice'),
         (['--batch-size', '2.5'], "'2.5' is not an integer"),
         (['--batch-size', '0'], 'argument --batch-size: must be a positive integer, got 0')]
CIFAR = [(['--lr', '-1'], 'argument --lr: must be a positive number, got -1'),
         (['--lr', 'fast'], "argument --lr: 'fast' is not a number"),
         (['--gamma', '0'], 'argument --gamma: must be a positive number'),
         (['--weight-decay', '-1'], 'argument --weight-decay: must be a number >= 0'),
         (['--padding', '3'], 'argument --padding: invalid choice'),
         (['--device', 'tpu'], 'argument --device: invalid choice')]
FLAG_CASES = [(script, flags, message) for script in SCRIPTS for flags, message in COMMON] + \
    [(script, flags, message) for script in MNIST_SCRIPTS for flags, message in MNIST] + \
    [(script, flags, message) for script in CIFAR_SCRIPTS for flags, message in CIFAR] + [
    ('train.py', ['--batch-size', '300', '--limit', '200'], 'larger than the 200 training images'),
    ('train.py', ['--batch-size', '60000'], 'larger than the 55000 training images'),
    ('train.py', ['--valid-size', '60000'], '--valid-size 60000 leaves no MNIST training images'),
    ('train_l2reg.py', ['--weight-decay', '-1'], 'must be a number >= 0'),
    ('train_l2reg.py', ['--sweep', '0.01', '1e-2'], 'lists a lambda twice'),
    ('train_l2reg.py', ['--sweep', '-1'], 'argument --sweep: must be a number >= 0'),
    ('train_pytorch.py', ['--weight-decay', '-1'], 'must be a number >= 0'),
    ('train_pytorch.py', ['--steps', '0'], 'argument --steps: must be a positive integer'),
    ('train_pytorch.py', ['--device', 'tpu'], 'argument --device: invalid choice'),
    ('hinge_loss.py', ['--delta', 'nan'], 'argument --delta: must be a number >= 0'),
    ('train.py', ['--run-name', 'a/b'], "'a/b' is not a folder name"),
    ('train.py', ['--run-name', 'x' * 300], 'is not a folder name of 1 to 100 printable characters'),
]


@pytest.mark.parametrize('script, flags, message', FLAG_CASES)
def test_bad_flags_are_one_line_before_any_work(run_main, tmp_path, script, flags, message):
    save_dir = str(tmp_path / 'runs')
    code, out, err = run_main(script, ['--save-dir', save_dir, '--data-dir', str(tmp_path / 'nothing'), *flags])
    assert_one_line_error(code, out, err, message, save_dir)


def _garbage_data(root):
    """MNIST and CIFAR-10 folders full of files that are not what their names say."""
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw)
    os.makedirs(os.path.join(root, data.CIFAR_FOLDER))
    for name in data.MNIST_FILES.values():
        with open(os.path.join(raw, name + '.gz'), 'wb') as f:
            f.write(b'<html>404 Not Found</html>')
    for name in data.CIFAR_FILES + ['batches.meta']:
        with open(os.path.join(root, data.CIFAR_FOLDER, name), 'wb') as f:
            f.write(b'garbage')
    return root


@pytest.mark.parametrize('script', SCRIPTS)
def test_garbage_data_is_a_one_line_error_and_no_run_folder(tmp_path, script):
    """In a process of its own: the real exit code and stderr."""
    data_dir, save_dir = _garbage_data(str(tmp_path / 'data')), str(tmp_path / 'runs')
    device = ['--device', 'cpu'] if script in CIFAR_SCRIPTS else []  # their default, auto, may print a line
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), '--data-dir', data_dir, '--save-dir',
                             save_dir, *device], capture_output=True, text=True, timeout=120)
    first_file = 'train-images-idx3-ubyte.gz' if script in MNIST_SCRIPTS else 'data_batch_1'
    assert_one_line_error(result.returncode, result.stdout, result.stderr, first_file, save_dir)
    assert result.stderr.startswith('error: ')


@pytest.mark.parametrize('script', SCRIPTS)
def test_an_existing_run_folder_is_never_reused_silently(run_main, tmp_path, script):
    run_dir = tmp_path / 'runs' / 'mine'
    os.makedirs(run_dir)
    (run_dir / 'results.json').write_text('{"precious": true}')
    code, out, err = run_main(script, ['--save-dir', str(tmp_path / 'runs'), '--run-name', 'mine'])
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'exists' in err and '--resume' in err
    assert os.listdir(run_dir) == ['results.json'] and (run_dir / 'results.json').read_text() == '{"precious": true}'


def _saved_run(tmp_path, script, argv):
    run_dir = tmp_path / 'runs' / 'saved'
    os.makedirs(run_dir)
    (run_dir / 'config.json').write_text(json.dumps({'script': script, 'argv': argv}))
    return str(run_dir)


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('case', ['no config', 'other script', 'conflicting flag', 'with --overwrite', 'bad config'])
def test_bad_resume_is_one_line_and_touches_nothing(run_main, tmp_path, script, case):
    other = 'train.py' if script != 'train.py' else 'train_cifar.py'
    run_dir = _saved_run(tmp_path, other if case == 'other script' else script, ['--epochs', '2'])
    flags, message = ['--resume', run_dir], {
        'no config': 'no config.json in it', 'other script': f'that is a run of {other}, not of {script}',
        'conflicting flag': "--epochs 3 differs from the run's 2", 'with --overwrite': "--overwrite on differs",
        'bad config': 'config.json: not valid JSON'}[case]
    if case == 'no config':
        os.remove(os.path.join(run_dir, 'config.json'))
    if case == 'bad config':
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            f.write('{"script": "train.py", "argv": [')  # cut off
    flags += {'conflicting flag': ['--epochs', '3'], 'with --overwrite': ['--overwrite']}.get(case, [])
    before = sorted(os.listdir(run_dir))
    code, out, err = run_main(script, flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and out == '', err
    assert sorted(os.listdir(run_dir)) == before


@pytest.mark.parametrize('script, name', [('train.py', 'checkpoint.npz'), ('train_cifar.py', 'checkpoint.pt')])
def test_a_corrupt_checkpoint_is_one_line_and_touches_nothing(run_main, tmp_path, script, name):
    data_dir = str(tmp_path / 'data')
    make_synthetic_mnist(data_dir, num_train=80, num_test=10)
    make_synthetic_cifar(data_dir, per_batch=10)
    flags = ['--valid-size', '40', '--limit', '20', '--batch-size', '10', '--data-dir', data_dir]
    run_dir = _saved_run(tmp_path, script, flags + (['--device', 'cpu'] if script == 'train_cifar.py' else []))
    with open(os.path.join(run_dir, name), 'wb') as f:
        f.write(b'PK\x03\x04 half a zip file')
    code, out, err = run_main(script, ['--resume', run_dir])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {os.path.join(run_dir, name)}: not a checkpoint of this run") and \
        'start the run again with --overwrite' in err
    assert sorted(os.listdir(run_dir)) == sorted(['config.json', name])
