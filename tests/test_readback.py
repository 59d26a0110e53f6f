"""What a run reads back from its own folders is data too: config.json, the checkpoints, a finished run's
outputs, lab.py's steps.json and the files its report reads. Each case is a process of its own under a time
limit and, where a bomb is the point, an address-space limit; each must end in one line on stderr naming the
file, exit code 2, no traceback, and not one file of the folder changed. And a run folder is held for the
run's whole life: a second process on a live one is refused."""
import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
from conftest import CIFAR_NAMES, ROOT, make_synthetic_cifar, make_synthetic_mnist
from test_hostile_runs import BASES, FinishedRuns, command_line, load_checkpoint, save_checkpoint
from test_resume import pausing

# The address space of a case's process: enough for the script (torch's CUDA build maps 3.1 GiB when imported),
# far too little for a bomb.
LIMITS = {'train.py': 1536 * 2 ** 20, 'train_l2reg.py': 1536 * 2 ** 20, 'lab.py': 6 * 2 ** 30}
TORCH_LIMIT = 5 * 2 ** 30


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data'))
    make_synthetic_mnist(root, num_train=80, num_test=10)
    make_synthetic_cifar(root, per_batch=10)
    return root


@pytest.fixture(scope='module')
def finished_runs(data_dir, tmp_path_factory):
    return FinishedRuns(data_dir, tmp_path_factory.mktemp('finished'))


def run_script(script, argv, timeout=90):
    limit = LIMITS.get(script, TORCH_LIMIT)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env={**os.environ, 'OPENBLAS_NUM_THREADS': '1'})


def assert_refused(result, *phrases):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def assert_resume_refused(script, run_dir, *phrases):
    before = contents(run_dir)
    assert_refused(run_script(script, ['--resume', run_dir]), *phrases)
    assert contents(run_dir) == before


def contents(folder):
    """{path under folder: what it is}: a regular file's SHA-256 and last write, a FIFO's or a link's kind (a
    FIFO read here would block, /dev/zero never end)."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                with open(path, 'rb') as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest(), info.st_mtime_ns
            else:
                found[os.path.relpath(path, folder)] = stat.filemode(info.st_mode), os.path.islink(path) and \
                    os.readlink(path)
    return found


def nested(depth):
    return '[' * depth + ']' * depth


# ----------------------------------------------------------------------------- config.json

def fifo(path):
    os.remove(path)
    os.mkfifo(path)


def zero_device(path):
    os.remove(path)
    os.symlink('/dev/zero', path)


def sparse(path, size=3 * 2 ** 30):
    with open(path, 'r+b') as f:
        f.truncate(size)


CONFIGS = {  # case -> (how config.json is made, a phrase of the message)
    'a FIFO': (fifo, 'config.json: not a regular file'),
    'a link to /dev/zero': (zero_device, 'config.json: not a regular file'),
    'a 3 GB sparse file': (sparse, 'more than such a file has'),
    'nested 100,000 deep': (lambda path: open(path, 'w').write(nested(100_000)), 'JSON nested more than 32 deep'),
    'a list': (lambda path: open(path, 'w').write('[1, 2]'), 'the value is a list, not a dict'),
    'no argv': (lambda path: open(path, 'w').write('{"script": "train.py"}'), "config.json: no 'argv'"),
    'argv of numbers': (lambda path: open(path, 'w').write('{"script": "train.py", "argv": [1, 2]}'),
                        'argv[0] is 1, not a str'),
    'a flag of no script': (lambda path: json.dump({'script': 'train.py', 'argv': ['--fly']}, open(path, 'w')),
                            "its command line is not this script's (unrecognized arguments: --fly)"),
    'a seed out of range': (lambda path: json.dump({'script': 'train.py', 'argv': ['--seed', '-3']}, open(path, 'w')),
                            "its command line is not this script's (argument --seed"),
    'a --resume of its own': (lambda path: json.dump({'script': 'train.py', 'argv': ['--resume', 'x']},
                                                     open(path, 'w')), 'its command line has a --resume'),
    'NaN in it': (lambda path: open(path, 'w').write('{"script": "train.py", "argv": [], "x": NaN}'),
                  'not valid JSON (NaN is not JSON)'),
    'a megabyte of script name': (lambda path: json.dump({'script': 'x' * 2 ** 20, 'argv': []}, open(path, 'w')),
                                  'more than such a file has'),
    'not UTF-8': (lambda path: open(path, 'wb').write(b'{"script": "\xff"}'), 'not UTF-8 text'),
}


@pytest.mark.parametrize('case', list(CONFIGS))
def test_a_broken_config_json_is_one_line_and_changes_nothing(finished_runs, tmp_path, case):
    run_dir = finished_runs.copy('npz', tmp_path)
    make, phrase = CONFIGS[case]
    make(os.path.join(run_dir, 'config.json'))
    assert_resume_refused('train.py', run_dir, phrase)


# ----------------------------------------------------------------------------- checkpoints

def tamper_with(path, edit):
    state = load_checkpoint(path)
    edit(state)
    save_checkpoint(path, state)


def shared_references(state):
    """A list of 1000 references to a list of 1000 references to 1000 ints: 3 MB on disk, a billion items walked."""
    inner = list(range(1000))
    middle = [inner] * 1000
    state['optimizer']['state'] = {0: {'momentum_buffer': [middle] * 1000}}


def deep(state):
    """'run' a list nested 20,000 deep (saving it needs a higher recursion limit; reading it back must not)."""
    value = []
    for _ in range(20_000):
        value = [value]
    state['run'] = value
    sys.setrecursionlimit(100_000)


CHECKPOINTS = {  # case -> (kind, how the checkpoint is broken, a phrase of the message)
    'npz: a FIFO': ('npz', fifo, 'not a regular file'),
    'npz: a link to /dev/zero': ('npz', zero_device, 'not a regular file'),
    'npz: a 3 GB sparse file': ('npz', sparse, 'more than such a file has'),
    'npz: an array of its own': ('npz', lambda path: tamper_with(path, lambda s: s.update(extra=np.zeros(3))),
                                 "it holds 'extra' of its own"),
    'npz: epoch seconds infinite': ('npz', lambda path: tamper_with(path, lambda s: s.update(run=np.array(
        str(s['run']).replace('"epoch_seconds": 0.0', '"epoch_seconds": Infinity')))), 'Infinity is not JSON'),
    'npz: run nested 100,000 deep': ('npz', lambda path: tamper_with(path, lambda s: s.update(run=np.array(
        nested(100_000)))), 'JSON nested more than 32 deep'),
    'pt: a FIFO': ('pt', fifo, 'not a regular file'),
    'pt: shared references': ('pt', lambda path: tamper_with(path, shared_references),
                              "is not an optimizer's state: one flat dict of values per parameter"),
    'pt: run nested 20,000 deep': ('pt', lambda path: tamper_with(path, deep), 'not JSON text but a list'),
    'pt: not a dict': ('pt', lambda path: torch.save([1, 2, 3], path), 'a list, not a dict'),
    'pt: run a huge list': ('pt', lambda path: tamper_with(path, lambda s: s.update(run=[[0] * 1000] * 1000)),
                            'not JSON text but a list'),
}


@pytest.mark.parametrize('case', list(CHECKPOINTS))
def test_a_broken_checkpoint_is_one_line_bounded_and_changes_nothing(finished_runs, tmp_path, case):
    kind, make, phrase = CHECKPOINTS[case]
    run_dir = finished_runs.copy(kind, tmp_path)
    path = os.path.join(run_dir, checkpoint.NPZ if kind == 'npz' else checkpoint.PT)
    make(path)
    assert_resume_refused(BASES[kind], run_dir, f'{path}: not a checkpoint of this run', phrase)


# ----------------------------------------------------------------------------- a finished run's outputs

def truncate_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


FINISHED = {  # case -> (kind, the file, how it is broken, a phrase)
    'weights.npz truncated': ('npz', 'weights.npz', truncate_half, 'weights.npz: not a checkpoint of this run'),
    'weights.npz of another run': ('npz', 'weights.npz', lambda path: np.savez(path, **{
        key: value + 1 for key, value in np.load(path).items()}), 'not the final weights of this finished run'),
    "torch's weights.npz gone": ('pt', 'weights.npz', os.remove, 'weights.npz: not a checkpoint of this run (cannot '
                                                                 'read (No such file or directory))'),
    'best_model.pt truncated': ('cifar', 'best_model.pt', truncate_half, 'best_model.pt: not a checkpoint'),
    'results.json rolled back': ('npz', 'results.json', lambda path: json.dump(
        {k: v for k, v in json.load(open(path)).items() if k != 'test'}, open(path, 'w')),
        'results.json: not the results of this finished run'),
    'results.json a FIFO': ('pt', 'results.json', fifo, 'results.json: not a regular file'),
}


@pytest.mark.parametrize('case', list(FINISHED))
def test_a_finished_run_with_a_broken_output_is_not_reported_finished(finished_runs, tmp_path, case):
    kind, name, make, phrase = FINISHED[case]
    run_dir = finished_runs.copy(kind, tmp_path)
    make(os.path.join(run_dir, name))
    assert_resume_refused(BASES[kind], run_dir, phrase)


# ----------------------------------------------------------------------------- a run folder is held

def test_a_live_run_holds_its_folder_and_a_second_process_is_refused(data_dir, tmp_path):
    """Two processes, one folder: the live run trains; --resume of it from a second process is refused while
    it lives; the first then finishes whole, and its results are final."""
    run_dir = tmp_path / 'run'
    argv = command_line('train.py', data_dir, tmp_path, '--run-name', 'run', epochs=2)
    live = subprocess.Popen(pausing('2:1', [sys.executable, os.path.join(ROOT, 'train.py'), *argv]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in live.stdout:
        if line.startswith('paused at'):
            break
    before = contents(run_dir)
    second = run_script('train.py', ['--resume', str(run_dir)])
    assert_refused(second, f'run folder {run_dir} is in use by another process')
    assert contents(run_dir) == before
    live.send_signal(signal.SIGINT)  # the pause ends; the live run saves where it stands and stops
    live.communicate(timeout=120)
    assert live.returncode == 130
    resumed = run_script('train.py', ['--resume', str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['finished'] and len(results['epochs']) == 2 and 'test' in results


def test_a_sweep_folder_is_held_too(data_dir, tmp_path):
    run_dir = tmp_path / 'run'
    argv = command_line('train_l2reg.py', data_dir, tmp_path, '--run-name', 'run', '--sweep', '0', '0.1')
    live = subprocess.Popen(pausing('1:1:2', [sys.executable, os.path.join(ROOT, 'train_l2reg.py'), *argv]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in live.stdout:
        if line.startswith('paused at'):
            break
    assert_refused(run_script('train_l2reg.py', ['--resume', str(run_dir)]), 'is in use by another process')
    live.kill()
    live.wait(timeout=60)
    assert run_script('train_l2reg.py', ['--resume', str(run_dir)]).returncode == 0  # the OS let go of the lock


# ----------------------------------------------------------------------------- class names are data

BAD_NAMES = {  # case -> (the ten names, a phrase)
    'a name of 200 kB': (['x' * 200_000] + CIFAR_NAMES[1:], 'is not 1 to 40 printable characters'),
    'ten equal names': (['cat'] * 10, 'two classes share a name'),
    'a name with a newline': (['air\nplane'] + CIFAR_NAMES[1:], 'is not 1 to 40 printable characters'),
    'an empty name': ([''] + CIFAR_NAMES[1:], 'is not 1 to 40 printable characters'),
    'a name with a trailing space': (['cat '] + CIFAR_NAMES[1:], 'is not 1 to 40 printable characters'),
    'nine names': (CIFAR_NAMES[:9], 'a list of 10 class names'),
}


@pytest.mark.parametrize('case', list(BAD_NAMES))
def test_bad_class_names_are_refused_before_any_work(tmp_path, case):
    names, phrase = BAD_NAMES[case]
    data = make_synthetic_cifar(str(tmp_path / 'data'), per_batch=10, class_names=names)
    result = run_script('train_cifar.py', ['--data-dir', data, '--valid-size', '20', '--limit', '20', '--batch-size',
                                           '10', '--epochs', '1', '--device', 'cpu', '--save-dir', str(tmp_path / 'runs')])
    assert_refused(result, 'batches.meta: ', phrase)
    assert not (tmp_path / 'runs').exists()


# ----------------------------------------------------------------------------- lab.py's own files

@pytest.fixture(scope='module')
def lab_folder(tmp_path_factory):
    """A finished lab.py --quick folder: steps.json and every step's outputs."""
    root = tmp_path_factory.mktemp('lab')
    data = str(root / 'data')
    make_synthetic_mnist(data, num_train=1100, num_test=100)
    make_synthetic_cifar(data, per_batch=220)
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'lab.py'), '--quick', '--mnist-dir', data,
                             '--cifar-dir', data, '--save-dir', str(root / 'runs')], capture_output=True, text=True,
                            cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, str(root / 'runs')


LAB_FILES = {  # case -> (the file, how it is broken, a phrase)
    'steps.json a FIFO': ('steps.json', fifo, 'steps.json: not a regular file'),
    'steps.json nested deep': ('steps.json', lambda path: open(path, 'w').write(nested(50_000)),
                               'JSON nested more than 32 deep'),
    'steps.json with a step of no lab': ('steps.json', lambda path: json.dump(
        {**json.load(open(path)), 'rm -rf': {'seconds': 1, 'command': [], 'returncode': 0}}, open(path, 'w')),
        "'rm -rf' is no step of the lab"),
    'steps.json with seconds of text': ('steps.json', lambda path: json.dump(
        {name: {**record, 'seconds': 'long'} for name, record in json.load(open(path)).items()}, open(path, 'w')),
        'check_grads.seconds is a str, not a finite number >= 0'),
    "a step's results without its test": ('task1/results.json', lambda path: json.dump(
        {k: v for k, v in json.load(open(path)).items() if k != 'test'}, open(path, 'w')),
        "task1/results.json: no 'test'"),
    "a step's results a link to /dev/zero": ('task4/results.json', zero_device,
                                             'task4/results.json: not a regular file'),
    'the summary with a field of the wrong kind': ('summary/summary.json', lambda path: json.dump(
        {**json.load(open(path)), 'layers': 'many'}, open(path, 'w')), 'summary.json: not what its step writes'),
    'lab.json saying it was no quick run': ('lab.json', lambda path: open(path, 'w').write('{"quick": false}'),
                                            'holds a lab run without --quick'),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(LAB_FILES))
def test_a_broken_lab_file_is_one_line_and_changes_nothing(lab_folder, tmp_path, case):
    data, folder = lab_folder
    save_dir = str(tmp_path / 'lab')
    subprocess.run(['cp', '-a', folder, save_dir], check=True)
    name, make, phrase = LAB_FILES[case]
    make(os.path.join(save_dir, name))
    before = contents(save_dir)
    result = run_script('lab.py', ['--quick', '--mnist-dir', data, '--cifar-dir', data, '--save-dir', save_dir],
                        timeout=300)
    assert_refused(result, phrase)
    assert contents(save_dir) == before
