"""README.md tells the truth: the line counts of its 'Where the lab is in the code' table are those of the
functions it names, and every measured number in it is read here from the committed file it comes from
(docs/lab: `make lab-extended`, then `python lab.py --extended --publish docs/lab`; docs/check_solution;
docs/resume). Each claim below renders the README's text from those files; a README number that no claim
renders fails too, so a stale number cannot stay."""
import importlib
import inspect
import json
import math
import os
import re

import pytest

from conftest import ROOT

import lab

DOCS = os.path.join(ROOT, 'docs')


def readme():
    return open(os.path.join(ROOT, 'README.md')).read()


def section(title):
    return readme().split(f'\n## {title}\n')[1].split('\n## ')[0]


# ----------------------------------------------------------------------------- the line counts

def table_rows():
    return re.findall(r'^\| (.+?) \| `(\S+)` \| (.+?) \| ([\d +]+) \|$', section('Where the lab is in the code'),
                      flags=re.M)


def source_lines(path, name):
    """Lines of function or class `name` (dotted for a method) in `path` (a .py module or the .pyx file)."""
    if path.endswith('.pyx'):
        lines = open(os.path.join(ROOT, path)).read().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f'def {name}('))
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
        while not lines[end - 1].strip():
            end -= 1
        return end - start
    obj = importlib.import_module(path[:-3])
    for part in name.split('.'):
        obj = getattr(obj, part)
    return len(inspect.getsourcelines(obj)[0])


def test_the_table_is_there():
    assert len(table_rows()) >= 20


@pytest.mark.parametrize('piece, path, names, counts', table_rows(), ids=[row[0][:40] for row in table_rows()])
def test_every_line_count_is_the_codes(piece, path, names, counts):
    names = re.findall(r'`([\w.]+)`', names)
    counts = [int(count) for count in counts.split('+')]
    assert len(names) == len(counts), piece
    assert [source_lines(path, name) for name in names] == counts, piece


def test_each_loop_is_counted_with_the_plumbing_it_drives():
    driver = source_lines('run.py', 'Run.epochs') + source_lines('run.py', 'Run.steps')
    loops = [source_lines(path, 'train') + driver for path in ('nn.py', 'train_pytorch.py', 'train_cifar.py')]
    assert (f"reads {loops[0]} lines for task 1's loop (`nn.train`), {loops[1]} for task 3's\n"
            f"(`train_pytorch.train`) and {loops[2]} for task 4's (`train_cifar.train`)") in readme()


# ----------------------------------------------------------------------------- the measured numbers

def load(*path):
    with open(os.path.join(DOCS, *path)) as f:
        return json.load(f)


def percent(fraction):
    return f'{fraction:.2%}'


def machine_claim():
    machines = [load('lab', *path, 'results.json')['machine'] for path in LAB_RUNS]
    assert {(m['git_commit'], m['git_dirty']) for m in machines} == {(machines[0]['git_commit'], False)}, \
        'the lab ran from one commit, with no uncommitted change'
    machine, torch_machine = machines[0], load('lab', 'task3', 'results.json')['machine']
    loads = [m['load_average'][0] for m in machines]
    return (f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores, Python "
            f"{machine['python']}, NumPy {machine['numpy']}, torch {torch_machine['torch']}, commit "
            f"`{machine['git_commit'][:7]}`; 1-minute load average {min(loads):.1f} to {max(loads):.1f} when the "
            f"runs started")


MNIST_RUNS = [  # README label, docs/lab folder, the command that made it
    ('task 1, `layers.py`', ('task1',), 'python train.py --data-dir ../shared/data'),
    ('task 1, `fast_layers.py`', ('task2', 'wd_0'), 'python train_l2reg.py --data-dir ../shared/data --sweep 0 1e-3 1e-2 1e-1 --layers fast'),
    ('task 2, lambda 1e-3', ('task2', 'wd_0.001'), '(the same sweep)'),
    ('task 2, lambda 1e-2', ('task2', 'wd_0.01'), '(the same sweep)'),
    ('task 2, lambda 1e-1', ('task2', 'wd_0.1'), '(the same sweep)'),
    ('task 3, PyTorch, lambda 1e-3', ('task3',), 'python train_pytorch.py --data-dir ../shared/data'),
]
CIFAR_RUNS = [(wd, (lab.lambda_step(wd),)) for wd in lab.CIFAR_LAMBDAS]
LAB_RUNS = [path for _, path, _ in MNIST_RUNS] + [path for _, path in CIFAR_RUNS] + [
    (f'task4_seed{seed}',) for seed in lab.SEEDS]


def mnist_rows():
    rows = []
    for label, path, command in MNIST_RUNS:
        r = load('lab', *path, 'results.json')
        rows.append(f"| {label} | `{command}` | **{percent(r['test']['accuracy'])}** | "
                    f"{percent(r['epochs'][-1]['valid_acc'])} | {r['seconds_per_epoch']:.1f} |")
    return rows


def mnist_claims():
    task1 = load('lab', 'task1', 'results.json')
    compare = load('lab', 'task3_compare', 'compare_numpy.json')
    checks = load('lab', 'check_grads.json')
    answers = load('lab', 'summary', 'summary.json')['answers']
    return [*mnist_rows(), answers['parameters'], answers['receptive_field'], answers['memory'],
            f"the validation loss is {task1['initial_loss']:.4f}, close to ln 10 = {math.log(10):.4f}",
            mnist_settings_claim(task1['config']),
            f"{checks['passed']}/{checks['total']} checks pass; the largest relative error is "
            f"{max(c['max_rel_error'] for c in checks['checks']):.1e}",
            f"the losses differ by at most **{compare['max_loss_rel_diff']:.1e}** (relative) and the weights after "
            f"the last step by **{compare['max_weight_rel_diff']:.1e}**"]


def mnist_settings_claim(config):
    starts = sorted(map(int, config['lr_policy']))
    ranges = ' / '.join(f'{start}-{end}' for start, end in zip(starts, [s - 1 for s in starts[1:]] + [config['epochs']]))
    rates = ' / '.join(f"{config['lr_policy'][str(start)]:g}" for start in starts)
    return (f"{config['epochs']} epochs, batch {config['batch_size']}, SGD with lr {rates} for epochs\n{ranges}, "
            f"{config['dtype']}, seed {config['seed']}")


def cifar_rows():
    rows = []
    for wd, path in CIFAR_RUNS:
        r = load('lab', *path, 'results.json')
        label = f"{wd:g}" + (' (the default)' if path == ('task4',) else " (the lab's filter figure)" if wd == 1e-4
                             else '')
        rows.append(f"| {label} | `python train_cifar.py --data-dir data --weight-decay {wd:g}` | "
                    f"{percent(r['best_valid_acc'])} (epoch {r['best_epoch']}) | **{percent(r['test']['accuracy'])}** | "
                    f"{percent(r['test']['macro_precision'])} | {percent(r['test']['macro_recall'])} | "
                    f"{percent(r['epochs'][-1]['train_acc'])} | {r['seconds_per_epoch']:.1f} |")
    return rows


def cifar_claims():
    seeds = [load('lab', 'task4', 'results.json')] + [load('lab', f'task4_seed{s}', 'results.json') for s in lab.SEEDS]
    config = seeds[0]['config']
    return [*cifar_rows(),
            f"{config['epochs']} epochs, batch {config['batch_size']}, SGD with lr {config['lr']:g} and ExponentialLR "
            f"gamma {config['gamma']:g}, lambda {config['weight_decay']:g}, padding {config['padding']}",
            f"seeds {', '.join(str(r['config']['seed']) for r in seeds)}: best validation accuracy "
            f"{lab.mean_std([r['best_valid_acc'] for r in seeds])}, test accuracy "
            f"{lab.mean_std([r['test']['accuracy'] for r in seeds])}"]


def bonus_claims():
    tune = load('lab', 'bonus_tune', 'tune.json')
    compares = [load('lab', 'bonus', 'compare.json')] + [load('lab', f'bonus_seed{s}', 'compare.json')
                                                         for s in lab.SEEDS]
    claims = [tune['table']]
    for loss in ('hinge', 'cross-entropy'):
        runs = [c['runs'][loss] for c in compares]
        claims.append(f"| {loss} | {runs[0]['config']['lr']:g} | {lab.mean_std([r['best_valid_acc'] for r in runs])} | "
                      f"{lab.mean_std([r['test']['accuracy'] for r in runs])} | "
                      f"{runs[0]['seconds_per_epoch']:.1f} |")
    return claims


def wall_time_claims():
    steps = load('lab', 'steps.json')
    basic = sum(steps[step.name]['seconds'] for step in lab.STEPS) / 60
    extended = sum(steps[step.name]['seconds'] for step in lab.EXTENDED) / 60
    return [f"(`make lab`: {basic:.0f} minutes on 2 CPU cores; `make lab-extended`: {extended:.0f} minutes more)"]


def check_solution_claims():
    log = open(os.path.join(DOCS, 'check_solution', 'check_solution.log')).read()
    readme_block = section('Checking your own solution (students)').split('```\n')[2]
    assert readme_block.strip() and readme_block in log  # the README shows a part of the committed run's output
    grades = load('check_solution', 'grades.json')
    own = next(g for g in grades if g['path'] == '.')
    return [f"gets ok on all {len(own['items'])} items"] if all(i['verdict'] == 'ok' for i in own['items']) else []


FAST_RUNS = [  # README label, docs/fast_cifar folder, the command that made it (docs/fast_cifar/make_runs.sh)
    ('cpu, 600-s budget', 'cpu_budget600', 'python train_cifar_fast.py --data-dir data --time-budget 600 --seeds 3'),
    ('cpu', 'cpu', 'python train_cifar_fast.py --data-dir data --seeds 3'),
    ('cpu', 'cpu_fp32', 'python train_cifar_fast.py --data-dir data --precision fp32'),
    ('gpu, on the CPU', 'gpu_on_cpu', 'python train_cifar_fast.py --data-dir data --preset gpu --device cpu'),
]


def fast_results():
    return [(label, load('fast_cifar', folder, 'results.json'), command) for label, folder, command in FAST_RUNS]


def fast_machine_claim():
    runs = fast_results()
    machines = [r['machine'] for _, r, _ in runs]
    assert {(m['git_commit'], m['git_dirty']) for m in machines} == {(machines[0]['git_commit'], False)}, \
        'the fast runs ran from one commit, with no uncommitted change'
    assert {r['data'] for _, r, _ in runs} == {'CIFAR-10 (JPEG stand-in)'}
    machine, loads = machines[0], [run['load_average_at_start'][0] for _, r, _ in runs for run in r['runs']]
    return (f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores, "
            f"torch {machine['torch']}, commit `{machine['git_commit'][:7]}`; 1-minute load average {min(loads):.1f} to {max(loads):.1f} when "
            f"each model's training started")


def accuracy(runs):
    values = [run['test']['accuracy'] for run in runs]
    return lab.mean_std(values) if len(values) > 1 else percent(values[0])


def fast_table():
    header = ['| preset | command | precision | seeds | epochs | test accuracy | img/s | training s | whole run s | '
              's (epochs) to 90%, mean |', '|---|---|---|---|---:|---:|---:|---:|---:|---:|']
    rows = []
    for label, r, command in fast_results():
        runs, s = r['runs'], r['summary']
        seconds, epochs = ([run[key]['90%'] for run in runs] for key in ('seconds_to_accuracy', 'epochs_to_accuracy'))
        reached = None not in seconds
        rows.append(f"| {label} | `{command}` | {r['config']['precision']} | {', '.join(map(str, s['seeds']))} | "
                    f"{s['epochs_mean']:.2f} | "
                    f"**{accuracy(runs)}** | {s['images_per_second_mean']:.0f} | {s['train_seconds_mean']:.0f} | "
                    f"{sum(run['budget_seconds'] for run in runs) / len(runs):.0f} | "
                    f"{f'{sum(seconds) / len(runs):.0f} ({sum(epochs) / len(runs):.2f})' if reached else '-'} |")
    return '\n'.join(header + rows)


def fast_epoch_table():
    """The mean test accuracy after each epoch of the runs with a fixed number of epochs, one column per run."""
    columns = []
    for label, r, _ in fast_results():
        if r['config']['time_budget']:
            continue  # a budgeted schedule's last evaluation falls at a different epoch for every seed
        curves = [run['history'] for run in r['runs']]
        assert all(c['epoch'] == curves[0]['epoch'] for c in curves)
        means = [sum(c['test_acc'][i] for c in curves) / len(curves) for i in range(len(curves[0]['epoch']))]
        columns.append((f"{label}, {r['config']['precision']}", dict(zip(curves[0]['epoch'][:-1], means[:-1])),
                        means[-1]))
    epochs = sorted({epoch for _, along, _ in columns for epoch in along})
    lines = ['| epoch | ' + ' | '.join(label for label, _, _ in columns) + ' |',
             '|---' + '|---:' * len(columns) + '|']
    lines += [f'| {epoch:g} | ' + ' | '.join(percent(along[epoch]) if epoch in along else '' for _, along, _ in columns)
              + ' |' for epoch in epochs]
    lines.append('| final | ' + ' | '.join(f'**{percent(final)}**' for _, _, final in columns) + ' |')
    return '\n'.join(lines)


def all_claims():
    return [machine_claim(), *mnist_claims(), *cifar_claims(), *bonus_claims(), *wall_time_claims(),
            *check_solution_claims(), fast_machine_claim(), fast_table(), fast_epoch_table()]


def test_every_claim_is_in_the_readme():
    text = readme()
    missing = [claim for claim in all_claims() if claim not in text]
    assert not missing, 'README.md lacks (or states otherwise) what the committed files say:\n' + '\n'.join(missing)


MEASURED = re.compile(r'\d+\.\d+|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?%')


def test_no_results_number_without_its_file():
    """Every decimal, percentage or thousands-separated number of the Results section is inside a claim."""
    text = section('Results')
    for claim in all_claims():
        text = text.replace(claim, '')
    text = re.sub(r'```.*?```', '', text, flags=re.S)  # commands, not measurements
    text = re.sub(r'`[^`\n]*`', '', text)
    text = re.sub(r'\]\([^)]*\)', ']', text)  # link targets
    stray = [line for line in text.splitlines() if MEASURED.search(line)]
    assert not stray, 'numbers in the Results section that no committed file backs:\n' + '\n'.join(stray)


def test_the_resume_transcript_is_the_committed_one():
    transcript = open(os.path.join(DOCS, 'resume', 'transcript.txt')).read()
    assert f'```\n{transcript}```\n' in section('Interrupting and resuming')
