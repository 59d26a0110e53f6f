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
import re
import shutil
import signal
import subprocess
import sys
import time

import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
MNIST, CIFAR = 'mnist', 'cifar'
# name, script, the lab's flags, its data set (None: no data), and the flags --quick adds
STEPS = [
    ('check_grads', 'check_grads.py', [], None, []),
    ('summary', 'train.py', ['--summary-only'], MNIST, []),
    ('task1', 'train.py', [], MNIST, ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
    ('task2', 'train_l2reg.py', ['--sweep'], MNIST, ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
    ('task3_compare', 'train_pytorch.py', ['--compare-numpy', '--steps', '50'], MNIST,
     ['--steps', '5', '--valid-size', '500']),
    ('task3', 'train_pytorch.py', [], MNIST, ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
    ('task4', 'train_cifar.py', [], CIFAR, ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
    ('task4_lambda', 'train_cifar.py', ['--weight-decay', '1e-4'], CIFAR,
     ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
    ('bonus', 'hinge_loss.py', ['--compare'], CIFAR, ['--limit', '500', '--valid-size', '500', '--epochs', '1']),
]
RESUMABLE = {'task1', 'task2', 'task3', 'task4', 'task4_lambda', 'bonus'}  # training runs with checkpoints


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
    name, script, flags, data_set, quick_flags = step
    data = ['--data-dir', args.mnist_dir if data_set == MNIST else args.cifar_dir] if data_set else []
    if resume:
        return [sys.executable, os.path.join(ROOT, script), '--resume', os.path.join(args.save_dir, name), *data]
    folder = ['--save-dir', args.save_dir, '--run-name', name, '--overwrite'] if data_set else []
    return [sys.executable, os.path.join(ROOT, script), *flags, *(quick_flags if args.quick else []), *data, *folder]


def run_step(step, args, done):
    """Runs one step unless it finished before; its stdout goes to the screen and to <step>.log."""
    name = step[0]
    if done.get(name, {}).get('returncode') == 0:
        print(f"=== {name}: done before ({done[name]['seconds']:.0f} s), kept")
        return
    resume = name in RESUMABLE and os.path.exists(os.path.join(args.save_dir, name, 'config.json'))
    line = command(step, args, resume)
    print(f"=== {name}: {' '.join(os.path.relpath(part) if os.sep in part else part for part in line[1:])}",
          flush=True)
    start, record = time.perf_counter(), done.setdefault(name, {'seconds': 0.0})
    # A session of its own: a terminal's Ctrl-C reaches lab.py alone, which passes it on exactly once (a
    # second signal would stop the step at once, without saving where it stands).
    process = subprocess.Popen(line, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    try:
        with open(os.path.join(args.save_dir, f'{name}.log'), 'a') as log:
            for output in process.stdout:
                print(output, end='', flush=True)
                log.write(output)
        process.wait()
    except KeyboardInterrupt as interrupt:  # let the step save where it stands, then stop
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if isinstance(interrupt, cli.Terminated) else signal.SIGINT)
        process.wait()
        raise
    finally:
        record.update(command=line[1:], returncode=process.poll(), seconds=record['seconds'] + time.perf_counter() - start)
        cli.write_json(os.path.join(args.save_dir, 'steps.json'), done)
    if process.returncode != 0:
        raise cli.UserError(f"step {name} failed (exit code {process.returncode}); its output is in "
                            f"{os.path.join(args.save_dir, name + '.log')}; run lab.py again to go on")


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
    print(f"wrote {report}; the whole lab took {sum(r['seconds'] for r in done.values()) / 60:.1f} minutes")
    if args.publish:
        publish(report, args.publish)


# ----------------------------------------------------------------------------- the report

def read_json(folder, *path):
    with open(os.path.join(folder, *path)) as f:
        return json.load(f)


def figure(caption, path):
    return f"![{caption}]({path})\n\n*{caption}* (`{path}`)\n"


def filters_of(folder, run):
    """The first and the last conv1 filter image of a run: (random init, after training)."""
    images = sorted(glob.glob(os.path.join(folder, run, 'conv1_epoch_*.png')))
    return [os.path.relpath(path, folder) for path in (images[0], images[-1])]


def percent(value):
    return f"{value:.2%}"


def check_grads_section(folder):
    checks = [re.match(r'^(textbook|fast)\s+(.+?)\s+max rel error (\S+)\s+(PASS|FAIL)$', line)
              for line in open(os.path.join(folder, 'check_grads.log'))]
    checks = [match.groups() for match in checks if match]
    worst = {module: max(float(error) for m, _, error, _ in checks if m == module) for module in ('textbook', 'fast')}
    passed = sum(verdict == 'PASS' for *_, verdict in checks)
    summary = read_json(folder, 'summary', 'summary.json')
    params = sum(row['params'] for row in summary['layers'])
    return [
        "### Do the layers' gradients agree with numerical ones? (`python check_grads.py`)",
        f"{passed} of {len(checks)} checks pass, every layer of layers.py and of fast_layers.py, in float64: the "
        f"largest relative error is {worst['textbook']:.1e} (textbook layers) and {worst['fast']:.1e} (fast "
        f"layers), below the lab's 1e-5. Full output: `check_grads.log`.",
        "",
        "### Why analytic rather than numerical gradients?",
        f"A numerical gradient needs two forward passes per parameter: for the lab's net, with {params:,} "
        f"parameters, {2 * params:,} forward passes per step, where backprop gets every gradient exactly for "
        f"about the cost of one more pass. Numerical gradients are approximate too (central differences "
        f"err by O(h^2) and by round-off), so they serve only to check the analytic ones.", ""]


def model_section(folder):
    summary = read_json(folder, 'summary', 'summary.json')
    rows, memory = summary['layers'], summary['memory']
    table = ["| layer | output shape | parameters | receptive field | activations |", "|---|---|---:|---:|---:|"]
    for row in rows:
        rf = '' if row['name'] in ('input', 'loss') else 'whole image' if row['rf'] is None else f"{row['rf']}x{row['rf']}"
        table.append(f"| {row['name']} | {tuple(row['shape'])} | {row['params']:,} | {rf} | {row['activations']:,} |")
    table.append(f"| total | | {sum(r['params'] for r in rows):,} | | {memory['activations']:,} |")
    conv2 = next(row for row in rows if row['name'] == 'conv2')
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    return [
        "### How are im2col_cython and col2im_cython used?",
        "`layers.Convolution.forward` turns the batch into columns with `im2col_cython`: one column per output "
        "pixel of every image, one row per (input channel, kernel row, kernel column), so the convolution is one "
        "matrix product `weights @ x_cols` (filters x columns), reshaped to (N, F, H', W'). `backward_params` "
        "multiplies the output gradient by the same columns; `backward_inputs` multiplies it by the weights and "
        "`col2im_cython` adds every column entry back onto the pixel it came from.", "",
        "### The net: a sketch, tensor sizes and parameters (`python train.py --summary-only`)",
        figure("the lab's net, drawn from its layer objects", 'summary/net.png'),
        *table, "",
        "### Receptive field of the last convolution's features",
        f"{conv2['rf']}x{conv2['rf']} input pixels: conv1 sees 5x5, pool1 widens that to 6x6 with a stride of 2, "
        f"and conv2's 5 taps, 2 pixels apart, add 4 x 2 = 8.", "",
        f"### Memory for the activations backprop needs, batch {memory['batch_size']}",
        f"The textbook estimate, the input and every layer's output once: {memory['activations']:,} values, "
        f"{mb(memory['activations_bytes']['float32'])} in float32 ({mb(memory['activations_bytes']['float64'])} "
        f"in float64). This implementation keeps {mb(memory['kept_bytes']['float32'])} in float32 "
        f"({mb(memory['kept_bytes']['float64'])} in float64), what each forward stores for its backward: "
        f"the im2col columns repeat every convolution input pixel once per kernel tap "
        f"({memory['conv_input_values']:,} values become {memory['im2col_values']:,}, "
        f"{mb(memory['im2col_bytes']['float32'])}), while pooling and ReLU keep indices and masks.", ""]


def task1_section(folder):
    results = read_json(folder, 'task1', 'results.json')
    init, final = filters_of(folder, 'task1')
    return [
        "### Initial loss and the number of classes C",
        f"Before training the validation loss is {results['initial_loss']:.4f}, close to ln C = ln 10 = 2.3026: "
        f"small random weights give nearly equal logits, the softmax is about uniform (1/C per class), and the "
        f"cross-entropy is -ln(1/C) = ln C.", "",
        "### Training (`python train.py`)",
        f"Test accuracy **{percent(results['test_acc'])}**, validation {percent(results['epochs'][-1]['valid_acc'])} "
        f"after {len(results['epochs'])} epoch(s), {results['seconds_per_epoch']:.1f} s per epoch.",
        "", epoch_table(results['epochs']), "",
        figure('task 1: loss, accuracy and learning rate per epoch', 'task1/training_plot.png'),
        figure('conv1 filters at random initialisation', init),
        figure('conv1 filters after training', final)]


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


def task2_section(folder):
    sweep = open(os.path.join(folder, 'task2', 'sweep.md')).read().strip()
    rows = read_json(folder, 'task2', 'sweep.json')
    return ["### L2 regularisation: lambda 1e-3, 1e-2, 1e-1 (`python train_l2reg.py --sweep`)", sweep, "",
            f"Stronger regularisation shrinks conv1's filters (mean |w| {rows[0]['conv1_mean_abs_weight']:.3f} at "
            f"lambda {rows[0]['weight_decay']:g}, {rows[-1]['conv1_mean_abs_weight']:.3f} at "
            f"{rows[-1]['weight_decay']:g}) and costs accuracy ({percent(rows[0]['test_acc'])} -> "
            f"{percent(rows[-1]['test_acc'])} on the test set).", "",
            figure('conv1 filters: random init, then after training with each lambda', 'task2/sweep_filters.png')]


def task3_section(folder):
    compare = read_json(folder, 'task3_compare', 'compare_numpy.json')
    results = read_json(folder, 'task3', 'results.json')
    numpy_run = next(r for r in read_json(folder, 'task2', 'sweep.json')
                     if r['weight_decay'] == results['config']['weight_decay'])
    return [
        "### The same model in PyTorch, step for step (`python train_pytorch.py --compare-numpy --steps 50`)",
        f"From the same initial weights, on the same {len(compare['steps'])} batches in float64, the losses of "
        f"the NumPy framework and of PyTorch differ by at most {compare['max_loss_rel_diff']:.1e} (relative) and "
        f"the weights after the last step by {compare['max_weight_rel_diff']:.1e}: {compare['verdict']} "
        f"(tolerance {compare['tolerance']:g}).", "",
        "### Training in PyTorch (`python train_pytorch.py`, lambda 1e-3)",
        f"Test accuracy **{percent(results['test_acc'])}** (the NumPy framework with the same lambda, seed and "
        f"batches: {percent(numpy_run['test_acc'])}; the initialisations differ: PyTorch's kaiming_normal_, "
        f"NumPy's truncated normal), {results['seconds_per_epoch']:.1f} s per epoch. Filters are drawn every "
        f"{results['config']['draw_every']} steps and after every epoch; losses go to `task3/log.csv` every "
        f"epoch.", "",
        epoch_table(results['epochs']), "",
        figure('task 3: loss, accuracy, learning rate and the L2 term per epoch', 'task3/training_plot.png')]


def task4_section(folder):
    results = read_json(folder, 'task4', 'results.json')
    other = read_json(folder, 'task4_lambda', 'results.json')
    test, name = results['test'], results['data']['name']
    per_class = ['| class | precision | recall |', '|---|---:|---:|'] + [
        f"| {c} | {percent(test['precision'][c])} | {percent(test['recall'][c])} |" for c in test['precision']]
    worst = ['| image | true class | loss | top 3 (softmax probability) |', '|---:|---|---:|---|'] + [
        f"| {m['index']} | {m['true']} | {m['loss']:.2f} | " + ', '.join(f"{c} {p:.2f}" for c, p in m['top3']) + ' |'
        for m in results['worst_mistakes']]
    init, final = filters_of(folder, 'task4_lambda')
    return [
        f"### CIFAR-10 with the lab's model (`python train_cifar.py`) — {name}",
        f"Best validation accuracy **{percent(results['best_valid_acc'])}** (epoch {results['best_epoch']}), test "
        f"accuracy **{percent(test['accuracy'])}**, macro precision {percent(test['macro_precision'])}, macro "
        f"recall {percent(test['macro_recall'])}; {results['seconds_per_epoch']:.1f} s per epoch. "
        f"evaluate() scores the training and validation sets after every epoch:", "",
        epoch_table(results['epochs']), "",
        figure(f'task 4 ({name}): loss, accuracy, learning rate, validation macro P/R per epoch',
               'task4/training_plot.png'),
        f"### Confusion matrix and per-class precision and recall (test set, {name})", *per_class, "",
        figure(f'confusion matrix of the test set ({name})', 'task4/confusion_matrix.png'),
        f"### The 20 misclassified test images with the highest loss ({name})", *worst, "",
        figure(f'the 20 worst mistakes ({name})', 'task4/misclassified.png'),
        "### conv1's filters, lambda 1e-4 as in the lab's figure (`python train_cifar.py --weight-decay 1e-4`)",
        f"With lambda 1e-4 the test accuracy is {percent(other['test']['accuracy'])} (best validation "
        f"{percent(other['best_valid_acc'])}), against {percent(test['accuracy'])} with the default 1e-3 ({name}).",
        "", figure('conv1 filters at random initialisation', init),
        figure(f'conv1 filters after training with lambda 1e-4 ({name})', final)]


def bonus_section(folder):
    compare = read_json(folder, 'bonus', 'compare.json')
    table = open(os.path.join(folder, 'bonus', 'compare.md')).read().split('\n\n', 1)[1].strip()
    hinge, ce = compare['runs']['hinge'], compare['runs']['cross-entropy']
    return [f"### Multiclass hinge loss vs cross-entropy (`python hinge_loss.py --compare`) — {hinge['data']['name']}",
            table, "",
            f"Test accuracy {percent(hinge['test']['accuracy'])} with the hinge loss against "
            f"{percent(ce['test']['accuracy'])} with cross-entropy, same model, data, seed and schedule.", "",
            figure('validation accuracy of both runs, and each run\'s loss', 'bonus/compare.png')]


def timing_section(done):
    lines = ['| step | command | wall time |', '|---|---|---:|']
    for name, *_ in STEPS:
        command_line = ' '.join(os.path.basename(part) if part.endswith('.py') else part
                                for part in done[name]['command'])
        lines.append(f"| {name} | `python {command_line}` | {done[name]['seconds']:.0f} s |")
    total = sum(done[name]['seconds'] for name, *_ in STEPS)
    lines.append(f"| all | `make lab` | {total / 60:.1f} min |")
    return ['## Wall time of each step', *lines, '']


def write_report(folder, done, quick):
    """REPORT.md in folder: every question of the lab with its answer and figure, from the steps' own files."""
    lines = ["# Lab 2: convolutional models — the report", "",
             "Every number below is read from the files of the run that produced it, in this folder; "
             "`lab.py` wrote this report." + (" **A --quick run: a few hundred images, one epoch; these are not "
                                               "the lab's numbers.**" if quick else ""), "",
             "## Task 1: the NumPy framework", *check_grads_section(folder), *model_section(folder),
             *task1_section(folder), "", "## Task 2: L2 regularisation", *task2_section(folder), "",
             "## Task 3: PyTorch", *task3_section(folder), "", "## Task 4: CIFAR-10", *task4_section(folder), "",
             "## Bonus: the multiclass hinge loss", *bonus_section(folder), "", *timing_section(done)]
    path = os.path.join(folder, 'REPORT.md')
    cli.write_text(path, '\n'.join(lines) + '\n')
    return path


def publish(report, destination):
    """Copies REPORT.md, every figure it shows and every step's output (<step>.log, which the report cites)
    into destination, keeping their relative paths."""
    folder = os.path.dirname(report)
    text = open(report).read()
    figures = sorted(set(re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)))
    for path in figures + [f'{name}.log' for name, *_ in STEPS]:
        os.makedirs(os.path.join(destination, os.path.dirname(path)), exist_ok=True)
        shutil.copyfile(os.path.join(folder, path), os.path.join(destination, path))
    shutil.copyfile(report, os.path.join(destination, 'REPORT.md'))
    print(f"copied the report, its figures and the steps' output to {destination}")


if __name__ == '__main__':
    cli.run(main)
