"""lab.py (make lab): every step of the lab on tiny synthetic data, REPORT.md with every section and
figure, and a second run that keeps what is done."""
import json
import os
import re
import subprocess
import sys

import pytest

import cli
import lab
from conftest import ROOT, make_synthetic_cifar, make_synthetic_mnist

SECTIONS = ["Do the layers' gradients agree", 'Why analytic rather than numerical', 'How are im2col_cython',
            'a sketch, tensor sizes and parameters', 'Receptive field of the last convolution',
            'Memory for the activations backprop needs', 'Initial loss and the number of classes',
            'Training (`python train.py`, the textbook layers)', 'L2 regularisation: lambda 0, 1e-3, 1e-2, 1e-1',
            'The same model in PyTorch, step for step', 'Training in PyTorch', 'CIFAR-10 with the lab',
            'Settings: 1 epochs, batch 50', 'Confusion matrix and per-class precision and recall',
            'The 20 misclassified test images', "conv1's filters, the default run", "conv1's filters, lambda 1e-4",
            'Choosing lambda (`make lab-extended`)', 'Multiclass hinge loss vs cross-entropy',
            'The two losses on equal terms', 'Wall time of each step']


# Class names as a data file may hold them: markup for the report's tables, mathtext for matplotlib, a Markdown
# image that points out of the published folder. Valid names (printable, short, distinct): they are escaped.
HOSTILE_NAMES = ['air|plane', '![leak](../../../../etc/hostname)', r'$\frac{1}{0}$', 'cat*', '_deer_', 'dog<b>',
                 '# frog', 'horse`', '[ship]', 'truck']


def run_lab(data_dir, save_dir, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'lab.py'), '--quick', '--mnist-dir', data_dir,
                           '--cifar-dir', data_dir, '--save-dir', save_dir, *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.fixture(scope='module')
def lab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('lab')
    data_dir = str(root / 'data')
    make_synthetic_mnist(data_dir, num_train=1100, num_test=100)
    make_synthetic_cifar(data_dir, per_batch=220, class_names=HOSTILE_NAMES)
    save_dir = str(root / 'runs')
    result = run_lab(data_dir, save_dir, '--extended', '--publish', str(root / 'published'))
    return root, data_dir, save_dir, result


@pytest.mark.slow
def test_the_report_answers_every_question_with_its_figures(lab_run):
    root, _, save_dir, result = lab_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = open(os.path.join(save_dir, 'REPORT.md')).read()
    for section in SECTIONS:
        assert section in report, section
    figures = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report)
    assert len(figures) >= 10
    for path in figures:
        assert os.path.isfile(os.path.join(save_dir, path)), path
        assert os.path.isfile(os.path.join(root, 'published', path)), path  # --publish copies them
    steps = lab.STEPS + lab.EXTENDED
    for step in steps:  # and the steps' output
        assert os.path.isfile(os.path.join(root, 'published', f'{step.name}.log')), step.name
    for path in ('check_grads.json', 'task1/results.json', 'task2/sweep.json', 'task2/wd_0.01/results.json',
                 'task3/log.csv', 'task4_seed43/config.json', 'bonus/compare.json', 'bonus_tune/tune.json', 'steps.json'):  # and the files the report read, from which the README takes numbers
        assert os.path.isfile(os.path.join(root, 'published', path)), path
    done = json.load(open(os.path.join(save_dir, 'steps.json')))
    assert list(done) == [step.name for step in steps]
    assert all(step['returncode'] == 0 and step['seconds'] > 0 for step in done.values())
    # numbers come from the runs' own files
    task1 = json.load(open(os.path.join(save_dir, 'task1', 'results.json')))
    assert f"Test accuracy **{task1['test']['accuracy']:.2%}**" in report and task1['config']['layers'] == 'textbook'
    assert 'A --quick run' in report and '(JPEG stand-in)' in report
    # class names from the data set are text, not markup, in the report; --publish copies no file a name points to
    assert r'\!\[leak\]\(\.\./\.\./\.\./\.\./etc/hostname\)' in report and '![leak]' not in report
    assert r'air\|plane' in report and r'\$\\frac\{1\}\{0\}\$' in report
    published = os.path.realpath(root / 'published')
    for parent, _, names in os.walk(root / 'published'):
        for name in names:
            assert os.path.realpath(os.path.join(parent, name)).startswith(published + os.sep)
    assert not os.path.exists(root / 'etc')
    # the cross-entropy run of the bonus is task 4's, not trained again
    assert not os.path.exists(os.path.join(save_dir, 'bonus', 'cross-entropy'))


@pytest.mark.slow
def test_a_second_run_keeps_what_is_done_and_redoes_what_is_not(lab_run):
    _, data_dir, save_dir, first = lab_run
    assert first.returncode == 0
    steps_path = os.path.join(save_dir, 'steps.json')
    steps = json.load(open(steps_path))
    del steps['bonus']  # as if the lab had stopped during its last step
    json.dump(steps, open(steps_path, 'w'))
    result = run_lab(data_dir, save_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [step.name for step in lab.STEPS if f'=== {step.name}: done before' in result.stdout]
    assert kept == [step.name for step in lab.STEPS if step.name != 'bonus']
    assert '=== bonus: ' in result.stdout and '--resume' in result.stdout  # its run folder goes on
    assert 'finished already' in result.stdout  # its hinge run had finished: nothing is trained again


@pytest.mark.slow
def test_a_folder_of_a_quick_lab_is_not_taken_for_a_lab_and_one_lab_at_a_time(lab_run):
    _, data_dir, save_dir, first = lab_run
    assert first.returncode == 0
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'lab.py'), '--mnist-dir', data_dir, '--cifar-dir',
                             data_dir, '--save-dir', save_dir], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'holds a lab run with --quick' in result.stderr
    with cli.locked(save_dir):  # as a lab.py still running there holds it
        result = run_lab(data_dir, save_dir)
    assert result.returncode == 2 and 'is in use by another process' in result.stderr
