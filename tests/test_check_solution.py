"""check_solution.py: each typical student bug, made in a copy of this project's layers.py (or hinge_loss.py), is
flagged on exactly its item with every other item ok; the published student solutions in tests/solutions/ get
their known verdicts; the project's own layers get ok everywhere; the output (table, JSON, Markdown) and the exit
codes; and the student's code writes nothing where it should not."""
import json
import os
import subprocess
import sys

import pytest

import check_solution
from conftest import ROOT

SOLUTIONS = os.path.join(ROOT, 'tests', 'solutions')
EVERY_ITEM = [item for item, _ in check_solution.items_of(has_hinge=True, train=False)]

# name: (the item it breaks, its verdict, edits of layers.py as (old, new), edits of hinge_loss.py)
MUTANTS = {
    'fc_weight_gradient_transposed': ('FC.backward_params', 'wrong', [
        ('grad_out.T @ self.inputs', 'self.inputs.T @ grad_out')], []),
    'fc_bias_gradient_averaged': ('FC.backward_params', 'wrong', [
        ('grad_out.sum(axis=0)], self.name]', 'grad_out.mean(axis=0)], self.name]')], []),
    'fc_forward_without_bias': ('FC.forward', 'wrong', [
        ('return x @ self.weights.T + self.bias', 'return x @ self.weights.T')], []),
    'fc_backward_inputs_pass': ('FC.backward_inputs', 'missing', [
        ('return grad_out @ self.weights', 'pass')], []),
    'fc_backward_changes_the_weights': ('FC.backward_params', 'wrong', [
        ('        return [[self.weights, grad_out.T @ self.inputs]',
         '        self.weights *= 0.5\n        return [[self.weights, grad_out.T @ self.inputs]')], []),
    'fc_backward_hangs': ('FC.backward_params', 'timeout', [
        ('        return [[self.weights, grad_out.T @ self.inputs]',
         '        while True:\n            pass\n        return [[self.weights, grad_out.T @ self.inputs]')], []),
    'softmax_loss_summed': ('SoftmaxCrossEntropyWithLogits.forward', 'wrong', [
        ('* log_probs).sum() / x.shape[0]', '* log_probs).sum()')], []),
    'softmax_without_max_shift': ('SoftmaxCrossEntropyWithLogits.forward', 'wrong', [
        ('shifted = x - x.max(axis=1, keepdims=True)', 'shifted = x')], []),
    'softmax_gradient_not_averaged': ('SoftmaxCrossEntropyWithLogits.backward_inputs', 'wrong', [
        ('return (probs - _one_hot(y, x.shape[1], x.dtype)) / x.shape[0]',
         'return probs - _one_hot(y, x.shape[1], x.dtype)')], []),
    'relu_mask_on_the_wrong_side': ('ReLU.backward_inputs', 'wrong', [
        ('self.positive = x > 0', 'self.positive = x < 0')], []),
    'relu_backward_calls_os_exit': ('ReLU.backward_inputs', 'error', [
        ('import numpy as np\n', 'import os\n\nimport numpy as np\n'),
        ('        return grad_out * self.positive', '        os._exit(3)')], []),
    'pooling_backward_calls_sys_exit': ('MaxPooling.backward_inputs', 'error', [
        ('import numpy as np\n', 'import sys\n\nimport numpy as np\n'),
        ('        p, s, (N, C, out_h, out_w) = self.pool_size',
         '        sys.exit(2)\n        p, s, (N, C, out_h, out_w) = self.pool_size')], []),
    'conv_backward_params_segfaults': ('Convolution.backward_params', 'error', [
        ('import numpy as np\n', 'import ctypes\n\nimport numpy as np\n'),
        ('        return [[self.weights, grad_weights]',
         '        ctypes.string_at(0)\n        return [[self.weights, grad_weights]')], []),
    'conv_backward_inputs_not_implemented': ('Convolution.backward_inputs', 'missing', [
        ('        grad_cols = self.weights.T @',
         '        raise NotImplementedError\n        grad_cols = self.weights.T @')], []),
    'flatten_backward_syntax_error': ('Flatten.backward_inputs', 'error', [
        ('return grad_out.reshape((grad_out.shape[0],) + self.input_shape[1:])',
         'return grad_out.reshape((grad_out.shape[0],) + self.input_shape[1:]')], []),
    'l2_gradient_without_lambda': ('L2Regularizer.backward_params', 'wrong', [
        ('[[self.weights, self.weight_decay * self.weights]', '[[self.weights, self.weights]')], []),
    'l2_forward_and_backward_disagree': ('L2Regularizer.backward_params', 'wrong', [
        ('[[self.weights, self.weight_decay * self.weights]',
         '[[self.weights, 2 * self.weight_decay * self.weights]')], []),
    'l2_backward_allocates_50_gb': ('L2Regularizer.backward_params', 'error', [
        ('        return [[self.weights, self.weight_decay * self.weights]',
         '        np.ones(50 * 2 ** 30 // 8)\n        return [[self.weights, self.weight_decay * self.weights]')], []),
    'regularized_loss_drops_a_term': ('RegularizedLoss.forward', 'wrong', [
        ('for regularizer in self.regularizer_losses)', 'for regularizer in self.regularizer_losses[1:])')], []),
    'hinge_averaged_over_all_entries': ('multiclass_hinge_loss', 'wrong', [], [
        ('return per_example.mean()', 'return per_example.sum() / logits.numel()')]),
    'hinge_averaged_over_the_classes': ('multiclass_hinge_loss', 'wrong', [], [
        ('torch.zeros_like(margins)).sum(dim=1)', 'torch.zeros_like(margins)).mean(dim=1)')]),
}

# A script that trains when imported, and writes where it runs: none of it may run.
TRAINS_AT_IMPORT = '''
import os
import nn
import train
os.makedirs('out', exist_ok=True)
open(os.path.join('out', 'log.txt'), 'w').write('training')
net = train.make_net(__import__('layers'))
while True:
    nn.sgd_update_params([], {'lr': 0.1})
'''


def edited(path, edits):
    text = open(path).read()
    for old, new in edits:
        assert text.count(old) == 1, (path, old)
        text = text.replace(old, new)
    return text


def run_checker(args, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'check_solution.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def verdicts(report_path):
    """{path as given: {item: (verdict, detail)}} from check_solution.py's --json file."""
    return {entry['path']: {item['item']: (item['verdict'], item['detail']) for item in entry['items']}
            for entry in json.load(open(report_path))}


@pytest.fixture(scope='module')
def mutants(tmp_path_factory):
    """Every mutant in its own folder (layers.py and hinge_loss.py), all checked in one run; also the script
    that trains at import. Returns ({mutant: {item: (verdict, detail)}}, the folder of the mutants, the run)."""
    root = tmp_path_factory.mktemp('mutants')
    for name, (_, _, layer_edits, hinge_edits) in MUTANTS.items():
        os.mkdir(root / name)
        (root / name / 'layers.py').write_text(edited(os.path.join(ROOT, 'layers.py'), layer_edits))
        (root / name / 'hinge_loss.py').write_text(edited(os.path.join(ROOT, 'hinge_loss.py'), hinge_edits))
    os.mkdir(root / 'trains_at_import')
    (root / 'trains_at_import' / 'layers.py').write_text(
        open(os.path.join(ROOT, 'layers.py')).read() + TRAINS_AT_IMPORT)
    (root / 'trains_at_import' / 'hinge_loss.py').write_text(open(os.path.join(ROOT, 'hinge_loss.py')).read())
    names = sorted(os.listdir(root))
    report = root / 'report.json'
    result = run_checker([*names, '--no-train', '--timeout', '10', '--memory', '1', '--json', str(report)], cwd=root)
    assert result.returncode == 1, result.stdout + result.stderr
    return verdicts(report), root, result


@pytest.mark.parametrize('name', sorted(MUTANTS))
def test_a_mutant_is_flagged_on_exactly_its_item(mutants, name):
    results, _, _ = mutants
    item, verdict, _, _ = MUTANTS[name]
    got = results[name]
    assert list(got) == EVERY_ITEM   # no item for the file itself: even the syntax error is the method's
    assert got[item][0] == verdict, got[item]
    assert got[item][1]   # says what is wrong
    assert all(got[other][0] == 'ok' for other in EVERY_ITEM if other != item), \
        {other: got[other] for other in EVERY_ITEM if got[other][0] != 'ok'}


@pytest.mark.parametrize('name, words', [
    ('fc_weight_gradient_transposed', ['shape (7, 5), not (5, 7)', 'transpose']),
    ('fc_bias_gradient_averaged', ['1/N', 'averaged over the batch']),
    ('fc_forward_without_bias', ['x (4, 7), 5 outputs']),
    ('fc_backward_changes_the_weights', ['changes layer.weights']),
    ('fc_backward_hangs', ['no answer within 10 s']),
    ('softmax_loss_summed', ['5 times', 'summed over the batch']),
    ('softmax_without_max_shift', ['scale 1e3', 'x - max']),
    ('softmax_gradient_not_averaged', ['5 times']),
    ('relu_backward_calls_os_exit', ['exited with status 3']),
    ('pooling_backward_calls_sys_exit', ['SystemExit: 2', 'layers.py:']),
    ('conv_backward_params_segfaults', ['SIGSEGV']),
    ('conv_backward_inputs_not_implemented', ['NotImplementedError']),
    ('flatten_backward_syntax_error', ['SyntaxError']),
    ('l2_gradient_without_lambda', ['without lambda']),
    ('l2_forward_and_backward_disagree', ['disagree', "the lab's numerical check"]),
    ('l2_backward_allocates_50_gb', ['MemoryError']),
    ('regularized_loss_drops_a_term', ['the penalty w0 is left out']),
    ('hinge_averaged_over_all_entries', ['0.1 times', 'B*C']),
    ('hinge_averaged_over_the_classes', ['0.1111 times', 'C-1']),
])
def test_the_detail_says_what_is_wrong(mutants, name, words):
    detail = mutants[0][name][MUTANTS[name][0]][1]
    assert all(word in detail for word in words), detail


def test_a_script_that_trains_at_import_is_not_run(mutants):
    results, root, _ = mutants
    assert all(verdict == 'ok' for verdict, _ in results['trains_at_import'].values()), results['trains_at_import']
    # and writes nothing: not in the student's folder, the folder it was started from, or the project
    assert sorted(os.listdir(root / 'trains_at_import')) == ['hinge_loss.py', 'layers.py']
    assert not os.path.exists(root / 'out') and not os.path.exists(os.path.join(ROOT, 'out'))


def test_the_table_groups_items_by_task(mutants):
    out = mutants[2].stdout
    block = out.split('regularized_loss_drops_a_term\n')[1].split('\n\n')[0]
    lines = [line.strip() for line in block.splitlines()]
    assert lines[0] == 'task 1' and 'task 2' in lines and 'bonus' in lines
    assert lines.index('task 2') < next(i for i, line in enumerate(lines) if line.startswith('RegularizedLoss.forward'))
    assert any(line.startswith('RegularizedLoss.forward') and ' wrong ' in line for line in lines)
    assert lines[-1] == f'{len(EVERY_ITEM) - 1} of {len(EVERY_ITEM)} items ok'


# ----------------------------------------------------------------------------- published solutions

KNOWN = {  # solution: {item: verdict} for every item that is not ok, and words of its detail
    'course_starter': {**{item: ('missing', 'returns None') for item in (
        'FC.forward', 'FC.backward_inputs', 'ReLU.forward', 'ReLU.backward_inputs',
        'SoftmaxCrossEntropyWithLogits.forward', 'SoftmaxCrossEntropyWithLogits.backward_inputs',
        'L2Regularizer.forward')},
        'FC.backward_params': ('missing', '...'), 'L2Regularizer.backward_params': ('missing', '...'),
        'multiclass_hinge_loss': ('missing', 'defines multiclass_hinge_loss')},
    'dinogrgic1': {'SoftmaxCrossEntropyWithLogits.forward': ('wrong', 'inf (logits (4, 10) of scale 1e3)'),
                   'multiclass_hinge_loss': ('missing', '')},
    'doraivezic': {'SoftmaxCrossEntropyWithLogits.forward': ('wrong', 'shape (10,), not a scalar'),
                   'SoftmaxCrossEntropyWithLogits.backward_inputs': ('wrong', 'NaN (logits (4, 10) of scale 1e3)'),
                   'multiclass_hinge_loss': ('missing', '')},
    'ivan-dujmic': {},
    'paulosankovic': {'SoftmaxCrossEntropyWithLogits.forward': ('wrong', 'nan (logits (4, 10) of scale 1e3)'),
                      'multiclass_hinge_loss': ('missing', '')},
    'perosm': {'SoftmaxCrossEntropyWithLogits.forward': ('wrong', 'inf (logits (4, 10) of scale 1e3)'),
               'SoftmaxCrossEntropyWithLogits.backward_inputs': ('wrong', 'NaN'),
               'multiclass_hinge_loss': ('wrong', "CS231n's loss + delta")},
    'vmoskov': {},
}
NOTES = {  # solution: {item: words of its note}, on items that are ok
    'dinogrgic1': {'ReLU.forward': 'changes its argument inputs in place',
                   'ReLU.backward_inputs': 'changes its argument grads in place'},
    'paulosankovic': {'ReLU.backward_inputs': 'changes its argument grads in place'},
}


@pytest.fixture(scope='module')
def solutions(tmp_path_factory):
    """The published solutions (and, last, this project's layers.py by its absolute path), checked in one run:
    (their {name: {item: (verdict, detail)}}, the JSON file's entries)."""
    report = tmp_path_factory.mktemp('solutions') / 'report.json'
    paths = [f'tests/solutions/{name}/' for name in sorted(KNOWN)]   # with a trailing '/', to be kept as given
    result = run_checker([*paths, os.path.join(ROOT, 'layers.py'), '--no-train', '--json', str(report)])
    assert result.returncode == 1, result.stdout + result.stderr
    got = verdicts(report)
    return {path.split('/')[2]: got[path] for path in paths}, json.load(open(report))


@pytest.mark.parametrize('name', sorted(KNOWN))
def test_a_published_solution_gets_its_known_verdicts(solutions, name):
    got = solutions[0][name]
    assert list(got) == EVERY_ITEM
    for item, (verdict, detail) in got.items():
        expected, words = KNOWN[name].get(item, ('ok', ''))
        assert verdict == expected and words in detail, (item, verdict, detail)
    for item, words in NOTES.get(name, {}).items():
        assert got[item][0] == 'ok' and words in got[item][1], got[item]


def test_the_paths_in_the_json_are_as_given(solutions):
    entries = solutions[1]
    assert [entry['path'] for entry in entries] == [f'tests/solutions/{name}/' for name in sorted(KNOWN)] + [
        os.path.join(ROOT, 'layers.py')]
    assert set(entries[0]['items'][0]) == {'item', 'task', 'verdict', 'detail'}
    assert {item['task'] for item in entries[0]['items']} == {'task 1', 'task 2', 'bonus'}
    assert [item['item'] for item in entries[-1]['items']] == EVERY_ITEM[:-1]   # a file without a hinge loss
    assert all(item['verdict'] == 'ok' for item in entries[-1]['items'])


# ----------------------------------------------------------------------------- the project's own layers, net.train

@pytest.mark.integration
def test_the_projects_layers_get_ok_on_every_item_and_net_train_runs(mnist_dir, tmp_path):
    report = tmp_path / 'report.json'
    result = run_checker(['.', 'fast_layers.py', 'tests/solutions/course_starter', 'tests/solutions/dinogrgic1',
                          '--data-dir', mnist_dir, '--json', str(report)])
    assert result.returncode == 1, result.stdout + result.stderr
    got = verdicts(report)
    for path in ('.', 'fast_layers.py'):
        assert all(verdict == 'ok' for verdict, _ in got[path].values()), got[path]
        assert 'net.train' in got[path] and 'accuracy' in got[path]['net.train'][1]
    assert 'multiclass_hinge_loss' in got['.']   # the folder's hinge_loss.py
    assert got['tests/solutions/course_starter']['net.train'][0] == 'missing'
    assert 'not run: FC.forward' in got['tests/solutions/course_starter']['net.train'][1]
    # the softmax that overflows at logits of 1e3 trains like the reference on real images
    assert got['tests/solutions/dinogrgic1']['net.train'][0] == 'ok'


# ----------------------------------------------------------------------------- the command line and the files

def test_help_and_bad_usage(tmp_path):
    result = run_checker(['--help'])
    assert result.returncode == 0 and 'multiclass_hinge_loss' in result.stdout
    result = run_checker([str(tmp_path / 'nowhere'), '--no-train'])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no such file or folder"]
    (tmp_path / 'notes.txt').write_text('hello')
    result = run_checker([str(tmp_path / 'notes.txt'), '--no-train'])
    assert result.returncode == 2 and 'not a folder or a .py file' in result.stderr
    result = run_checker(['layers.py', '--data-dir', str(tmp_path)])   # net.train without MNIST
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert '--no-train' in result.stderr


def test_every_item_ok_is_exit_code_zero():
    result = run_checker(['layers.py', '--no-train'])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].strip() == '19 of 19 items ok'


def test_a_folder_without_layers_py(tmp_path):
    (tmp_path / 'empty').mkdir()
    report = tmp_path / 'report.json'
    result = run_checker([str(tmp_path / 'empty'), '--no-train', '--json', str(report)])
    assert result.returncode == 1
    items = verdicts(report)[str(tmp_path / 'empty')]
    assert all(verdict == 'missing' for verdict, _ in items.values())
    assert 'no layers.py' in items['FC.forward'][1]


def test_a_statement_outside_the_classes_that_fails_is_the_files_item(tmp_path):
    folder = tmp_path / 'broken'
    folder.mkdir()
    text = open(os.path.join(ROOT, 'layers.py')).read()
    (folder / 'layers.py').write_text(text.replace('import numpy as np\n', 'import numpy as np\nLIMIT = 1 +* 2\n'
                                                   'SCALE = np.no_such_thing\n'))
    report = tmp_path / 'report.json'
    run_checker([str(folder), '--no-train', '--json', str(report)])
    items = verdicts(report)[str(folder)]
    assert list(items)[0] == 'layers.py' and items['layers.py'][0] == 'error'
    assert 'SyntaxError' in items['layers.py'][1] and 'line 21' in items['layers.py'][1]
    assert "AttributeError: module 'numpy' has no attribute 'no_such_thing' (layers.py:22)" in items['layers.py'][1]
    assert items['FC.forward'][0] == 'ok'   # the classes do not use them


def test_a_file_whose_definitions_hang_is_one_timeout_per_item_and_its_own(tmp_path):
    (tmp_path / 'layers.py').write_text('import numpy as np\n\nclass FC:\n    while True:\n        pass\n')
    report = tmp_path / 'report.json'
    result = run_checker([str(tmp_path), '--no-train', '--timeout', '2', '--json', str(report)])
    assert result.returncode == 1
    items = verdicts(report)[str(tmp_path)]
    assert items['layers.py'] == ('timeout', 'loading layers.py: no answer within 2 s')
    assert all(items[item] == items['layers.py'] for item in EVERY_ITEM[:-1])


def test_markdown_is_a_grade_sheet_with_student_text_escaped(tmp_path):
    folder = tmp_path / 'a|b'   # a folder name with a '|', and an exception message with one and a newline
    folder.mkdir()
    (folder / 'layers.py').write_text(edited(os.path.join(ROOT, 'layers.py'), [
        ('        return x.reshape(x.shape[0], -1)', "        raise ValueError('bad | shape\\nsecond line')")]))
    markdown = tmp_path / 'grades.md'
    result = run_checker([str(folder), '--no-train', '--markdown', str(markdown)])
    assert result.returncode == 1
    lines = markdown.read_text().splitlines()
    header, rule, row = lines[:3]
    assert header.startswith('| submission | Convolution.forward |') and header.endswith('| multiclass_hinge_loss | ok |')
    columns = header.count('|')
    assert rule.count('|') == columns
    assert row.startswith('| ' + str(folder).replace('|', '\\|') + ' |')
    assert row.count('|') - row.count('\\|') == columns   # the escaped '|' is no column
    assert row.split(' | ')[6] == 'error' and row.endswith('| missing | 18/20 |')
    detail = next(line for line in lines if line.startswith('- Flatten.forward'))
    assert 'bad \\| shape second line' in detail
    assert not any(name.startswith('.') for name in os.listdir(tmp_path))   # no temporary file left


# ----------------------------------------------------------------------------- the loader

def test_student_load_layers_takes_definitions_only(tmp_path):
    import student
    path = tmp_path / 'layers.py'
    path.write_text(open(os.path.join(SOLUTIONS, 'ivan-dujmic', 'layers.py')).read()
                    + "\nopen('ran.txt', 'w')\nraise SystemExit('ran')\n")
    module = student.load_layers(str(tmp_path))
    assert module.im2col_cython.__module__ == 'im2col_cython'   # `from cython_dir.im2col_cython import ...`: ours
    assert all(isinstance(getattr(module, name), type) for name in student.COURSE_CLASSES)
    assert not os.path.exists('ran.txt')


@pytest.mark.parametrize('source, message', [
    ('class FC:\n    def forward(self x):\n        pass\n', 'layers.py:2: invalid syntax'),
    ('import numpy as np\n', 'defines no class Convolution'),
    ('class FC(NoSuchBase):\n    pass\n', "NameError: name 'NoSuchBase' is not defined"),
])
def test_student_load_layers_one_line_errors(tmp_path, source, message):
    import cli
    import student
    (tmp_path / 'layers.py').write_text(source)
    with pytest.raises(cli.UserError, match='.*') as error:
        student.load_layers(str(tmp_path))
    assert message in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(cli.UserError, match='no such file or folder'):
        student.load_layers(str(tmp_path / 'nowhere'))
    with pytest.raises(cli.UserError, match='no layers.py'):
        student.load_layers(str(tmp_path / '..'))
