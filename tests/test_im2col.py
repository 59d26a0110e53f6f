"""im2col/col2im: the course's column layout, col2im is im2col's adjoint, the Cython build equals the NumPy
reference bit for bit, the course's own Convolution runs on this build, and the NumPy fallback works (with one
warning line) when the extension is not built."""
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import im2col as im2col_module
from im2col import BUILD_COMMAND, col2im_numpy, im2col_numpy, output_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (H, W, field, padding, stride): odd and even sizes, padding 0..2, stride 1..2, fields 1, 2, 3, 5
CASES = [(H, W, field, padding, stride)
         for H, W, field, padding, stride in itertools.product((5, 8), (7, 6), (1, 2, 3, 5), (0, 1, 2), (1, 2))
         if field <= min(H, W) + 2 * padding]

try:
    import im2col_cython as cython
except ImportError:
    cython = None
needs_cython = pytest.mark.skipif(cython is None, reason=f'the extension is not built ({BUILD_COMMAND})')


def ids(case):
    return 'H{}W{}-k{}-p{}-s{}'.format(*case)


@needs_cython
@pytest.mark.parametrize('case', CASES, ids=ids)
def test_col2im_is_the_adjoint_of_im2col(case):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: the backward pass of a copy is a scatter-add."""
    H, W, field, padding, stride = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, H, W))
    for im2col, col2im in ((im2col_numpy, col2im_numpy), (cython.im2col_cython, cython.col2im_cython)):
        cols = im2col(x, field, field, padding, stride)
        c = rng.standard_normal(cols.shape)
        lhs = np.sum(cols * c)
        rhs = np.sum(x * col2im(c, 3, 2, H, W, field, field, padding, stride))
        assert abs(lhs - rhs) <= 1e-10 * np.abs(cols * c).sum()   # relative to the size of the terms


@needs_cython
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('case', CASES, ids=ids)
def test_cython_equals_the_numpy_reference_exactly(case, dtype):
    H, W, field, padding, stride = case
    rng = np.random.default_rng(1)
    N, C = 3, 2
    out_h, out_w = output_size(H, field, padding, stride), output_size(W, field, padding, stride)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    cols = cython.im2col_cython(x, field, field, padding, stride)
    assert cols.dtype == dtype and cols.shape == (C * field * field, N * out_h * out_w)
    np.testing.assert_array_equal(cols, im2col_numpy(x, field, field, padding, stride))
    c = rng.standard_normal(cols.shape).astype(dtype)
    dx = cython.col2im_cython(c, N, C, H, W, field, field, padding, stride)
    assert dx.dtype == dtype
    # Both add a pixel's contributions in the same order (kernel row, then column), so even the sums agree bit for bit.
    np.testing.assert_array_equal(dx, col2im_numpy(c, N, C, H, W, field, field, padding, stride))


@needs_cython
@pytest.mark.parametrize('field_height, field_width, padding', [(3, 1, 1), (1, 3, 0), (5, 3, 2), (3, 5, 1)])
def test_rectangular_fields(field_height, field_width, padding):
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 6))
    cols = cython.im2col_cython(x, field_height, field_width, padding, 1)
    np.testing.assert_array_equal(cols, im2col_numpy(x, field_height, field_width, padding, 1))
    np.testing.assert_array_equal(cython.col2im_cython(cols, 2, 3, 7, 6, field_height, field_width, padding, 1),
                                  col2im_numpy(cols, 2, 3, 7, 6, field_height, field_width, padding, 1))


def course_im2col(x, field, padding, stride):
    """The loops of the course's im2col_cython.pyx (lab2/), transcribed: the layout its Convolution expects."""
    N, C, H, W = x.shape
    HH, WW = (H + 2 * padding - field) // stride + 1, (W + 2 * padding - field) // stride + 1
    x_padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.zeros((C * field * field, N * HH * WW), dtype=x.dtype)
    for c, yy, xx, ii, jj, i in itertools.product(range(C), range(HH), range(WW), range(field), range(field), range(N)):
        cols[c * field * field + ii * field + jj, yy * WW * N + xx * N + i] = \
            x_padded[i, c, stride * yy + ii, stride * xx + jj]
    return cols


@pytest.mark.parametrize('case', [(5, 6, 3, 1, 1), (6, 5, 2, 0, 2), (4, 7, 5, 2, 1)], ids=ids)
def test_the_layout_is_the_courses(case):
    """Column (output row, output column, image), the image fastest, as the course's Convolution reshapes it."""
    H, W, field, padding, stride = case
    x = np.random.default_rng(4).standard_normal((3, 2, H, W))
    expected = course_im2col(x, field, padding, stride)
    np.testing.assert_array_equal(im2col_numpy(x, field, field, padding, stride), expected)
    np.testing.assert_array_equal(im2col_module.im2col_cython(x, field, field, padding, stride), expected)


def test_layout_is_channel_kernel_row_kernel_column_by_output_row_column_image():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(2, 2, 3, 3)
    cols = im2col_module.im2col_cython(x, 2, 2, 0, 1)
    # row (c=1, i=0, j=1), column (y=1, x=0, n=1): x[1, 1, 1 + 0, 0 + 1]
    assert cols[(1 * 2 + 0) * 2 + 1, (1 * 2 + 0) * 2 + 1] == x[1, 1, 1, 1]


def course_layers():
    """The course's starter layers.py (tests/solutions/course_starter/), imported as it is: its Convolution calls
    `from im2col_cython import ...`, which finds this project's build."""
    spec = importlib.util.spec_from_file_location('course_layers', os.path.join(ROOT, 'tests', 'solutions',
                                                                               'course_starter', 'layers.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cython
@pytest.mark.parametrize('N, C, H, W, F, k, padding', [(2, 3, 7, 6, 4, 3, 'SAME'), (1, 2, 6, 7, 3, 3, 'VALID'),
                                                      (3, 1, 5, 8, 2, 5, 'SAME'), (50, 1, 28, 28, 16, 5, 'SAME')])
def test_the_courses_convolution_runs_on_this_build_and_matches_torch(N, C, H, W, F, k, padding):
    """The course's Convolution, reshape (F, H', W', N) and all, unchanged on this project's im2col_cython."""
    import torch
    layers = course_layers()
    assert layers.im2col_cython is cython.im2col_cython
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, C, H, W))
    conv = layers.Convolution(x, F, k, 'conv', padding=padding)
    conv.weights, conv.bias = rng.standard_normal((F, C * k * k)), rng.standard_normal(F)
    out = conv.forward(x)
    grad_out = rng.standard_normal(out.shape)
    grad_x = conv.backward_inputs(grad_out)
    (_, grad_weights), (_, grad_bias), _ = conv.backward_params(grad_out)

    x_t = torch.tensor(x, requires_grad=True)
    w_t = torch.tensor(conv.weights.reshape(F, C, k, k), requires_grad=True)
    b_t = torch.tensor(conv.bias, requires_grad=True)
    out_t = torch.nn.functional.conv2d(x_t, w_t, b_t, padding=(k - 1) // 2 if padding == 'SAME' else 0)
    out_t.backward(torch.tensor(grad_out))
    pairs = (out, out_t), (grad_x, x_t.grad), (grad_weights, w_t.grad.reshape(F, -1)), (grad_bias, b_t.grad)
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


@needs_cython
def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match='does not fit'):
        cython.im2col_cython(np.zeros((1, 1, 3, 3)), 5, 5, 0, 1)
    with pytest.raises(ValueError, match='float32/float64'):
        cython.im2col_cython(np.zeros((1, 1, 3, 3), dtype=np.int32), 3, 3, 0, 1)
    with pytest.raises(ValueError, match='col2im expects'):
        cython.col2im_cython(np.zeros((9, 8)), 1, 1, 3, 3, 3, 3, 0, 1)


def test_numpy_fallback_warns_once_and_works(tmp_path):
    """Without the .so (a fresh checkout that skipped the build) everything still runs, on the NumPy code."""
    for name in ('im2col.py', 'layers.py', 'fast_layers.py'):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    script = """
import numpy as np
import im2col, layers, fast_layers
assert im2col.kernels is None and im2col.im2col_cython is im2col.im2col_numpy
x = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
for module in (layers, fast_layers):
    conv = module.Convolution(x, 3, 3, 'conv')
    pool = module.MaxPooling(conv, 'pool')
    out = pool.forward(conv.forward(x))
    assert conv.backward_inputs(pool.backward_inputs(np.ones_like(out))).shape == x.shape
print('ok')
"""
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith('warning:') and BUILD_COMMAND in warning[0]
