"""Ctrl-C or SIGTERM at any moment of a run, from the first byte it writes to the last: the run stops with the
resume hint (exit 130 or 143, no traceback), and --resume finishes it into exactly what a run that was never
stopped writes, every file of it (summary.json and net.png too), bit for bit.

tests/pause_runner.py makes a run wait at the chosen moment (when a function of a shared module is called the
n-th time) until the signal comes."""
import os
import signal
import subprocess

import pytest

from test_resume import (SCRIPTS, assert_same_run, command, data_dirs, main, pausing,  # noqa: F401 (fixtures)
                         reference_runs)

MOMENTS = {  # name -> (script, function, its n-th call): where the run is waiting when the signal comes
    'right after the folder is claimed': ('train.py', 'cli.write_json', 1),           # config.json
    'while it answers the model questions': ('train.py', 'plots.draw_net', 1),
    'during the initial evaluation': ('train.py', 'nn.evaluate', 1),
    'during an epoch-end evaluation': ('train.py', 'nn.evaluate', 2),
    'during the final test': ('train.py', 'nn.evaluate', 6),                         # 1 + 2 per epoch + 1
    'while it draws the last figure': ('train.py', 'plots.plot_training_progress', 1),
    'while torch draws its first filters': ('train_pytorch.py', 'plots.draw_conv_filters', 1),
    'during the CIFAR-10 test': ('train_cifar.py', 'metrics.predict_logits', 5),      # 2 per epoch, then the test
    'while it draws the mistakes': ('train_cifar.py', 'plots.save_image_grid', 1),
}


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
@pytest.mark.parametrize('moment', list(MOMENTS))
def test_a_signal_at_any_moment_leaves_a_run_that_resume_finishes_exactly(moment, signum, data_dirs, reference_runs,
                                                                        tmp_path, capsys):
    script, function, nth = MOMENTS[moment]
    data_set, flags = SCRIPTS[script]
    run_dir = str(tmp_path / 'run')
    process = subprocess.Popen(pausing(f'at:{function}:{nth}', command(script, run_dir, data_dirs[data_set], flags)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith('paused at'):
            break
    else:
        pytest.fail(f"the run never reached {function} call {nth}: {process.stderr.read()[-2000:]}")
    process.send_signal(signum)
    _, errors = process.communicate(timeout=120)
    last_line = errors.strip().splitlines()[-1]
    assert process.returncode == 128 + signum, errors
    assert last_line == (f'interrupted: stopped by {signal.Signals(signum).name}; the last checkpoint is in '
                         f'{run_dir}; continue with: python {script} --resume {run_dir}'), errors
    assert 'Traceback' not in errors

    main(script, ['--resume', run_dir])
    reference = reference_runs(script)
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(reference))
    assert_same_run(run_dir, reference, script)


def test_a_second_signal_stops_at_once_and_the_run_still_resumes(data_dirs, reference_runs, tmp_path):
    """The second Ctrl-C lands while the first waits for the step: the run stops without saving there, and the
    last checkpoint it had resumes it."""
    data_set, flags = SCRIPTS['train.py']
    run_dir = str(tmp_path / 'run')
    process = subprocess.Popen(pausing('2:2', command('train.py', run_dir, data_dirs[data_set], flags)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith('paused at'):
            break
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130 and errors.strip().splitlines()[-1].endswith(f'--resume {run_dir}'), errors
    main('train.py', ['--resume', run_dir])
    assert_same_run(run_dir, reference_runs('train.py'), 'train.py')


def test_outside_a_run_folder_a_signal_stops_at_once_and_leaves_nothing(data_dirs, tmp_path):
    """While the data load, before the folder: nothing to resume, one line, no folder."""
    data_set, flags = SCRIPTS['train.py']
    run_dir = tmp_path / 'runs' / 'run'
    process = subprocess.Popen(pausing('at:data.prepare_mnist:1', command('train.py', str(run_dir),
                                                                          data_dirs[data_set], flags)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith('paused at'):
            break
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 143 and errors.strip() == 'interrupted', errors
    assert not run_dir.exists()
