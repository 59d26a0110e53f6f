"""im2col/col2im: col2im is im2col's adjoint, the Cython build equals the NumPy reference, and the
NumPy fallback works (with one warning line) when the extension is not built."""
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


def test_layout_is_channel_kernel_row_kernel_column_by_image_row_column():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(2, 2, 3, 3)
    cols = im2col_module.im2col_cython(x, 2, 2, 0, 1)
    # row (c=1, i=0, j=1), column (n=1, y=1, x=0): x[1, 1, 1 + 0, 0 + 1]
    assert cols[(1 * 2 + 0) * 2 + 1, (1 * 2 + 1) * 2 + 0] == x[1, 1, 1, 1]


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
