"""check_grads.py passes on the real layers (textbook and fast), catches a broken one, checks a student's layers.py
(a failure there is one check's, with its line), and writes its checks as JSON."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import check_grads
import fast_layers
import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTER = os.path.join(ROOT, 'tests', 'solutions', 'course_starter')


def checks_of(module, seed=0):
    """{'<layer> <check>': max relative error} of run_checks."""
    return {f'{layer} {check}': error for layer, check, error, _ in check_grads.run_checks(module, seed=seed)}


def test_every_check_passes_and_exit_code_is_zero(tmp_path):
    report = tmp_path / 'checks.json'
    result = subprocess.run([sys.executable, 'check_grads.py', '--json', str(report)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line for line in lines if 'max rel error' in line]
    assert len(checks) >= 2 * 17   # per module: conv x6, pools, relu, flatten, fc x3, softmax, l2, regularized loss
    assert all(line.endswith('PASS') for line in checks), result.stdout
    for module in ('textbook', 'fast'):
        for name in ('Convolution SAME', 'Convolution VALID', 'MaxPooling 3/3', 'ReLU', 'Flatten', 'FC weights',
                     'FC biases', 'SoftmaxCrossEntropyWithLogits', 'L2Regularizer', 'RegularizedLoss'):
            assert any(line.split()[0] == module and line.split(None, 1)[1].startswith(name) for line in checks), \
                (module, name)
    written = json.load(open(report))
    assert written['tolerance'] == check_grads.TOLERANCE
    assert written['passed'] == written['total'] == len(checks)
    first = written['checks'][0]
    assert set(first) == {'module', 'layer', 'check', 'max_rel_error', 'passed', 'error'}
    assert (first['module'], first['layer'], first['check']) == ('textbook', 'Convolution', 'SAME 3x3 inputs')
    assert all(check['passed'] and check['max_rel_error'] < check_grads.TOLERANCE and check['error'] is None
               for check in written['checks'])


def test_a_wrong_relu_backward_fails(monkeypatch, capsys):
    # A classic bug: the mask of the input's sign forgotten, so the gradient flows everywhere.
    monkeypatch.setattr(layers.ReLU, 'backward_inputs', lambda self, grad_out: grad_out)
    results = checks_of(layers)
    assert results['ReLU inputs'] > 1e-2
    assert results['FC weights'] < check_grads.TOLERANCE   # the other layers still pass
    with pytest.raises(SystemExit) as exit_info:
        check_grads.main(['--seed', '0', '--layers', 'textbook'])
    assert exit_info.value.code == 1
    assert any('ReLU inputs' in line and line.endswith('FAIL') for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize('module', [layers, fast_layers], ids=['textbook', 'fast'])
def test_a_transposed_conv_weight_gradient_fails(module, monkeypatch):
    original = module.Convolution.backward_params

    def flipped(self, grad_out):
        (w, dw), (b, db), name = original(self, grad_out)
        return [[w, dw[:, ::-1].copy()], [b, db], name]   # kernel taps in the wrong order
    monkeypatch.setattr(module.Convolution, 'backward_params', flipped)
    results = checks_of(module)
    assert results['Convolution SAME 3x3 weights'] > 1e-2 and results['Convolution VALID 3x3 weights'] > 1e-2


def test_a_students_layers_py_is_checked_the_same_way(tmp_path):
    """The course's starter code: its given layers pass, each unwritten one fails with why, the rest still runs."""
    report = tmp_path / 'starter.json'
    result = subprocess.run([sys.executable, 'check_grads.py', STARTER, '--json', str(report)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {f"{check['layer']} {check['check']}": check for check in json.load(open(report))['checks']}
    assert all(check['module'] == STARTER for check in checks.values())
    for given in ('Convolution SAME 3x3 inputs', 'Convolution VALID 3x3 weights', 'MaxPooling 2/2 inputs',
                  'MaxPooling 3/3 inputs', 'Flatten inputs'):
        assert checks[given]['passed'], checks[given]
    assert checks['FC inputs']['error'] == 'TypeError: backward_inputs returned NoneType, not an array'
    assert checks['FC weights']['max_rel_error'] is None and not checks['FC weights']['passed']   # inf: null
    assert 'ellipsis' in checks['L2Regularizer weights']['error']
    assert "(layers.py:" in checks['RegularizedLoss logits']['error']   # where in the student's file
    line = next(line for line in result.stdout.splitlines() if 'FC inputs' in line)
    assert line.startswith(STARTER) and 'FAIL  TypeError' in line


def test_a_students_top_level_code_is_not_run_and_in_place_changes_do_not_spoil_the_check(tmp_path):
    text = open(os.path.join(ROOT, 'layers.py')).read()
    text = text.replace('        self.positive = x > 0  # kept for backward\n        return np.maximum(x, 0)',
                        '        self.positive = x > 0\n        np.maximum(x, 0, out=x)\n        return x')  # in place
    (tmp_path / 'layers.py').write_text(text + "\nraise SystemExit('the script ran')\n")
    result = subprocess.run([sys.executable, 'check_grads.py', str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == '18/18 checks pass'


def test_a_bad_path_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, 'check_grads.py', str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path}: no layers.py in this folder"


def test_relative_error_is_scale_free():
    a = np.array([1e-3, 1e3, 0.0])
    assert check_grads.relative_error(a, a * (1 + 1e-8)) < 1e-8
    assert check_grads.relative_error(a, a + np.array([0, 0, 1e-20])) == pytest.approx(1e-8)  # |n|<tiny: 1e-20/1e-12
    assert check_grads.relative_error(np.array([1.0]), np.array([-1.0])) == 1.0
