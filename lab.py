"""The whole lab in one command: every task with the lab's settings, then a report that answers every
question of the lab text from the runs that produced the answers.

    python lab.py --mnist-dir ../shared/data --cifar-dir data   # make lab: about 45 minutes on 2 cores
    python lab.py ... --extended                # make lab-extended: the evidence for the CIFAR-10 settings
    python lab.py --quick ...                   # every step on a few hundred images

Each step is a script of this repository, run as its own process into <save-dir>/<step>/ (its output also in
<step>.log); then <save-dir>/REPORT.md is written. Run it again and it resumes: finished steps are kept and
a stopped one goes on from its checkpoint (--resume). steps.json records each step's command and wall time.
--extended adds the runs that choose CIFAR-10's lambda (0, 1e-4, 1e-3, 1e-2; the default over 3 seeds)
and compare the two losses of the bonus on equal terms (both learning rates tuned alike; 3 seeds); the
report includes them when they are there. CIFAR-10 numbers measured on the JPEG stand-in say so.
--publish DIR copies REPORT.md, the figures it shows, steps.json and the steps' outputs and result files there.
"""
import argparse
import contextlib
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import cli
import readback
import train_cifar

ROOT = os.path.dirname(os.path.abspath(__file__))
MNIST, CIFAR = 'mnist', 'cifar'
QUICK = ['--limit', '500', '--valid-size', '500', '--epochs', '1']
LAB_CONFIG = 'lab.json'  # in the save folder: the flags that made its steps, which a later run must share
CIFAR_LAMBDAS = [0, 1e-4, 1e-3, 1e-2]  # --extended: train_cifar.py's lambda is chosen from these
SEEDS = [43, 44]  # --extended: the default settings again with these seeds, beside the default seed 42
TUNE_LRS = [0.3, 0.1, 0.03, 0.01, 0.003]  # --extended: both losses' learning rates, on TUNE_BUDGET
TUNE_BUDGET = ['--limit', '10000', '--epochs', '3']


class Step(typing.NamedTuple):
    """One step of the lab: a script of this repository with the lab's flags, run into <save-dir>/<name>/."""
    name: str
    script: str
    flags: list
    data_set: str = None      # MNIST, CIFAR, or None: the script reads no data
    quick_flags: list = []    # what --quick adds
    resumable: bool = True    # a training run with checkpoints: a stopped one goes on with --resume


def lambda_step(weight_decay):
    """The name of the task 4 run with that lambda: 'task4' for the default, 'task4_lambda' for the lab
    figure's 1e-4, else 'task4_wd<lambda>'."""
    return 'task4' if weight_decay == train_cifar.WEIGHT_DECAY else 'task4_lambda' if weight_decay == 1e-4 else \
        f'task4_wd{weight_decay:g}'


STEPS = [
    Step('check_grads', 'check_grads.py', [], resumable=False),
    Step('summary', 'train.py', ['--summary-only'], resumable=False),
    Step('task1', 'train.py', [], MNIST, QUICK),
    # lambda 0 is task 1 again, with the fast layers: the same sums as the sweep's other runs
    Step('task2', 'train_l2reg.py', ['--sweep', '0', '1e-3', '1e-2', '1e-1', '--layers', 'fast'], MNIST, QUICK),
    Step('task3_compare', 'train_pytorch.py', ['--compare-numpy', '--steps', '50'], MNIST,
         ['--steps', '5', '--valid-size', '500'], resumable=False),
    Step('task3', 'train_pytorch.py', [], MNIST, QUICK),
    Step('task4', 'train_cifar.py', [], CIFAR, QUICK),
    Step('task4_lambda', 'train_cifar.py', ['--weight-decay', '1e-4'], CIFAR, QUICK),
    Step('bonus', 'hinge_loss.py', ['--compare-with', '{save_dir}/task4'], CIFAR, QUICK),
]
EXTENDED = [
    *(Step(lambda_step(wd), 'train_cifar.py', ['--weight-decay', f'{wd:g}'], CIFAR, QUICK)
      for wd in CIFAR_LAMBDAS if lambda_step(wd) not in ('task4', 'task4_lambda')),
    *(Step(f'task4_seed{seed}', 'train_cifar.py', ['--seed', str(seed)], CIFAR, QUICK) for seed in SEEDS),
    Step('bonus_tune', 'hinge_loss.py', ['--tune', *map(str, TUNE_LRS), *TUNE_BUDGET], CIFAR,
         ['--limit', '200', '--valid-size', '500', '--epochs', '1']),
    *(Step(f'bonus_seed{seed}', 'hinge_loss.py', ['--seed', str(seed), '--compare-with', f'{{save_dir}}/task4_seed{seed}'],
           CIFAR, QUICK) for seed in SEEDS),
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
    parser.add_argument('--extended', action='store_true',
                        help="also the runs that choose CIFAR-10's lambda and compare the bonus's losses on equal "
                             "terms (about an hour more on 2 cores)")
    parser.add_argument('--publish', metavar='DIR', default=None,
                        help='afterwards, copy REPORT.md, the figures it shows and the steps\' outputs into DIR')
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
    flags = [flag.format(save_dir=args.save_dir) for flag in step.flags]
    return line + [*flags, *(step.quick_flags if args.quick else []), *data,
                   '--save-dir', args.save_dir, '--run-name', step.name, '--overwrite']


def _die_with_lab():
    """In a step's process, before it starts: SIGTERM when lab.py dies, however it dies (Linux), so that a step
    never outlives a killed lab and meets the next one in its folder; a SIGTERM'd step saves where it stands."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
    output = [readback.read_text(log_path, 64 << 20)] if os.path.exists(log_path) else []  # a resumed step adds to it
    start, record = time.perf_counter(), done.setdefault(step.name, {'seconds': 0.0})
    # A session of its own: a terminal's Ctrl-C reaches lab.py alone, which passes it on exactly once (a
    # second signal would stop the step at once, without saving where it stands).
    process = subprocess.Popen(line, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
                               preexec_fn=_die_with_lab)
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


def read_done(args):
    """steps.json of the save folder ({step: its command, exit code and seconds}), checked, or {} for a new one;
    and the folder's flags (lab.json), which must be this run's: a --quick folder does not become a lab's."""
    config_path = os.path.join(args.save_dir, LAB_CONFIG)
    if os.path.lexists(config_path):
        saved = readback.read_json(config_path, {'quick': bool}, max_bytes=1 << 16)
        if saved['quick'] != args.quick:
            raise cli.UserError(f"{args.save_dir} holds a lab run {'with' if saved['quick'] else 'without'} --quick "
                                f"({config_path}); run it {'with' if saved['quick'] else 'without'} --quick to go on, "
                                f"or pass another --save-dir")
    else:
        cli.write_json(config_path, {'quick': args.quick})
    steps_path = os.path.join(args.save_dir, 'steps.json')
    if not os.path.lexists(steps_path):
        return {}
    done = readback.read_json(steps_path, dict, max_bytes=1 << 20)
    known = {step.name for step in STEPS + EXTENDED}
    for name, record in done.items():
        if name not in known:
            raise readback.ReadBackError(f"{steps_path}: {name[:40]!r} is no step of the lab")
        readback.check(record, {'seconds': readback.Number(0), 'command': [str], 'returncode': (int, type(None))},
                       steps_path, name)
    return done


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.save_dir, exist_ok=True)
    with cli.locked(args.save_dir):  # one lab per folder; each step locks its own folder too
        cli.remove_temporaries(args.save_dir)
        done = read_done(args)
        try:
            for step in STEPS + (EXTENDED if args.extended else []):
                run_step(step, args, done)
        except KeyboardInterrupt as interrupt:
            signum = signal.SIGTERM if isinstance(interrupt, cli.Terminated) else signal.SIGINT
            raise cli.Interrupted("the lab stopped; run the same command again to go on where it stopped",
                                  signum) from None
        report = write_report(args.save_dir, done, args.quick)
    print(f"wrote {os.path.join(args.save_dir, 'REPORT.md')}; the whole lab took "
          f"{sum(r['seconds'] for r in done.values()) / 60:.1f} minutes")
    if args.publish:
        publish(report, args.publish)


# ----------------------------------------------------------------------------- the report

class Report:
    """REPORT.md's lines, and the files it shows and reads (which --publish copies), read from the steps' own
    JSON files in `folder` as readback reads what a run reads back."""

    def __init__(self, folder):
        self.folder, self.lines, self.files, self.reading = folder, [], [], None

    def json(self, *path, schema=dict):
        self.reading = os.path.join(*path)
        if self.reading not in self.files:
            self.files.append(self.reading)
        return readback.read_json(os.path.join(self.folder, self.reading), schema, max_bytes=64 << 20)

    def has(self, *path):
        return os.path.exists(os.path.join(self.folder, *path))

    def add(self, *lines):
        self.lines += lines

    def figure(self, caption, path):
        """A figure of the report: shown, captioned, and listed for --publish."""
        self.files.append(path)
        self.add(f"![{caption}]({path})", "", f"*{caption}* (`{path}`)", "")

    def filters_of(self, run):
        """The conv1 filter images of a run, in the order they were drawn: the random init first."""
        images = sorted(glob.glob(os.path.join(self.folder, run, 'conv1_epoch_*.png')))
        return [os.path.relpath(path, self.folder) for path in images]


def percent(value):
    return f"{value:.2%}"


def mean_std(values):
    """'74.31% +- 0.20%' (sample std) of a list of fractions."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.2%} +- {std:.2%}"


RESULTS = {'config': dict, 'epochs': [dict], 'test': {'accuracy': readback.Number(0, 1)},
           'seconds_per_epoch': readback.Number(0)}  # what every training run's results.json has


def check_grads_section(report):
    result = report.json('check_grads.json', schema={'checks': [{'module': str, 'max_rel_error': readback.Number(0)}],
                                                     'passed': readback.COUNT, 'total': readback.COUNT,
                                                     'tolerance': readback.Number(0)})
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
        "`layers.Convolution.forward` turns the batch into columns with `im2col_cython`: one row per (input "
        "channel, kernel row, kernel column), one column per (output row, output column, image), the image "
        "fastest, as the course's code lays them out; the convolution is then one matrix product "
        "`weights @ x_cols` (filters x columns), reshaped to (F, H', W', N) and transposed to (N, F, H', W'). "
        "`backward_params` "
        "multiplies the output gradient by the same columns; `backward_inputs` multiplies it by the weights and "
        "`col2im_cython` adds every column entry back onto the pixel it came from.", "",
        "### The net: a sketch, tensor sizes and parameters (`python train.py --summary-only`)")
    report.figure("the lab's net, drawn from its layer objects", 'summary/net.png')
    report.add(*table, "", answers['parameters'], "",
               "### Receptive field of the last convolution's features", answers['receptive_field'], "",
               f"### Memory for the activations backprop needs, batch {summary['memory']['batch_size']}",
               answers['memory'], "")


def task1_section(report):
    results = report.json('task1', 'results.json', schema=RESULTS)
    fast = report.json('task2', 'wd_0', 'results.json', schema=RESULTS)
    filters = report.filters_of('task1')
    layers = results['config']['layers']
    report.add(
        "### Initial loss and the number of classes C", results['answers']['initial_loss'], "",
        f"### Training (`python train.py`, the {layers} layers)",
        f"Test accuracy **{percent(results['test']['accuracy'])}**, validation "
        f"{percent(results['epochs'][-1]['valid_acc'])} after {len(results['epochs'])} epoch(s), "
        f"{results['seconds_per_epoch']:.1f} s per epoch, with {layers} layers. The same run with the "
        f"{fast['config']['layers']} layers (task 2's lambda = 0 run): test accuracy {percent(fast['test']['accuracy'])}, "
        f"{fast['seconds_per_epoch']:.1f} s per epoch; the same sums in another order, so not the same bits.", "",
        epoch_table(results['epochs']), "")
    report.figure(f'task 1 ({layers} layers): loss, accuracy and learning rate per epoch', 'task1/training_plot.png')
    report.figure('conv1 filters at random initialisation', filters[0])
    report.figure('conv1 filters after training', filters[-1])


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
    sweep = report.json('task2', 'sweep.json', schema={'rows': [{'weight_decay': readback.Number(0)}], 'table': str})
    rows = sweep['rows']
    layers = report.json('task2', 'wd_0', 'results.json', schema=RESULTS)['config']['layers']
    report.add(f"### L2 regularisation: lambda 0, 1e-3, 1e-2, 1e-1 (`python train_l2reg.py --sweep 0 1e-3 1e-2 1e-1 "
               f"--layers {layers}`)", sweep['table'], "",
               f"Stronger regularisation shrinks conv1's filters (mean |w| {rows[0]['conv1_mean_abs_weight']:.3f} at "
               f"lambda {rows[0]['weight_decay']:g}, {rows[-1]['conv1_mean_abs_weight']:.3f} at "
               f"{rows[-1]['weight_decay']:g}) and costs accuracy ({percent(rows[0]['test_acc'])} -> "
               f"{percent(rows[-1]['test_acc'])} on the test set). Every lambda starts from the same random weights; "
               f"the figure shows all grids on one colour scale, mid grey at 0.", "")
    report.figure('conv1 filters: random init, then after training with each lambda', 'task2/sweep_filters.png')


def task3_section(report):
    compare = report.json('task3_compare', 'compare_numpy.json',
                          schema={'steps': list, 'max_loss_rel_diff': readback.Number(0),
                                  'max_weight_rel_diff': readback.Number(0), 'verdict': str, 'tolerance': float})
    results = report.json('task3', 'results.json', schema=RESULTS)
    numpy_run = next(r for r in report.json('task2', 'sweep.json')['rows']
                     if r['weight_decay'] == results['config']['weight_decay'])
    filters = report.filters_of('task3')
    report.files.append('task3/log.csv')
    report.add(
        "### The same model in PyTorch, step for step (`python train_pytorch.py --compare-numpy --steps 50`)",
        f"From the same initial weights, on the same {len(compare['steps'])} batches in float64, the losses of "
        f"the NumPy framework and of PyTorch differ by at most {compare['max_loss_rel_diff']:.1e} (relative) and "
        f"the weights after the last step by {compare['max_weight_rel_diff']:.1e}: {compare['verdict']} "
        f"(tolerance {compare['tolerance']:g}).", "",
        f"### Training in PyTorch (`python train_pytorch.py`, lambda {results['config']['weight_decay']:g})",
        f"Test accuracy **{percent(results['test']['accuracy'])}** (the NumPy framework with the same lambda, seed "
        f"and batches: {percent(numpy_run['test_acc'])}; the initialisations differ: PyTorch's kaiming_normal_, "
        f"NumPy's truncated normal), {results['seconds_per_epoch']:.1f} s per epoch. As the lab asks, conv1's "
        f"filters are drawn during training (every {results['config']['draw_every']} steps and after every epoch: "
        f"{len(filters)} images in `task3/`) and the losses are saved after every epoch, in `task3/log.csv`:", "",
        epoch_table(results['epochs']), "")
    report.figure('task 3: loss, accuracy, learning rate and the L2 term per epoch', 'task3/training_plot.png')
    for caption, path in (('at random initialisation', filters[0]), ('during the first epoch', filters[1]),
                          ('after training', filters[-1])):
        report.figure(f'task 3: conv1 filters {caption} (`{os.path.basename(path)}`)', path)


def settings(config):
    return (f"{config['epochs']} epochs, batch {config['batch_size']}, SGD lr {config['lr']:g} decayed by "
            f"ExponentialLR gamma {config['gamma']:g} per epoch, L2 lambda {config['weight_decay']:g} on the weights "
            f"(SGD weight decay; not the biases), padding {config['padding']}, {config['valid_size']} validation "
            f"images, seed {config['seed']}")


def task4_section(report):
    results = report.json('task4', 'results.json', schema=RESULTS)
    other = report.json('task4_lambda', 'results.json', schema=RESULTS)
    test, name = results['test'], results['data']['name']
    md = cli.markdown_text  # class names come from the data set's batches.meta
    per_class = ['| class | precision | recall |', '|---|---:|---:|'] + [
        f"| {md(c)} | {percent(test['precision'][c])} | {percent(test['recall'][c])} |" for c in test['precision']]
    worst = ['| image | true class | loss | top 3 (softmax probability) |', '|---:|---|---:|---|'] + [
        f"| {m['index']} | {md(m['true'])} | {m['loss']:.2f} | " + ', '.join(f"{md(c)} {p:.2f}" for c, p in m['top3'])
        + ' |' for m in results['worst_mistakes']]
    report.add(
        f"### CIFAR-10 with the lab's model (`python train_cifar.py`) — {name}",
        f"Settings: {settings(results['config'])}.", "",
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
    filters = report.filters_of('task4')
    report.add(f"### conv1's filters, the default run (lambda {results['config']['weight_decay']:g})", "")
    report.figure('conv1 filters at random initialisation', filters[0])
    report.figure(f"conv1 filters after training with lambda {results['config']['weight_decay']:g} ({name})", filters[-1])
    report.add(
        "### conv1's filters, lambda 1e-4 as in the lab's figure (`python train_cifar.py --weight-decay 1e-4`)",
        f"With lambda 1e-4 the test accuracy is {percent(other['test']['accuracy'])} (best validation "
        f"{percent(other['best_valid_acc'])}), against {percent(test['accuracy'])} with the default "
        f"{results['config']['weight_decay']:g} ({name}).", "")
    report.figure(f'conv1 filters after training with lambda 1e-4 ({name})', report.filters_of('task4_lambda')[-1])
    if all(report.has(lambda_step(wd), 'results.json') for wd in CIFAR_LAMBDAS) and \
            all(report.has(f'task4_seed{seed}', 'results.json') for seed in SEEDS):
        extended_task4_section(report, name)


def extended_task4_section(report, name):
    runs = {wd: report.json(lambda_step(wd), 'results.json', schema=RESULTS) for wd in CIFAR_LAMBDAS}
    lines = ['| lambda | best validation accuracy | test accuracy | train accuracy, last epoch |', '|---:|---:|---:|---:|']
    lines += [f"| {wd:g} | {percent(r['best_valid_acc'])} (epoch {r['best_epoch']}) | {percent(r['test']['accuracy'])} | "
              f"{percent(r['epochs'][-1]['train_acc'])} |" for wd, r in runs.items()]
    best = max(runs, key=lambda wd: runs[wd]['best_valid_acc'])
    seeds = [report.json('task4', 'results.json')] + [report.json(f'task4_seed{seed}', 'results.json', schema=RESULTS)
                                                      for seed in SEEDS]
    default = seeds[0]['config']['weight_decay']
    report.add(
        f"### Choosing lambda (`make lab-extended`) — {name}",
        f"The same run with each lambda, seed {seeds[0]['config']['seed']}; the choice goes by validation accuracy:", "",
        *lines, "",
        f"Lambda {best:g} has the best validation accuracy; the default is {default:g}. Over seeds "
        f"{', '.join(str(r['config']['seed']) for r in seeds)} the default settings give a best validation accuracy "
        f"of {mean_std([r['best_valid_acc'] for r in seeds])} and a test accuracy of "
        f"{mean_std([r['test']['accuracy'] for r in seeds])} (mean +- standard deviation).", "")


def bonus_section(report):
    compare = report.json('bonus', 'compare.json', schema={'table': str, 'note': str, 'runs': dict})
    hinge, ce = compare['runs']['hinge'], compare['runs']['cross-entropy']
    report.add(f"### Multiclass hinge loss vs cross-entropy (`python hinge_loss.py --compare-with task4`) — "
               f"{hinge['data']['name']}", compare['table'], "", compare['note'], "",
               f"Test accuracy {percent(hinge['test']['accuracy'])} with the hinge loss against "
               f"{percent(ce['test']['accuracy'])} with cross-entropy: the same model, data, seed and schedule; only the "
               f"loss and its learning rate differ (hinge {hinge['config']['lr']:g}, cross-entropy "
               f"{ce['config']['lr']:g}). The cross-entropy run is task 4's, not trained again.", "")
    report.figure('validation accuracy of both runs, and each run\'s loss', 'bonus/compare.png')
    if report.has('bonus_tune', 'tune.json') and all(report.has(f'bonus_seed{seed}', 'compare.json') for seed in SEEDS):
        extended_bonus_section(report)


def extended_bonus_section(report):
    tune = report.json('bonus_tune', 'tune.json', schema={'table': str, 'note': str, 'best_lr': dict})
    compares = [report.json('bonus', 'compare.json')] + [report.json(f'bonus_seed{seed}', 'compare.json')
                                                         for seed in SEEDS]
    lines = ['| loss | lr | best validation accuracy | test accuracy | validation gain in the last epoch |',
             '|---|---:|---:|---:|---:|']
    for loss in ('hinge', 'cross-entropy'):
        runs = [c['runs'][loss] for c in compares]
        gains = [r['epochs'][-1]['valid_acc'] - r['epochs'][-2]['valid_acc'] for r in runs if len(r['epochs']) > 1]
        lines.append(f"| {loss} | {runs[0]['config']['lr']:g} | {mean_std([r['best_valid_acc'] for r in runs])} | "
                     f"{mean_std([r['test']['accuracy'] for r in runs])} | "
                     f"{sum(gains) / max(len(gains), 1):+.2%} |")
    used = {loss: compares[0]['runs'][loss]['config']['lr'] for loss in ('hinge', 'cross-entropy')}
    if used == tune['best_lr']:
        rates = f"both losses with their best rate (hinge {used['hinge']:g}, cross-entropy {used['cross-entropy']:g})"
    else:  # the defaults must follow the measurement: say so where they do not
        rates = (f"both losses with the scripts' default rates (hinge {used['hinge']:g}, cross-entropy "
                 f"{used['cross-entropy']:g}), **which are not the tuning's best** (hinge {tune['best_lr']['hinge']}, "
                 f"cross-entropy {tune['best_lr']['cross-entropy']})")
    report.add("### The two losses on equal terms (`make lab-extended`)",
               "Both learning rates tuned alike, on the same budget (`python hinge_loss.py --tune ...`):", "",
               tune['table'], "", tune['note'], "",
               f"Then {rates}, on the full schedule, seeds "
               f"{', '.join(str(c['runs']['hinge']['config']['seed']) for c in compares)} (mean +- standard "
               f"deviation; the last column: how much the validation accuracy still rose in the last epoch):", "",
               *lines, "")


def timing_section(report, done):
    lines = ['| step | command | wall time |', '|---|---|---:|']
    steps = [step for step in STEPS + EXTENDED if step.name in done]
    for step in steps:
        command_line = ' '.join(os.path.basename(part) if part.endswith('.py') else part
                                for part in done[step.name]['command'])
        lines.append(f"| {step.name} | `python {command_line}` | {done[step.name]['seconds']:.0f} s |")
    basic = sum(done[step.name]['seconds'] for step in STEPS)
    lines.append(f"| all of `make lab` | | {basic / 60:.1f} min |")
    if any(step.name in done for step in EXTENDED):
        extended = sum(done[step.name]['seconds'] for step in EXTENDED if step.name in done)
        lines.append(f"| all that `make lab-extended` adds | | {extended / 60:.1f} min |")
    report.add('## Wall time of each step', *lines, '')


def write_report(folder, done, quick):
    """REPORT.md in folder: every question of the lab with its answer and figure, from the steps' own files.
    Returns the Report, whose `files` are the figures it shows and the files it read. A file that is not what
    its step writes is one line naming it."""
    report = Report(folder)
    report.add("# Lab 2: convolutional models — the report", "",
               "Every number below is read from the files of the run that produced it, in this folder; "
               "`lab.py` wrote this report." + (" **A --quick run: a few hundred images, one epoch; these are not "
                                                 "the lab's numbers.**" if quick else ""), "")
    try:
        report.add("## Task 1: the NumPy framework")
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
    except (KeyError, TypeError, ValueError, IndexError, StopIteration) as error:  # a field the schemas let pass
        raise readback.ReadBackError(f"{os.path.join(folder, report.reading)}: not what its step writes "
                                     f"({type(error).__name__}: {str(error)[:80]})") from None
    cli.write_text(os.path.join(folder, 'REPORT.md'), '\n'.join(report.lines) + '\n')
    return report


RESULT_FILES = ('results.json', 'config.json', 'sweep.json', 'sweep.md', 'compare.json', 'compare.md', 'tune.json',
                'tune.md', 'compare_numpy.json', 'summary.json', 'log.csv')  # what --publish copies from every step


def publish(report, destination):
    """Copies REPORT.md, every figure and file it shows or read, steps.json, every step's output (<step>.log)
    and its result files (RESULT_FILES, in its folder and its runs' folders) into destination, keeping their
    relative paths: an explicit list of names this lab wrote, never paths found in a text."""
    logs = [f'{step.name}.log' for step in STEPS + EXTENDED if report.has(f'{step.name}.log')]
    results = [os.path.relpath(path, report.folder) for step in STEPS + EXTENDED for name in RESULT_FILES
               for path in sorted(glob.glob(os.path.join(glob.escape(report.folder), step.name, '**', name),
                                            recursive=True)) if os.path.isfile(path) and not os.path.islink(path)]
    for path in dict.fromkeys(report.files + results + logs + ['steps.json', 'REPORT.md']):
        os.makedirs(os.path.join(destination, os.path.dirname(path)), exist_ok=True)
        shutil.copyfile(os.path.join(report.folder, path), os.path.join(destination, path))
    print(f"copied the report, its figures and the steps' output and results to {destination}")


if __name__ == '__main__':
    cli.run(main)
