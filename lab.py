"""The whole lab in one command: every task with the lab's settings, then a report that answers every
question of the lab text from the runs that produced the answers.

    python lab.py --mnist-dir ../shared/data --cifar-dir data   # make lab: about half an hour on 2 cores
    python lab.py --quick ...                                   # every step on a few hundred images

Each step is a script of this repository, run as its own process into <save-dir>/<step>/ (its output also in
<step>.log); then <save-dir>/REPORT.md is written. Run it again and it resumes: finished steps are kept and
a stopped one goes on from its checkpoint (--resume). steps.json records each step's command and wall time.
CIFAR-10 numbers measured on the JPEG stand-in say so. --publish DIR copies REPORT.md and its figures there.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
MNIST, CIFAR = 'mnist', 'cifar'
QUICK_MNIST = ['--limit', '500', '--valid-size', '500', '--epochs', '1']
QUICK_CIFAR = ['--limit', '500', '--valid-size', '500', '--epochs', '1']


class Step(typing.NamedTuple):
    """One step of the lab: a script of this repository with the lab's flags, run into <save-dir>/<name>/."""
    name: str
    script: str
    flags: list
    data_set: str = None      # MNIST, CIFAR, or None: the script reads no data
    quick_flags: list = []    # what --quick adds
    resumable: bool = True    # a training run with checkpoints: a stopped one goes on with --resume


STEPS = [
    Step('check_grads', 'check_grads.py', [], resumable=False),
    Step('summary', 'train.py', ['--summary-only'], resumable=False),
    Step('task1', 'train.py', [], MNIST, QUICK_MNIST),
    Step('task1_fast', 'train.py', ['--layers', 'fast'], MNIST, QUICK_MNIST),
    Step('task2', 'train_l2reg.py', ['--sweep', '--layers', 'fast'], MNIST, QUICK_MNIST),
    Step('task3_compare', 'train_pytorch.py', ['--compare-numpy', '--steps', '50'], MNIST,
         ['--steps', '5', '--valid-size', '500'], resumable=False),
    Step('task3', 'train_pytorch.py', [], MNIST, QUICK_MNIST),
    Step('task4', 'train_cifar.py', [], CIFAR, QUICK_CIFAR),
    Step('task4_lambda', 'train_cifar.py', ['--weight-decay', '1e-4'], CIFAR, QUICK_CIFAR),
    Step('bonus', 'hinge_loss.py', ['--compare'], CIFAR, QUICK_CIFAR),
]


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = os.environ.get('DATA_DIR', 'data')
    parser.add_argument('--mnist-dir', default=data_dir, help='folder holding MNIST/raw/ (default: $DATA_DIR, else ./data)')
    parser.add_argument('--cifar-dir', default=data_dir,
                        help='folder holding cifar-10-batches-py/ (default: $DATA_DIR, else ./data)')
    parser.add_argument('--save-dir', default=None, help='where the steps and REPORT.md go (default: runs/lab, '
                                                        'with --quick runs/lab-quick)')
    parser.add_argument('--quick', action='store_true', help='every step on a few hundred images, one epoch')
    parser.add_argument('--publish', metavar='DIR', default=None,
                        help='afterwards, copy REPORT.md and the figures it shows into DIR')
    args = parser.parse_args(argv)
    args.save_dir = args.save_dir or os.path.join('runs', 'lab-quick' if args.quick else 'lab')
    return args


# ----------------------------------------------------------------------------- running the steps

def command(step, args, resume):
    """The command line of one step: the script with the lab's flags (or --resume), its data and its folder."""
    line = [sys.executable, os.path.join(ROOT, step.script)]
    folder = os.path.join(args.save_dir, step.name)
    data = ['--data-dir', args.mnist_dir if step.data_set == MNIST else args.cifar_dir] if step.data_set else []
    if step.script == 'check_grads.py':  # no run folder: its checks go to one JSON file
        return line + ['--json', folder + '.json']
    if resume:
        return line + ['--resume', folder, *data]
    return line + [*step.flags, *(step.quick_flags if args.quick else []), *data,
                   '--save-dir', args.save_dir, '--run-name', step.name, '--overwrite']


def run_step(step, args, done):
    """Runs one step unless it finished before; its stdout goes to the screen and to <step>.log."""
    if done.get(step.name, {}).get('returncode') == 0:
        print(f"=== {step.name}: done before ({done[step.name]['seconds']:.0f} s), kept")
        return
    resume = step.resumable and os.path.exists(os.path.join(args.save_dir, step.name, cli.CONFIG))
    line = command(step, args, resume)
    print(f"=== {step.name}: {' '.join(os.path.relpath(part) if os.sep in part else part for part in line[1:])}",
          flush=True)
    log_path = os.path.join(args.save_dir, f'{step.name}.log')
    output = [open(log_path).read()] if os.path.exists(log_path) else []  # a resumed step adds to its log
    start, record = time.perf_counter(), done.setdefault(step.name, {'seconds': 0.0})
    # A session of its own: a terminal's Ctrl-C reaches lab.py alone, which passes it on exactly once (a
    # second signal would stop the step at once, without saving where it stands).
    process = subprocess.Popen(line, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    try:
        for text in process.stdout:
            print(text, end='', flush=True)
            output.append(text)
        process.wait()
    except KeyboardInterrupt as interrupt:  # let the step save where it stands, then stop
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if isinstance(interrupt, cli.Terminated) else signal.SIGINT)
        for text in process.stdout:
            output.append(text)
        process.wait()
        raise
    finally:
        record.update(command=line[1:], returncode=process.poll(), seconds=record['seconds'] + time.perf_counter() - start)
        cli.write_text(log_path, ''.join(output))
        cli.write_json(os.path.join(args.save_dir, 'steps.json'), done)
    if process.returncode != 0:
        raise cli.UserError(f"step {step.name} failed (exit code {process.returncode}); its output is in "
                            f"{log_path}; run lab.py again to go on")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.save_dir, exist_ok=True)
    steps_path = os.path.join(args.save_dir, 'steps.json')
    done = {}
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            done = json.load(f)
    try:
        for step in STEPS:
            run_step(step, args, done)
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, cli.Terminated) else signal.SIGINT
        raise cli.Interrupted("the lab stopped; run the same command again to go on where it stopped", signum) from None
    report = write_report(args.save_dir, done, args.quick)
    print(f"wrote {os.path.join(args.save_dir, 'REPORT.md')}; the whole lab took "
          f"{sum(r['seconds'] for r in done.values()) / 60:.1f} minutes")
    if args.publish:
        publish(report, args.publish)


# ----------------------------------------------------------------------------- the report

class Report:
    """REPORT.md's lines and the files it shows, read from the steps' own JSON files in `folder`."""

    def __init__(self, folder):
        self.folder, self.lines, self.files = folder, [], []

    def json(self, *path):
        with open(os.path.join(self.folder, *path)) as f:
            return json.load(f)

    def add(self, *lines):
        self.lines += lines

    def figure(self, caption, path):
        """A figure of the report: shown, captioned, and listed for --publish."""
        self.files.append(path)
        self.add(f"![{caption}]({path})", "", f"*{caption}* (`{path}`)", "")

    def filters_of(self, run):
        """The first and the last conv1 filter image of a run: (random init, after training)."""
        images = sorted(glob.glob(os.path.join(self.folder, run, 'conv1_epoch_*.png')))
        return [os.path.relpath(path, self.folder) for path in (images[0], images[-1])]


def percent(value):
    return f"{value:.2%}"


def check_grads_section(report):
    result = report.json('check_grads.json')
    worst = {}
    for check in result['checks']:
        worst[check['module']] = max(worst.get(check['module'], 0.0), check['max_rel_error'])
    params = sum(row['params'] for row in report.json('summary', 'summary.json')['layers'])
    report.add(
        "### Do the layers' gradients agree with numerical ones? (`python check_grads.py`)",
        f"{result['passed']} of {result['total']} checks pass, every layer of every layer module, in float64: "
        + ', '.join(f"the largest relative error of {module} is {error:.1e}" for module, error in worst.items())
        + f", below the lab's {result['tolerance']:g}. Every check: `check_grads.json`.", "",
        "### Why analytic rather than numerical gradients?",
        f"A numerical gradient needs two forward passes per parameter: for the lab's net, with {params:,} "
        f"parameters, {2 * params:,} forward passes per step, where backprop gets every gradient exactly for "
        f"about the cost of one more pass. Numerical gradients are approximate too (central differences "
        f"err by O(h^2) and by round-off), so they serve only to check the analytic ones.", "")


def model_section(report):
    summary = report.json('summary', 'summary.json')
    rows, answers = summary['layers'], summary['answers']
    table = ["| layer | output shape | parameters | receptive field | activations |", "|---|---|---:|---:|---:|"]
    for row in rows:
        rf = '' if row['name'] in ('input', 'loss') else 'whole image' if row['rf'] is None else f"{row['rf']}x{row['rf']}"
        table.append(f"| {row['name']} | {tuple(row['shape'])} | {row['params']:,} | {rf} | {row['activations']:,} |")
    table.append(f"| total | | {sum(r['params'] for r in rows):,} | | {summary['memory']['activations']:,} |")
    report.add(
        "### How are im2col_cython and col2im_cython used?",
        "`layers.Convolution.forward` turns the batch into columns with `im2col_cython`: one column per output "
        "pixel of every image, one row per (input channel, kernel row, kernel column), so the convolution is one "
        "matrix product `weights @ x_cols` (filters x columns), reshaped to (N, F, H', W'). `backward_params` "
        "multiplies the output gradient by the same columns; `backward_inputs` multiplies it by the weights and "
        "`col2im_cython` adds every column entry back onto the pixel it came from.", "",
        "### The net: a sketch, tensor sizes and parameters (`python train.py --summary-only`)")
    report.figure("the lab's net, drawn from its layer objects", 'summary/net.png')
    report.add(*table, "", answers['parameters'], "",
               "### Receptive field of the last convolution's features", answers['receptive_field'], "",
               f"### Memory for the activations backprop needs, batch {summary['memory']['batch_size']}",
               answers['memory'], "")


def task1_section(report):
    results, fast = report.json('task1', 'results.json'), report.json('task1_fast', 'results.json')
    init, final = report.filters_of('task1')
    report.add(
        "### Initial loss and the number of classes C", results['answers']['initial_loss'], "",
        "### Training (`python train.py`, the lab's layers.py)",
        f"Test accuracy **{percent(results['test']['accuracy'])}**, validation "
        f"{percent(results['epochs'][-1]['valid_acc'])} after {len(results['epochs'])} epoch(s), "
        f"{results['seconds_per_epoch']:.1f} s per epoch. The same run with the fast twins (`python train.py "
        f"--layers fast`): test accuracy {percent(fast['test']['accuracy'])}, {fast['seconds_per_epoch']:.1f} s per "
        f"epoch (the same sums in another order, so not the same bits).", "", epoch_table(results['epochs']), "")
    report.figure('task 1: loss, accuracy and learning rate per epoch', 'task1/training_plot.png')
    report.figure('conv1 filters at random initialisation', init)
    report.figure('conv1 filters after training', final)


def epoch_table(epochs, splits=('train', 'valid')):
    extra = 'valid_precision' in epochs[0]
    header = '| epoch | lr | ' + ' | '.join(f'{s} loss | {s} acc' for s in splits) + \
             (' | valid macro P | valid macro R' if extra else '') + ' | s |'
    lines = [header, '|' + '---:|' * (header.count('|') - 1)]
    for r in epochs:
        cells = [str(r['epoch']), f"{r['lr']:.4g}"] + [v for s in splits for v in (f"{r[f'{s}_loss']:.4f}",
                                                                                   percent(r[f'{s}_acc']))]
        cells += [percent(r['valid_precision']), percent(r['valid_recall'])] if extra else []
        lines.append('| ' + ' | '.join(cells + [f"{r['seconds']:.1f}"]) + ' |')
    return '\n'.join(lines)


def task2_section(report):
    sweep = report.json('task2', 'sweep.json')
    rows = sweep['rows']
    report.add("### L2 regularisation: lambda 1e-3, 1e-2, 1e-1 (`python train_l2reg.py --sweep`)", sweep['table'], "",
               f"Stronger regularisation shrinks conv1's filters (mean |w| {rows[0]['conv1_mean_abs_weight']:.3f} at "
               f"lambda {rows[0]['weight_decay']:g}, {rows[-1]['conv1_mean_abs_weight']:.3f} at "
               f"{rows[-1]['weight_decay']:g}) and costs accuracy ({percent(rows[0]['test_acc'])} -> "
               f"{percent(rows[-1]['test_acc'])} on the test set).", "")
    report.figure('conv1 filters: random init, then after training with each lambda', 'task2/sweep_filters.png')


def task3_section(report):
    compare = report.json('task3_compare', 'compare_numpy.json')
    results = report.json('task3', 'results.json')
    numpy_run = next(r for r in report.json('task2', 'sweep.json')['rows']
                     if r['weight_decay'] == results['config']['weight_decay'])
    report.add(
        "### The same model in PyTorch, step for step (`python train_pytorch.py --compare-numpy --steps 50`)",
        f"From the same initial weights, on the same {len(compare['steps'])} batches in float64, the losses of "
        f"the NumPy framework and of PyTorch differ by at most {compare['max_loss_rel_diff']:.1e} (relative) and "
        f"the weights after the last step by {compare['max_weight_rel_diff']:.1e}: {compare['verdict']} "
        f"(tolerance {compare['tolerance']:g}).", "",
        "### Training in PyTorch (`python train_pytorch.py`, lambda 1e-3)",
        f"Test accuracy **{percent(results['test']['accuracy'])}** (the NumPy framework with the same lambda, seed "
        f"and batches: {percent(numpy_run['test_acc'])}; the initialisations differ: PyTorch's kaiming_normal_, "
        f"NumPy's truncated normal), {results['seconds_per_epoch']:.1f} s per epoch.", "",
        epoch_table(results['epochs']), "")
    report.figure('task 3: loss, accuracy, learning rate and the L2 term per epoch', 'task3/training_plot.png')


def task4_section(report):
    results, other = report.json('task4', 'results.json'), report.json('task4_lambda', 'results.json')
    test, name = results['test'], results['data']['name']
    md = cli.markdown_text  # class names come from the data set's batches.meta
    per_class = ['| class | precision | recall |', '|---|---:|---:|'] + [
        f"| {md(c)} | {percent(test['precision'][c])} | {percent(test['recall'][c])} |" for c in test['precision']]
    worst = ['| image | true class | loss | top 3 (softmax probability) |', '|---:|---|---:|---|'] + [
        f"| {m['index']} | {md(m['true'])} | {m['loss']:.2f} | " + ', '.join(f"{md(c)} {p:.2f}" for c, p in m['top3'])
        + ' |' for m in results['worst_mistakes']]
    init, final = report.filters_of('task4_lambda')
    report.add(
        f"### CIFAR-10 with the lab's model (`python train_cifar.py`) — {name}",
        f"Best validation accuracy **{percent(results['best_valid_acc'])}** (epoch {results['best_epoch']}), test "
        f"accuracy **{percent(test['accuracy'])}**, macro precision {percent(test['macro_precision'])}, macro "
        f"recall {percent(test['macro_recall'])}; {results['seconds_per_epoch']:.1f} s per epoch. "
        f"evaluate() scores the training and validation sets after every epoch:", "",
        epoch_table(results['epochs']), "")
    report.figure(f'task 4 ({name}): loss, accuracy, learning rate, validation macro P/R per epoch',
                  'task4/training_plot.png')
    report.add(f"### Confusion matrix and per-class precision and recall (test set, {name})", *per_class, "")
    report.figure(f'confusion matrix of the test set ({name})', 'task4/confusion_matrix.png')
    report.add(f"### The 20 misclassified test images with the highest loss ({name})", *worst, "")
    report.figure(f'the 20 worst mistakes ({name})', 'task4/misclassified.png')
    report.add(
        "### conv1's filters, lambda 1e-4 as in the lab's figure (`python train_cifar.py --weight-decay 1e-4`)",
        f"With lambda 1e-4 the test accuracy is {percent(other['test']['accuracy'])} (best validation "
        f"{percent(other['best_valid_acc'])}), against {percent(test['accuracy'])} with the default 1e-3 ({name}).", "")
    report.figure('conv1 filters at random initialisation', init)
    report.figure(f'conv1 filters after training with lambda 1e-4 ({name})', final)


def bonus_section(report):
    compare = report.json('bonus', 'compare.json')
    hinge, ce = compare['runs']['hinge'], compare['runs']['cross-entropy']
    report.add(f"### Multiclass hinge loss vs cross-entropy (`python hinge_loss.py --compare`) — {hinge['data']['name']}",
               compare['table'], "", compare['note'], "",
               f"Test accuracy {percent(hinge['test']['accuracy'])} with the hinge loss against "
               f"{percent(ce['test']['accuracy'])} with cross-entropy, same model, data, seed and schedule.", "")
    report.figure('validation accuracy of both runs, and each run\'s loss', 'bonus/compare.png')


def timing_section(report, done):
    lines = ['| step | command | wall time |', '|---|---|---:|']
    for step in STEPS:
        command_line = ' '.join(os.path.basename(part) if part.endswith('.py') else part
                                for part in done[step.name]['command'])
        lines.append(f"| {step.name} | `python {command_line}` | {done[step.name]['seconds']:.0f} s |")
    total = sum(done[step.name]['seconds'] for step in STEPS)
    lines.append(f"| all | `make lab` | {total / 60:.1f} min |")
    report.add('## Wall time of each step', *lines, '')


def write_report(folder, done, quick):
    """REPORT.md in folder: every question of the lab with its answer and figure, from the steps' own files.
    Returns the Report, whose `files` are the figures it shows."""
    report = Report(folder)
    report.add("# Lab 2: convolutional models — the report", "",
               "Every number below is read from the files of the run that produced it, in this folder; "
               "`lab.py` wrote this report." + (" **A --quick run: a few hundred images, one epoch; these are not "
                                                 "the lab's numbers.**" if quick else ""), "",
               "## Task 1: the NumPy framework")
    check_grads_section(report)
    model_section(report)
    task1_section(report)
    report.add("", "## Task 2: L2 regularisation")
    task2_section(report)
    report.add("", "## Task 3: PyTorch")
    task3_section(report)
    report.add("", "## Task 4: CIFAR-10")
    task4_section(report)
    report.add("", "## Bonus: the multiclass hinge loss")
    bonus_section(report)
    report.add("")
    timing_section(report, done)
    cli.write_text(os.path.join(folder, 'REPORT.md'), '\n'.join(report.lines) + '\n')
    return report


def publish(report, destination):
    """Copies REPORT.md, every figure it shows and every step's output (<step>.log, check_grads.json) into
    destination, keeping their relative paths: an explicit list of files this lab wrote."""
    files = report.files + [f'{step.name}.log' for step in STEPS] + ['check_grads.json']
    for path in files + ['REPORT.md']:
        os.makedirs(os.path.join(destination, os.path.dirname(path)), exist_ok=True)
        shutil.copyfile(os.path.join(report.folder, path), os.path.join(destination, path))
    print(f"copied the report, its figures and the steps' output to {destination}")


if __name__ == '__main__':
    cli.run(main)
