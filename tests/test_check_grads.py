"""check_grads.py passes on the real layers (textbook and fast) and catches a broken one."""
import os
import subprocess
import sys

import numpy as np
import pytest

import check_grads
import fast_layers
import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_check_passes_and_exit_code_is_zero():
    result = subprocess.run([sys.executable, 'check_grads.py'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line for line in lines if 'max rel error' in line]
    assert len(checks) >= 2 * 17   # per module: conv x6, pools, relu, flatten, fc x3, softmax, l2, regularized loss
    assert all(line.endswith('PASS') for line in checks), result.stdout
    for module in ('textbook', 'fast'):
        for name in ('Convolution SAME', 'Convolution VALID', 'MaxPooling 3/2', 'ReLU', 'Flatten', 'FC weights',
                     'FC biases', 'SoftmaxCrossEntropyWithLogits', 'L2Regularizer', 'RegularizedLoss'):
            assert any(line.split()[0] == module and line.split(None, 1)[1].startswith(name) for line in checks), \
                (module, name)


def test_a_wrong_relu_backward_fails(monkeypatch, capsys):
    # A classic bug: the mask of the input's sign forgotten, so the gradient flows everywhere.
    monkeypatch.setattr(layers.ReLU, 'backward_inputs', lambda self, grad_out: grad_out)
    results = dict(check_grads.run_checks(layers, seed=0))
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
    results = dict(check_grads.run_checks(module, seed=0))
    assert results['Convolution SAME 3x3 weights'] > 1e-2 and results['Convolution VALID 3x3 weights'] > 1e-2


def test_relative_error_is_scale_free():
    a = np.array([1e-3, 1e3, 0.0])
    assert check_grads.relative_error(a, a * (1 + 1e-8)) < 1e-8
    assert check_grads.relative_error(a, a + np.array([0, 0, 1e-20])) == pytest.approx(1e-8)  # |n|<tiny: 1e-20/1e-12
    assert check_grads.relative_error(np.array([1.0]), np.array([-1.0])) == 1.0
