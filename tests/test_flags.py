"""Every script's command line: --help, main(argv), and no flag that the script would ignore, whatever mode
the other flags put it in."""
import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from test_structure import imports_of_every_module

SCRIPTS = ['train.py', 'train_l2reg.py', 'train_pytorch.py', 'train_cifar.py', 'hinge_loss.py', 'train_cifar_fast.py',
           'check_grads.py', 'lab.py', 'bench_layers.py', 'bench_cifar.py']


def help_text(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), '--help'], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith('usage:'), result.stderr
    return result.stdout


def attributes_read(module):
    """Every attribute name read anywhere in `module` and in the repository modules it imports, transitively:
    where a flag's value (args.<dest>) can be used."""
    graph, seen, todo, names = imports_of_every_module(), set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += graph[name]
        tree = ast.parse(open(os.path.join(ROOT, f'{name}.py')).read())
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    return names


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_flag_in_the_help_is_read_by_the_script(script):
    options = help_text(script).split('\noptions:\n')[1]  # the flags' own lines, not the examples above them
    flags = set(re.findall(r'^\s+(?:-\w, )?--([a-z][a-z0-9-]*)', options, flags=re.M)) - {'help'}
    assert flags, script
    read = attributes_read(script[:-3])
    unread = sorted(flag for flag in flags if flag.replace('-', '_') not in read)
    assert not unread, f"{script} accepts flags it never reads: {unread}"


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_has_main_taking_argv(script):
    main = importlib.import_module(script[:-3]).main
    assert list(main.__code__.co_varnames[:main.__code__.co_argcount]) == ['argv'] and main.__defaults__ == (None,)


def run(script, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize('script, flags, message', [
    ('train.py', ['--summary-only', '--epochs', '2'], '--epochs does nothing with --summary-only'),
    ('train.py', ['--summary-only', '--data-dir', 'x'], '--data-dir does nothing with --summary-only'),
    ('train_pytorch.py', ['--compare-numpy', '--sweep'], '--sweep does nothing with --compare-numpy'),
    ('train_pytorch.py', ['--compare-numpy', '--tensorboard'], '--tensorboard does nothing with --compare-numpy'),
    ('train_pytorch.py', ['--steps', '3'], '--steps does nothing without --compare-numpy'),
    ('train_pytorch.py', ['--layers', 'fast'], '--layers does nothing without --compare-numpy'),
    ('train_pytorch.py', ['--summary-only'], 'unrecognized arguments: --summary-only'),
    ('train_l2reg.py', ['--summary-only'], 'unrecognized arguments: --summary-only'),
])
def test_a_flag_the_mode_would_ignore_is_one_line(tmp_path, script, flags, message):
    result = run(script, *flags, '--save-dir', str(tmp_path / 'runs'))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, \
        result.stderr
    assert not (tmp_path / 'runs').exists()
