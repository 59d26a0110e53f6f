"""Flags weighed before any work: what a flag will cost (memory, threads, a name's bytes) is checked against the
machine, and every combination that could only fail later is refused first. Each case runs in a process of its
own under an address-space limit: one line on stderr, exit code 2, no traceback, no run folder, and no data
loaded (the data folder does not even exist). And a run killed again and again while it writes leaves no
temporary file behind once it is resumed to the end."""
import json
import os
import resource
import subprocess
import sys

import pytest

from conftest import ROOT, make_synthetic_mnist
from test_resume import pausing

LIMIT = {'torch': 5 * 2 ** 30, 'numpy': 1536 * 2 ** 20}  # torch's CUDA build maps 3.1 GiB when imported
TORCH_SCRIPTS = {'train_pytorch.py', 'train_cifar.py', 'hinge_loss.py', 'train_cifar_fast.py', 'bench_cifar.py',
                 'bench_layers.py'}


def run_script(script, *flags, cwd=None):
    limit = LIMIT['torch' if script in TORCH_SCRIPTS else 'numpy']
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                          timeout=120, cwd=cwd,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


EMOJI = '\N{GRINNING FACE}' * 70  # 70 characters, 280 bytes: more than a file name may hold

CASES = {  # case -> (script, flags, a phrase of the message)
    'MNIST batch too big for memory': ('train.py', ['--batch-size', '50000'], '--batch-size 50000 needs about'),
    'MNIST batch too big in float64': ('train_l2reg.py', ['--batch-size', '20000', '--dtype', 'float64'],
                                       '--batch-size 20000 needs about'),
    'torch MNIST batch too big': ('train_pytorch.py', ['--batch-size', '54000'], '--batch-size 54000 needs about'),
    'CIFAR batch too big': ('train_cifar.py', ['--batch-size', '44000'], '--batch-size 44000 needs about'),
    'CIFAR batch of the hinge run too big': ('hinge_loss.py', ['--batch-size', '40000', '--compare'],
                                             '--batch-size 40000 needs about'),
    'bench batch of a hundred million': ('bench_layers.py', ['--batch-size', '100000000'],
                                         '--batch-size 100000000 at'),
    'bench threads beyond the CPUs': ('bench_layers.py', ['--threads', '1', '4096'], '--threads 4096 is more than'),
    'bench seed below zero': ('bench_layers.py', ['--seed', '-1'], 'argument --seed: must be in 0 .. 2**32 - 1'),
    'a batch larger than MNIST': ('train.py', ['--batch-size', '60000'], 'is larger than the 55000 training images'),
    'a batch larger than the limit': ('train_cifar.py', ['--batch-size', '300', '--limit', '200'],
                                      'is larger than the 200 training images left by --limit'),
    'run name of 280 bytes': ('train.py', ['--run-name', EMOJI], '--run-name is 280 bytes long, more than a file name'),
    'run name of 86 euro signs': ('train_cifar.py', ['--run-name', '\N{EURO SIGN}' * 86],
                                  '--run-name is 258 bytes long, more than a file name may be'),
    'validation takes all of MNIST': ('train_pytorch.py', ['--valid-size', '60000'],
                                      '--valid-size 60000 leaves no MNIST training images'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_costly_or_impossible_flag_is_refused_before_any_work(tmp_path, case):
    script, flags, phrase = CASES[case]
    data = [] if script.startswith('bench') else ['--data-dir', str(tmp_path / 'no-data')]
    result = run_script(script, *flags, '--save-dir', str(tmp_path / 'runs'), *data)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0] and 'Traceback' not in result.stderr, result.stderr
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'no-data').exists()


def test_killed_again_and_again_while_it_draws_a_resumed_run_leaves_no_temporary_file(tmp_path):
    """SIGKILL in the middle of writing a figure, eight times (the first run and seven --resumes, each killed at
    another figure): every kill leaves a half file, which the next process on the folder removes when it takes
    the folder; the last --resume finishes with none left."""
    data_dir = make_synthetic_mnist(str(tmp_path / 'data'), num_train=200, num_test=20)
    run_dir = tmp_path / 'runs' / 'run'
    first = [sys.executable, os.path.join(ROOT, 'train.py'), '--data-dir', data_dir, '--valid-size', '100',
             '--batch-size', '10', '--epochs', '3', '--draw-every', '1', '--layers', 'fast',
             '--save-dir', str(tmp_path / 'runs'), '--run-name', 'run']
    again = [sys.executable, os.path.join(ROOT, 'train.py'), '--resume', str(run_dir), '--data-dir', data_dir]
    for attempt in range(8):
        # skimage.io.imsave writes into atomic_write's temporary file: kill the process in the middle of it
        process = subprocess.Popen(pausing(f'at:skimage.io.imsave:{2 + attempt}', again if attempt else first),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in process.stdout:
            if line.startswith('paused at'):
                break
        else:
            pytest.fail(f"run {attempt} never drew a figure")
        process.kill()
        process.wait(timeout=60)
        assert temporaries(run_dir), f"kill {attempt} left no half file: the test did not test"
    result = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not temporaries(run_dir)
    assert json.loads((run_dir / 'results.json').read_text())['finished']


def temporaries(folder):
    return [name for _, _, names in os.walk(folder) for name in names if '.tmp-' in name]
