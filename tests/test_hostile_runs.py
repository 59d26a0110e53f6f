"""Hostile runs: what diverging weights, bad flags, a tampered checkpoint, a second run, a full disk or a
memory bomb can do to the training scripts, and a broken torchrun environment to train_cifar_fast.py.

Each case must end the way README.md promises: one line on stderr naming the problem, exit code 2, no
traceback, and nothing left behind: no run folder when the problem is found before the work starts, and
after --resume of a tampered checkpoint not one file of the run folder changed. Command lines run in this
process (main(argv) inside cli.run, through test_bad_input's run_main) where that is enough, and in a
process of their own where the exit code, a race or a memory limit is the point.
"""
import builtins
import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch

import checkpoint
import cli
import train_pytorch
from conftest import ROOT, make_synthetic_cifar, make_synthetic_mnist
from run import Diverged, Run
from test_bad_input import _Evil, run_main  # noqa: F401 (run_main is a fixture)
from test_resume import folder_args, signals_as_scripts_have_them, where_checkpoint_stands  # noqa: F401 (a fixture)

# Synthetic data: 80 MNIST training images (40 left after --valid-size 40), 50 CIFAR-10 ones (30 left).
MNIST = ['--valid-size', '40', '--limit', '20', '--batch-size', '10', '--draw-every', '1000']
CIFAR = ['--valid-size', '20', '--limit', '20', '--batch-size', '10', '--device', 'cpu']
FLAGS = {'train.py': MNIST, 'train_l2reg.py': MNIST, 'train_pytorch.py': MNIST,
         'train_cifar.py': CIFAR, 'hinge_loss.py': CIFAR}
SCRIPTS = list(FLAGS)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data'))
    make_synthetic_mnist(root, num_train=80, num_test=10)
    make_synthetic_cifar(root, per_batch=10)
    return root


def command_line(script, data_dir, save_dir, *flags, epochs=1):
    return ['--data-dir', data_dir, '--save-dir', str(save_dir), '--epochs', str(epochs), *FLAGS[script], *flags]


def main(script, argv):
    """The script's main(argv), here in this process, for runs that are to succeed."""
    importlib.import_module(script.removesuffix('.py')).main(argv)


def run_script(script, argv, **options):
    """The script in a process of its own -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          timeout=300, **options)


def assert_refused(code, err, message):
    """The promise: exit code 2 and one line on stderr that says what is wrong, no traceback."""
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert 'Traceback' not in err


def contents(folder):
    """{path under folder: (SHA-256 of its bytes, time of its last write)} of every file below folder."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns
    return found


def temporaries(folder):
    """The temporary files cli.atomic_write left below folder (it names them '.<name>.<random>')."""
    return [name for _, _, names in os.walk(folder) for name in names if name.startswith('.')]


def strict_json(path):
    """The JSON in path; NaN and Infinity, which json.load accepts but JSON has not, fail the test."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


class _FullDiskFile:
    """A file whose writes fail as on a full disk, after writing half of what they were given."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


@contextlib.contextmanager
def watched_writes(folder, full_disk_at=None):
    """Records every file opened for writing below folder (in the yielded list); full_disk_at=(name, n): the
    n-th opening for writing of `name` (or of its temporary file) gets a file whose writes fail with ENOSPC."""
    opened, of_the_full_file, real_open = [], [], builtins.open

    def watching_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ''
        if path.startswith(str(folder) + os.sep) and any(flag in mode for flag in 'wax'):
            opened.append(os.path.relpath(path, folder))
            base = os.path.basename(path)
            if full_disk_at and (base == full_disk_at[0] or base.startswith(f'.{full_disk_at[0]}.')):
                of_the_full_file.append(path)
                if len(of_the_full_file) == full_disk_at[1]:
                    return _FullDiskFile(f)
        return f
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, 'open', watching_open)
        patch.setattr(io, 'open', watching_open)  # zipfile (np.savez) calls io.open
        yield opened


# ----------------------------------------------------------------------------- 1. divergence

DIVERGING = {  # when -> (flags of the MNIST scripts, of the CIFAR-10 ones, epochs, epochs done when it stops)
    # a sane first epoch, then a learning rate that overflows the weights in the first step of the second
    'in the middle of epoch 2': (['--lr-policy', '1:0.01,2:1e9'], ['--lr', '0.01', '--gamma', '1e9'], 2, 1),
    # one step per epoch: the weights overflow in the last step, and only the epoch's evaluation can tell
    'in the last step of epoch 1': (['--limit', '10', '--lr-policy', '1:1e30'], ['--limit', '10', '--lr', '1e30'],
                                    1, 0),
}


@pytest.mark.parametrize('when', list(DIVERGING))
@pytest.mark.parametrize('script', SCRIPTS)
def test_divergence_stops_with_one_line_and_keeps_the_last_good_epoch(run_main, data_dir, tmp_path, script, when):
    mnist_flags, cifar_flags, epochs, epochs_done = DIVERGING[when]
    argv = command_line(script, data_dir, tmp_path, '--run-name', 'run',
                        *(mnist_flags if FLAGS[script] is MNIST else cifar_flags), epochs=epochs)
    if script == 'train_pytorch.py' and epochs_done:  # the real exit code and stderr, once
        result = run_script(script, argv)
        code, err = result.returncode, result.stderr
    else:
        code, _, err = run_main(script, argv)
    assert_refused(code, err, f'lower the learning rate. The last checkpoint, after epoch {epochs_done}, is in')
    assert re.search(r'became (nan|inf|-inf)', err), err
    run_dir = str(tmp_path / 'run' / ('hinge' if script == 'hinge_loss.py' else ''))
    assert where_checkpoint_stands(run_dir) == (epochs_done, 0)
    for parent, _, names in os.walk(tmp_path / 'run'):  # no NaN reached any file a person or a program reads
        for name in names:
            path = os.path.join(parent, name)
            if name.endswith('.json'):
                strict_json(path)
            if name.endswith('.csv'):
                assert 'nan' not in open(path).read().lower()
            if name.endswith(('.npz', '.pt')):
                saved = checkpoint.load_npz(path) if name.endswith('.npz') else checkpoint.load_torch(path)
                weights = saved.get('model', saved)
                assert all(np.isfinite(np.asarray(weights[key])).all() for key in weights if key != 'run'), path
    if epochs_done:
        assert len(strict_json(os.path.join(run_dir, 'results.json'))['epochs']) == epochs_done
    if FLAGS[script] is CIFAR:  # the best model so far is the last good epoch's, if there was one
        best = os.path.join(run_dir, 'best_model.pt')
        if epochs_done:
            model = checkpoint.load_torch(os.path.join(run_dir, checkpoint.PT))['model']
            assert all(torch.equal(value, model[key]) for key, value in checkpoint.load_torch(best).items())
        else:
            assert not os.path.exists(best)
    assert not temporaries(tmp_path / 'run')


def test_a_nan_score_stops_the_run_before_it_is_written(tmp_path):
    run = Run(str(tmp_path), 0, False, 1, 4, 2, arrays={'w': np.ones(3)})
    with pytest.raises(Diverged, match='the valid loss became nan after epoch 1'):
        for _ in run.epochs():
            list(run.steps())
            run.end_epoch(lr=0.1, train={'loss': 0.5, 'accuracy': 0.9}, valid={'loss': float('nan'), 'accuracy': 0.1})
    assert os.listdir(tmp_path) == [checkpoint.NPZ]  # the one from before the first epoch


def test_a_nan_final_score_is_null_in_results_and_checkpoint(tmp_path):
    run = Run(str(tmp_path), 0, False, 1, 4, 2, arrays={'w': np.ones(3)})
    for _ in run.epochs():
        list(run.steps())
        run.end_epoch(lr=0.1, train={'loss': 0.5, 'accuracy': 0.9}, valid={'loss': 0.5, 'accuracy': 0.9})
    run.finish(test={'loss': float('nan'), 'accuracy': 0.5})
    assert strict_json(tmp_path / 'results.json')['test']['loss'] is None
    saved = json.loads(str(checkpoint.load_npz(str(tmp_path / checkpoint.NPZ))['run']))
    assert saved['results']['test']['loss'] is None


def test_weights_that_overflowed_are_never_saved(tmp_path, signals_as_scripts_have_them):
    """Ctrl-C right after a step whose update overflowed the weights: the run stops, the last checkpoint stays."""
    weights = {'w': np.ones(3)}
    with pytest.raises(cli.Interrupted):
        with cli.run_folder(folder_args(tmp_path), 'train') as run_dir:
            run = Run(run_dir, 0, False, 1, 4, 2, arrays=weights)
            for _ in run.epochs():
                before = contents(run_dir)  # config.json and the checkpoint of the start
                for _ in run.steps():
                    weights['w'][0] = np.inf  # the step's update
                    os.kill(os.getpid(), signal.SIGINT)  # noted, and acted upon before the next step
                    time.sleep(0.01)
    assert contents(run_dir) == before


# ----------------------------------------------------------------------------- 2. flags checked before any work

BEFORE_WORK = {  # name -> (flags, message); {file} is a file where a folder should be
    'seed -1': (['--seed', '-1'], 'argument --seed: must be in 0 .. 2**32 - 1, got -1'),
    'seed 2**32': (['--seed', str(2 ** 32)], 'argument --seed: must be in 0 .. 2**32 - 1'),
    'seed 2**64': (['--seed', str(2 ** 64)], 'argument --seed: must be in 0 .. 2**32 - 1'),
    'run name of 300 characters': (['--run-name', 'x' * 300], 'is not a folder name of 1 to 100 printable'),
    'run name with a slash': (['--run-name', 'a/b'], "'a/b' is not a folder name"),
    'run name ..': (['--run-name', '..'], "'..' is not a folder name"),
    'save dir is a file': (['--save-dir', '{file}'], 'is a file, not a folder'),
    'save dir inside a file': (['--save-dir', '{file}/runs'], 'is a file, not a folder'),
    'batch larger than the data on disk': (['--batch-size', '45', '--limit', '1000'], 'is larger than the'),
    'validation set as large as the data': (['--valid-size', '80', '--limit', '1000'], 'validation'),
}


@pytest.mark.parametrize('case', list(BEFORE_WORK))
@pytest.mark.parametrize('script', SCRIPTS)
def test_bad_flags_stop_before_any_work(run_main, data_dir, tmp_path, script, case):
    a_file = tmp_path / 'a-file'
    a_file.write_text('not a folder')
    save_dir = tmp_path / 'runs'
    flags, message = BEFORE_WORK[case]
    argv = command_line(script, data_dir, save_dir, *[flag.format(file=a_file) for flag in flags])
    code, out, err = run_main(script, argv)
    assert_refused(code, err, message)
    assert not save_dir.exists() and a_file.read_text() == 'not a folder'
    assert sorted(os.listdir(tmp_path)) == ['a-file']


def test_init_from_weights_that_are_not_finite_is_refused_before_any_work(run_main, data_dir, tmp_path):
    init = str(tmp_path / 'init.npz')
    weights = train_pytorch.numpy_params(train_pytorch.LabMnistNet())
    weights['fc3.weights'][0, 0] = np.inf
    np.savez(init, **weights)
    save_dir = tmp_path / 'runs'
    code, _, err = run_main('train_pytorch.py',
                            command_line('train_pytorch.py', data_dir, save_dir, '--init-from', init))
    assert_refused(code, err, f"--init-from {init}: 'fc3.weights' holds NaN or infinite values")
    assert not save_dir.exists()


def test_compare_numpy_with_too_few_images_leaves_no_run_folder(run_main, data_dir, tmp_path):
    code, _, err = run_main('train_pytorch.py', ['--compare-numpy', '--steps', '5', '--data-dir', data_dir,
                                                 '--valid-size', '40', '--batch-size', '10', '--save-dir',
                                                 str(tmp_path / 'runs')])
    assert_refused(code, err, '--compare-numpy needs 5 x 10 training images, there are 40')
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('seed', ['-1', str(2 ** 32), 'x'])
def test_check_grads_refuses_a_seed_out_of_range(run_main, seed):
    code, out, err = run_main('check_grads.py', ['--seed', seed])
    assert_refused(code, err, 'argument --seed:')
    assert out == ''


# ----------------------------------------------------------------------------- 3. tampered checkpoints

BASES = {'npz': 'train.py', 'pt': 'train_pytorch.py', 'cifar': 'train_cifar.py'}


class FinishedRuns:
    """One finished run of 1 epoch per kind of checkpoint, made when first asked for, its writes watched."""

    def __init__(self, data_dir, root):
        self.data_dir, self.root, self.runs = data_dir, root, {}

    def _run(self, kind):
        if kind not in self.runs:
            with watched_writes(self.root) as opened:
                main(BASES[kind], command_line(BASES[kind], self.data_dir, self.root, '--run-name', kind))
            self.runs[kind] = str(self.root / kind), opened
        return self.runs[kind]

    def folder(self, kind):
        return self._run(kind)[0]

    def opened(self, kind):
        """The files the run opened for writing, relative to its folder."""
        return [os.path.relpath(path, kind) for path in self._run(kind)[1]]

    def copy(self, kind, tmp_path):
        """A copy of the run's folder in tmp_path, to tamper with."""
        run_dir = str(tmp_path / 'run')
        shutil.copytree(self.folder(kind), run_dir)
        return run_dir


@pytest.fixture(scope='module')
def finished_runs(data_dir, tmp_path_factory):
    return FinishedRuns(data_dir, tmp_path_factory.mktemp('finished'))


def load_checkpoint(path):
    """What a checkpoint holds, read without allow_pickle and with weights_only: the state to tamper with."""
    if path.endswith('.npz'):
        with np.load(path) as saved:
            return dict(saved)
    return torch.load(path, weights_only=True)


def save_checkpoint(path, state):
    if path.endswith('.npz'):
        np.savez(path, **state)
    else:
        torch.save(state, path)


def set_run_text(state, text):
    state['run'] = np.array(text) if isinstance(state['run'], np.ndarray) else text  # .npz: a 0-d array


def break_run_text(state):
    """The checkpoint's 'run' JSON with a brace too many: no longer JSON."""
    set_run_text(state, '{' + str(state['run']))


def run_json(edit):
    """A tampering of the checkpoint's 'run' JSON: edit(fields) changes it in place."""
    def tamper(state):
        fields = json.loads(str(state['run']))
        edit(fields)
        set_run_text(state, json.dumps(fields))
    return tamper


def unfinished(edit):
    """edit, on a checkpoint whose run is not finished (stopped after its last epoch, before its test)."""
    def both(fields):
        del fields['results']['finished']
        edit(fields)
    return both


def three_epochs_done(fields):
    fields.update(epochs_done=3, step=6)
    fields['results']['epochs'] *= 3


def set_nan(array):
    array.reshape(-1)[0] = np.nan if isinstance(array, np.ndarray) else float('nan')


MT19937 = {'bit_generator': 'MT19937', 'state': {'key': [1] * 624, 'pos': 0}}
RUN_JSON = {  # name -> (tampering of the checkpoint, message)
    "'run' is not JSON": (break_run_text, 'not a checkpoint of this run (not valid JSON (Expecting property name'),
    'epochs_done is text': (run_json(lambda f: f.update(epochs_done='1')), 'epochs_done is a str, not an integer >= 0'),
    'negative step count': (run_json(lambda f: f.update(step=-2)), 'step is -2, not an integer >= 0'),
    'no rng': (run_json(lambda f: f.pop('rng')), "not a checkpoint of this run (no 'rng')"),
    'rng of another kind': (run_json(lambda f: f.update(rng=MT19937)),
                            "'rng' is not a generator state (state must be for a PCG64 RNG)"),
    'rng state of the wrong length': (run_json(lambda f: f['rng']['state'].update(state=2 ** 200)),
                                      "'rng' is not a generator state"),
    'results not a dict': (run_json(lambda f: f.update(results=[1, 2])), 'results is a list, not a dict'),
    'results without epochs': (run_json(lambda f: f['results'].pop('epochs')),
                               "no 'epochs' in results"),
    'an epoch record of text': (run_json(lambda f: f['results']['epochs'][0].update(valid_acc='high')),
                                "an epoch's record is not a dict of finite numbers"),
    'more epochs done than the run has': (run_json(unfinished(three_epochs_done)),
                                          'into epoch 4, does not fit a run of 1 epochs of 2 steps'),
    'step not where the counts say': (run_json(unfinished(lambda f: f.update(step=7))),
                                      'step 7, 0 steps into epoch 2, does not fit a run of 1 epochs of 2 steps'),
}
ARRAYS = {  # name -> (edit of the arrays, message)
    'an array missing': (lambda a: a.pop('conv1.weights'), "no array 'conv1.weights'"),
    'an array of the wrong shape': (lambda a: a.update({'conv1.weights': np.zeros((3, 3), np.float32)}),
                                    "'conv1.weights' is float32 (3, 3), the net needs float32 (16, 25)"),
    'an array of integers': (lambda a: a.update({'fc3.bias': a['fc3.bias'].astype(np.int64)}), "'fc3.bias' is int64"),
    'NaN weights': (lambda a: set_nan(a['fc3.weights']), 'holds NaN or infinite values'),
    'no run entry': (lambda a: a.pop('run'), 'not a checkpoint of this run'),
    'pickled objects': (lambda a: a.update(extra=np.array([{'a': 1}], dtype=object)), 'holds pickled Python objects'),
}
STATE_DICTS = {  # name -> (edit of the torch state, message)
    'a tensor of the wrong shape': (lambda s: s['model'].update({'conv1.weight': torch.zeros(3, 3)}),
                                    "'model'['conv1.weight'] is (3, 3) torch.float32, this run's is (16, 1, 5, 5)"),
    'a tensor of the wrong dtype': (lambda s: s['model'].update({'fc3.bias': s['model']['fc3.bias'].double()}),
                                    "'model'['fc3.bias'] is (512,) torch.float64"),
    'a tensor missing': (lambda s: s['model'].pop('fc3.bias'), "'model' lacks ['fc3.bias']"),
    'model not a dict': (lambda s: s.update(model=[1, 2]), "'model' is a list, not a dict"),
    'no optimizer': (lambda s: s.pop('optimizer'), "no 'optimizer'"),
    'learning rate of text': (lambda s: s['optimizer']['param_groups'][0].update(lr='fast'),
                              "'optimizer'['param_groups'][0]['lr'] is a str, not a number"),
    'scheduler with a key of its own': (lambda s: s['scheduler'].update(optimizer=None),
                                        "'scheduler' has keys of its own: ['optimizer']"),
    'NaN weights': (lambda s: set_nan(s['model']['fc3.weight']), 'holds NaN or infinite values'),
}
TAMPERED = [(kind, name, tamper, message) for kind, cases in (('npz', RUN_JSON), ('pt', RUN_JSON), ('npz', ARRAYS),
                                                              ('pt', STATE_DICTS))
            for name, (tamper, message) in cases.items()]


@pytest.mark.parametrize('kind, case, tamper, message', TAMPERED,
                         ids=[f'{kind}-{case}' for kind, case, *_ in TAMPERED])
def test_a_tampered_checkpoint_is_refused_and_changes_nothing(run_main, finished_runs, tmp_path, kind, case, tamper,
                                                              message):
    run_dir = finished_runs.copy(kind, tmp_path)
    path = os.path.join(run_dir, checkpoint.NPZ if kind == 'npz' else checkpoint.PT)
    state = load_checkpoint(path)
    tamper(state)
    save_checkpoint(path, state)
    assert_resume_refused(run_main, BASES[kind], run_dir, path, message)


def assert_resume_refused(run_main, script, run_dir, path, message):
    """--resume run_dir ends in one line naming path and saying message; not one file in run_dir changes."""
    before = contents(run_dir)
    code, _, err = run_main(script, ['--resume', run_dir])
    assert_refused(code, err, message)
    assert err.startswith(f'error: {path}: '), err
    assert 'weights_only' not in err  # torch's advice, to load it anyway, is the one thing not to pass on
    assert contents(run_dir) == before


def rezip(path, compression=zipfile.ZIP_STORED, edit=None):
    """Writes path's zip again member by member, with `compression`; edit(name, data) -> data changes members."""
    with zipfile.ZipFile(path) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, 'w', compression) as target:
        for name, data in members:
            target.writestr(name, edit(name, data) if edit else data)


def replace_member(path, member, data):
    rezip(path, edit=lambda name, old: data if name == member else old)


def claim_size(path, member_suffix, size):
    """Makes the zip's central directory claim `size` bytes for the member whose name ends in member_suffix
    (its data stays as it is): what a reader trusting the directory would allocate."""
    with open(path, 'rb') as f:
        content = bytearray(f.read())
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith(member_suffix))
    name = member.filename.encode()  # a central directory entry: signature, 42 bytes of fields, the name
    entry = next(match.start() for match in re.finditer(rb'PK\x01\x02', content)
                 if content[match.start() + 46:match.start() + 46 + len(name)] == name)
    content[entry + 20:entry + 28] = struct.pack('<II', size, size)  # compressed and uncompressed size
    with open(path, 'wb') as f:
        f.write(content)


def npy_claiming(shape, dtype='<f8'):
    """A .npy whose header claims an array of `shape`, followed by 16 bytes of data only."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': dtype, 'fortran_order': False, 'shape': shape})
    return b'\x93NUMPY\x01\x00' + header.getvalue()[8:] + bytes(16)


def pt_with_code(path, marker):
    torch.save({'model': _Evil(f'touch {marker}'), 'run': '{}'}, path)


FILES = {  # name -> (kind of run, file, how it is tampered with, message)
    'npz compressed': ('npz', checkpoint.NPZ, lambda path: rezip(path, zipfile.ZIP_DEFLATED), 'is compressed'),
    'pt compressed': ('pt', checkpoint.PT, lambda path: rezip(path, zipfile.ZIP_DEFLATED), 'is compressed'),
    'npz array claims more than it holds': (
        'npz', checkpoint.NPZ, lambda path: replace_member(path, 'fc3.weights.npy', npy_claiming((4096, 4096))),
        "fc3.weights.npy claims (4096, 4096) float64, more than its"),
    'npz zip directory claims more than the file': (
        'npz', checkpoint.NPZ, lambda path: claim_size(path, 'fc3.weights.npy', 2 ** 31), 'claims 2147483648 bytes'),
    'pt zip directory claims more than the file': (
        'pt', checkpoint.PT, lambda path: claim_size(path, 'data/0', 2 ** 31), 'claims 2147483648 bytes'),
    'pt truncated': ('pt', checkpoint.PT, lambda path: os.truncate(path, os.path.getsize(path) // 2),
                     'not a checkpoint of this run'),
    'pt that would run code': ('pt', checkpoint.PT, lambda path: pt_with_code(path, path + '.pwned'),
                               'refused to load it: it holds more than tensors and plain values, it would call'),
    'best_model.pt of the wrong shapes': (
        'cifar', 'best_model.pt', lambda path: torch.save({'conv1.weight': torch.zeros(2, 2)}, path),
        "'state_dict' lacks ['conv1.bias', 'conv2.bias'"),
    'best_model.pt that would run code': ('cifar', 'best_model.pt', lambda path: pt_with_code(path, path + '.pwned'),
                                          'refused to load it'),
}


@pytest.mark.parametrize('case', list(FILES))
def test_a_tampered_checkpoint_file_is_refused_and_changes_nothing(run_main, finished_runs, tmp_path, case):
    kind, name, tamper, message = FILES[case]
    run_dir = finished_runs.copy(kind, tmp_path)
    path = os.path.join(run_dir, name)
    tamper(path)
    if name == 'best_model.pt':  # read at the end of training: stopped after its last epoch, before its test
        state = load_checkpoint(os.path.join(run_dir, checkpoint.PT))
        run_json(lambda fields: fields['results'].pop('finished'))(state)
        save_checkpoint(os.path.join(run_dir, checkpoint.PT), state)
    assert_resume_refused(run_main, BASES[kind], run_dir, path, message)
    assert not os.path.exists(path + '.pwned')


# ----------------------------------------------------------------------------- 4. races, temporary files, a full disk

# Runs train.py once both processes are ready (their imports done), so that the two start within a millisecond
# of each other: imports take a second or two, and their jitter would otherwise decide the race.
STARTING_TOGETHER = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import train  # the slow imports, before the start line
open({ready!r}, 'w').close()
while not all(os.path.exists(path) for path in {all_ready!r}):
    time.sleep(0.001)
sys.argv = [os.path.join({root!r}, 'train.py'), *{argv!r}]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_two_runs_of_one_name_started_at_once_one_wins(data_dir, tmp_path):
    """Both pass the early check (no such folder yet) and race for os.mkdir: exactly one may get the folder.
    If the second was too late even for the early check (its message says so), the round is repeated."""
    for round_ in range(5):
        save_dir, ready = tmp_path / f'round{round_}', [str(tmp_path / f'ready{round_}-{seed}') for seed in (1, 2)]
        runs = {seed: subprocess.Popen(
            [sys.executable, '-c', STARTING_TOGETHER.format(
                root=ROOT, ready=ready[seed - 1], all_ready=ready,
                argv=command_line('train.py', data_dir, save_dir, '--run-name', 'same', '--seed', str(seed)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)}
        ends = {}  # seed -> (exit code, stderr)
        for seed, process in runs.items():
            _, err = process.communicate(timeout=300)
            ends[seed] = process.returncode, err
        winners = [seed for seed, (code, _) in ends.items() if code == 0]
        assert len(winners) == 1, ends
        [(code, err)] = [end for seed, end in ends.items() if seed not in winners]
        assert_refused(code, err, f"run folder {save_dir / 'same'} exists; pick another --run-name")
        config = strict_json(save_dir / 'same' / 'config.json')
        assert config['args']['seed'] == winners[0] and strict_json(save_dir / 'same' / 'results.json')['finished']
        assert os.listdir(save_dir) == ['same'] and not temporaries(save_dir)
        if 'continue it with --resume' not in err:  # make_run_dir's message: it lost at os.mkdir
            return
    pytest.fail("in 5 rounds the second run never got past the early check: no race for os.mkdir to test")


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two --resume of one run write the same files at once: each through a temporary file of its own."""
    path, both_writing, temporaries_seen = str(tmp_path / 'results.json'), threading.Barrier(2), []

    def writer(text):
        def write(tmp_path):
            temporaries_seen.append(tmp_path)
            with open(tmp_path, 'w') as f:
                f.write(text)
            both_writing.wait(timeout=30)  # both temporary files exist, each half of a run's writing
        return lambda: cli.atomic_write(path, write)
    threads = [threading.Thread(target=writer(text * 10000)) for text in ('a', 'b')]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(temporaries_seen)) == 2
    assert open(path).read() in ('a' * 10000, 'b' * 10000) and os.listdir(tmp_path) == ['results.json']
    assert os.stat(path).st_mode & 0o777 == cli._file_mode()  # as open() would have made it, not mkstemp's 0600


FULL_DISK = {  # name -> (script, the file that does not fit, at its n-th write, (epochs done, steps) on disk)
    'train.py checkpoint after epoch 1': ('train.py', checkpoint.NPZ, 2, (0, 0)),
    'train.py results.json': ('train.py', 'results.json', 1, (0, 0)),
    'train.py conv1 filters of epoch 2': ('train.py', 'conv1_epoch_02_step_000004.png', 1, (2, 0)),
    'train.py weights.npz': ('train.py', 'weights.npz', 1, (2, 0)),
    'train_pytorch.py checkpoint after epoch 1': ('train_pytorch.py', checkpoint.PT, 2, (0, 0)),
    'train_pytorch.py log.csv': ('train_pytorch.py', 'log.csv', 2, (2, 0)),
    'train_cifar.py best_model.pt': ('train_cifar.py', 'best_model.pt', 1, (0, 0)),
    'train_cifar.py training_plot.png': ('train_cifar.py', 'training_plot.png', 1, (1, 0)),
}


@pytest.mark.parametrize('case', list(FULL_DISK))
def test_a_full_disk_stops_with_the_resume_hint_and_keeps_the_last_checkpoint(run_main, data_dir, tmp_path, case):
    script, name, nth, on_disk = FULL_DISK[case]
    run_dir = tmp_path / 'run'
    with watched_writes(tmp_path, full_disk_at=(name, nth)):
        code, _, err = run_main(script, command_line(script, data_dir, tmp_path, '--run-name', 'run', epochs=2))
    assert_refused(code, err, f'[Errno 28] No space left on device; the last checkpoint is in {run_dir}; continue '
                              f'with: python {script} --resume {run_dir}')
    assert where_checkpoint_stands(str(run_dir)) == on_disk  # whole, and where the run stood
    assert not temporaries(run_dir)
    if nth == 1:  # never half a file under its name
        assert not (run_dir / name).exists()


def test_a_full_disk_before_training_leaves_no_run_folder(run_main, data_dir, tmp_path):
    with watched_writes(tmp_path, full_disk_at=('config.json', 1)):
        code, _, err = run_main('train.py', command_line('train.py', data_dir, tmp_path, '--run-name', 'run'))
    assert_refused(code, err, '[Errno 28] No space left on device')
    assert os.listdir(tmp_path) == []  # the folder would block its name and is no run to --resume


@pytest.mark.parametrize('kind', list(BASES))
def test_every_file_of_a_run_is_written_to_a_temporary_file_and_renamed(finished_runs, kind):
    opened, written = finished_runs.opened(kind), set(contents(finished_runs.folder(kind)))
    assert written and not [path for path in opened if not os.path.basename(path).startswith('.')]
    # every file there was first a temporary '.<name>.<random>' that one of those open() calls wrote
    assert all(any(os.path.basename(path).startswith(f'.{os.path.basename(name)}.') for path in opened)
               for name in written)


@contextlib.contextmanager
def file_size_limit(limit):
    """Writes of this process past `limit` bytes fail with EFBIG, as a full disk fails them (SIGXFSZ, which
    would kill the process instead, is ignored meanwhile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_real_write_failure_in_torch_save_is_one_line(run_main, data_dir, tmp_path):
    """torch.save's own writer reports a failed write as a RuntimeError; checkpoint.save_torch must give the
    OSError. Past 300 kB every write fails here: the first file that large is checkpoint.pt (1.7 MB)."""
    run_dir = tmp_path / 'run'
    with file_size_limit(300_000):
        code, _, err = run_main('train_cifar.py',
                                command_line('train_cifar.py', data_dir, tmp_path, '--run-name', 'run'))
    assert_refused(code, err, f'[Errno 27] File too large; the last checkpoint is in {run_dir}')
    assert not temporaries(run_dir) and not (run_dir / checkpoint.PT).exists()


# ----------------------------------------------------------------------------- 5. memory bombs

@pytest.mark.parametrize('case, tamper, message', [
    ('npy header claims 8 GiB',
     lambda path: replace_member(path, 'fc3.weights.npy', npy_claiming((2 ** 15, 2 ** 15))), 'claims (32768, 32768)'),
    ('zip directory and npy header claim 2 GiB',  # the header's claim fits in what the directory claims
     lambda path: (replace_member(path, 'fc3.weights.npy', npy_claiming((2 ** 28,))),
                   claim_size(path, 'fc3.weights.npy', 2 ** 31 + 2 ** 10)), 'claims 2147484672 bytes'),
])
def test_a_checkpoint_claiming_a_huge_array_allocates_nothing(finished_runs, tmp_path, case, tamper, message):
    """--resume in a process whose address space is capped at 768 MiB (train.py needs about 450 MiB with one
    BLAS thread): had it allocated the claimed array, it would end in a MemoryError traceback."""
    run_dir = finished_runs.copy('npz', tmp_path)
    path = os.path.join(run_dir, checkpoint.NPZ)
    tamper(path)
    before = contents(run_dir)
    limit = 768 * 2 ** 20
    result = run_script('train.py', ['--resume', run_dir],
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
                        env={**os.environ, 'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1'})
    assert_refused(result.returncode, result.stderr, message)
    assert result.stderr.startswith(f'error: {path}: ')
    assert contents(run_dir) == before


# ----------------------------------------------------------------------------- 6. torchrun's environment

FAST = ['--device', 'cpu', '--widths', '8,16,16', '--batch-size', '16', '--valid-size', '20', '--limit', '20',
        '--epochs', '1', '--threads', '1']


def fast_run(data_dir, save_dir, environment, **options):
    """train_cifar_fast.py as torchrun's process would be started, with `environment` in place of torchrun's."""
    env = {name: value for name, value in os.environ.items() if name not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK',
                                                                           'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                                                                           'MASTER_PORT')}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_cifar_fast.py'), '--data-dir', data_dir,
                             '--save-dir', str(save_dir), *FAST], env={**env, **environment},
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, **options)


@pytest.mark.parametrize('environment, message', [
    ({'WORLD_SIZE': 'x'}, "WORLD_SIZE='x' is not an integer >= 1"),
    ({'WORLD_SIZE': '0'}, "WORLD_SIZE='0' is not an integer >= 1"),
    ({'WORLD_SIZE': '2', 'RANK': '-1'}, "RANK='-1' is not an integer >= 0"),
    ({'WORLD_SIZE': '2', 'RANK': '2'}, 'RANK 2 / LOCAL_RANK 0 do not fit in WORLD_SIZE 2'),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_PORT': '29500'}, 'environment variable MASTER_ADDR is not set'),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': 'localhost'}, 'environment variable MASTER_PORT is not set'),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': 'localhost', 'MASTER_PORT': 'http'},
     "MASTER_PORT='http' is not an integer >= 1"),
])
def test_a_broken_torchrun_environment_is_one_line(data_dir, tmp_path, environment, message):
    process = fast_run(data_dir, tmp_path, environment)
    _, err = process.communicate(timeout=120)
    assert_refused(process.returncode, err, message)
    assert os.listdir(tmp_path) == []


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('rank', ['0', '1'])  # process 0 hosts the rendezvous, the others connect to it
def test_sigterm_stops_a_process_waiting_for_its_peers(data_dir, tmp_path, rank):
    """Alone in a world of two, the process waits for its peer, for 30 minutes by default; SIGTERM must stop
    it at once, with one line and the exit code of SIGTERM."""
    process = fast_run(data_dir, tmp_path, {'WORLD_SIZE': '2', 'RANK': rank, 'MASTER_ADDR': '127.0.0.1',
                                            'MASTER_PORT': str(_free_port())})
    time.sleep(8)  # importing torch and starting the rendezvous; the peer never comes
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == 'interrupted', err
    assert os.listdir(tmp_path) == []
