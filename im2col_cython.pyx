# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fast im2col / col2im for the Convolution layer (float32 and float64).

Column layout (shared with the NumPy reference in im2col.py):

    cols[(c * field_height + i) * field_width + j, (n * out_h + y) * out_w + x]
        = x_padded[n, c, y * stride + i, x * stride + j]

Rows run over (channel, kernel row, kernel column), which is the order of the
course's weight matrix (num_filters, C*k*k).  Columns run over (image, output
row, output column) with the image slowest, so each image owns one contiguous
block of every row: the batch can be split between threads with no two threads
touching the same cache line, and col2im needs no atomics.
Padding is handled by index arithmetic; no padded copy of x is made.
"""
import numpy as np

cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset


def output_size(int size, int field, int padding, int stride):
    """Spatial output size of a field sliding over `size` pixels."""
    if field <= 0 or stride <= 0 or padding < 0:
        raise ValueError(f"field ({field}) and stride ({stride}) must be positive, padding ({padding}) >= 0")
    if size + 2 * padding < field:
        raise ValueError(f"a {field}-wide field does not fit in {size} pixels with padding {padding}")
    return (size + 2 * padding - field) // stride + 1


cdef void _im2col_image(const floating[:, :, :, ::1] x, floating[:, ::1] cols, Py_ssize_t n,
                        int field_height, int field_width, int padding, int stride,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t c, i, j, y, xo, row, col0, yi, xi
    for c in range(C):
        for i in range(field_height):
            for j in range(field_width):
                row = (c * field_height + i) * field_width + j
                for y in range(out_h):
                    col0 = (n * out_h + y) * out_w
                    yi = y * stride + i - padding
                    if yi < 0 or yi >= H:
                        for xo in range(out_w):
                            cols[row, col0 + xo] = 0
                        continue
                    for xo in range(out_w):
                        xi = xo * stride + j - padding
                        if 0 <= xi < W:
                            cols[row, col0 + xo] = x[n, c, yi, xi]
                        else:
                            cols[row, col0 + xo] = 0


cdef void _col2im_image(const floating[:, ::1] cols, floating[:, :, :, ::1] dx, Py_ssize_t n,
                        int field_height, int field_width, int padding, int stride,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t c, i, j, y, xo, row, col0, yi, xi
    memset(&dx[n, 0, 0, 0], 0, C * H * W * sizeof(floating))
    for c in range(C):
        for i in range(field_height):
            for j in range(field_width):
                row = (c * field_height + i) * field_width + j
                for y in range(out_h):
                    yi = y * stride + i - padding
                    if yi < 0 or yi >= H:
                        continue
                    col0 = (n * out_h + y) * out_w
                    for xo in range(out_w):
                        xi = xo * stride + j - padding
                        if 0 <= xi < W:
                            dx[n, c, yi, xi] += cols[row, col0 + xo]


def _im2col_fill(const floating[:, :, :, ::1] x, floating[:, ::1] cols,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w, int num_threads):
    cdef Py_ssize_t n
    for n in prange(x.shape[0], nogil=True, schedule='static', num_threads=num_threads):
        _im2col_image(x, cols, n, field_height, field_width, padding, stride, out_h, out_w)


def _col2im_fill(const floating[:, ::1] cols, floating[:, :, :, ::1] dx,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w, int num_threads):
    cdef Py_ssize_t n
    for n in prange(dx.shape[0], nogil=True, schedule='static', num_threads=num_threads):
        _col2im_image(cols, dx, n, field_height, field_width, padding, stride, out_h, out_w)


def im2col_cython(x, int field_height, int field_width, int padding, int stride, int num_threads=0):
    """(N, C, H, W) -> cols (C*fh*fw, N*out_h*out_w), same dtype as x.

    num_threads=0 lets OpenMP choose (OMP_NUM_THREADS or all cores).
    """
    x = np.ascontiguousarray(x)
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"im2col expects a float32/float64 (N, C, H, W) array, got {x.dtype} {x.shape}")
    N, C, H, W = x.shape
    out_h = output_size(H, field_height, padding, stride)
    out_w = output_size(W, field_width, padding, stride)
    cols = np.empty((C * field_height * field_width, N * out_h * out_w), dtype=x.dtype)
    _im2col_fill(x, cols, field_height, field_width, padding, stride, out_h, out_w,
                 num_threads if num_threads > 0 else _default_threads())
    return cols


def col2im_cython(cols, int N, int C, int H, int W, int field_height, int field_width,
                  int padding, int stride, int num_threads=0):
    """Adjoint of im2col: sums every column entry back onto its pixel -> (N, C, H, W)."""
    cols = np.ascontiguousarray(cols)
    out_h = output_size(H, field_height, padding, stride)
    out_w = output_size(W, field_width, padding, stride)
    expected = (C * field_height * field_width, N * out_h * out_w)
    if cols.shape != expected or cols.dtype not in (np.float32, np.float64):
        raise ValueError(f"col2im expects float32/float64 cols of shape {expected}, got {cols.dtype} {cols.shape}")
    dx = np.empty((N, C, H, W), dtype=cols.dtype)
    _col2im_fill(cols, dx, field_height, field_width, padding, stride, out_h, out_w,
                 num_threads if num_threads > 0 else _default_threads())
    return dx


cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int _omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int _omp_max_threads(void) { return 1; }
    #endif
    """
    int _omp_max_threads() nogil


def _default_threads():
    return _omp_max_threads()
