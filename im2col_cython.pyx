# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fast im2col / col2im for the Convolution layer and max pooling for MaxPooling (float32 and float64).

Column layout, the course's (shared with the NumPy reference in im2col.py):

    cols[(c * field_height + i) * field_width + j, (y * out_w + x) * N + n]
        = x_padded[n, c, y * stride + i, x * stride + j]

Rows run over (channel, kernel row, kernel column), which is the order of the
course's weight matrix (num_filters, C*k*k).  Columns run over (output row,
output column, image) with the image fastest, as in the course's
im2col_cython.pyx: its Convolution (and every student's, written against it)
reshapes weights @ cols as (num_filters, H', W', N), so it runs unchanged on
this build. Padding is handled by index arithmetic; no padded copy of x is made.
(The course's own loops index rows as c*fh*fw + i*fh + j, the same for its square kernels.)

The max-pooling kernels (fast_layers.MaxPooling runs them on its own threads, one
part of the batch each, so they release the GIL) keep, per window, the index
y * W + x of its maximum within the (H, W) plane; backward adds each window's
gradient there.
"""
import numpy as np

cimport cython
from cython cimport floating
from libc.string cimport memcpy, memset


cdef Py_ssize_t _output_size(Py_ssize_t size, int field, int padding, int stride) except -1:
    """im2col.output_size, repeated here because im2col.py imports this module."""
    if field <= 0 or stride <= 0 or padding < 0 or size + 2 * padding < field:
        raise ValueError(f"a field of {field} with stride {stride} and padding {padding} does not fit {size} pixels")
    return (size + 2 * padding - field) // stride + 1


cdef inline void _valid_range(Py_ssize_t size, int offset, int stride, Py_ssize_t out_size,
                              Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """The outputs o in [lo, hi) whose input pixel o * stride + offset lies inside [0, size)."""
    cdef Py_ssize_t first = 0 if offset >= 0 else (-offset + stride - 1) // stride
    cdef Py_ssize_t last = size - 1 - offset  # o * stride <= last
    hi[0] = 0 if last < 0 else min(out_size, last // stride + 1)
    lo[0] = min(first, hi[0])


# Both kernels work on the images transposed to (C, H, W, N), the image fastest as in cols: then the entries of
# one output row of one kernel tap are one contiguous run in both arrays, a memcpy (or a vectorised add) for
# stride 1, where writing cols from (N, C, H, W) images would scatter every value N entries apart.

cdef void _im2col_row(const floating[:, :, :, ::1] xt, floating *dst, Py_ssize_t c, int i, int j,
                      int padding, int stride, Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    """Row (c, i, j) of cols: kernel tap (i, j) of channel c at every output pixel of every image."""
    cdef Py_ssize_t H = xt.shape[1], W = xt.shape[2], N = xt.shape[3]
    cdef Py_ssize_t y, xo, yi, lo, hi
    cdef floating *out
    # Output columns lo..hi-1 read inside the image; the rest read the zero padding.
    _valid_range(W, j - padding, stride, out_w, &lo, &hi)
    for y in range(out_h):
        out = dst + y * out_w * N   # the out_w * N entries (x, n) of output row y
        yi = y * stride + i - padding
        if yi < 0 or yi >= H or hi <= lo:
            memset(out, 0, out_w * N * sizeof(floating))
            continue
        memset(out, 0, lo * N * sizeof(floating))
        memset(out + hi * N, 0, (out_w - hi) * N * sizeof(floating))
        if stride == 1:
            memcpy(out + lo * N, &xt[c, yi, lo + j - padding, 0], (hi - lo) * N * sizeof(floating))
        else:
            for xo in range(lo, hi):
                memcpy(out + xo * N, &xt[c, yi, xo * stride + j - padding, 0], N * sizeof(floating))


cdef void _col2im_row(const floating *src, floating[:, :, :, ::1] dxt, Py_ssize_t c, int i, int j,
                      int padding, int stride, Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    """Adds row (c, i, j) of cols back onto the pixels _im2col_row copied it from."""
    cdef Py_ssize_t H = dxt.shape[1], W = dxt.shape[2], N = dxt.shape[3]
    cdef Py_ssize_t y, xo, k, yi, lo, hi
    cdef const floating *row
    cdef floating *dst
    _valid_range(W, j - padding, stride, out_w, &lo, &hi)
    for y in range(out_h):
        yi = y * stride + i - padding
        if yi < 0 or yi >= H or hi <= lo:
            continue
        row = src + y * out_w * N
        if stride == 1:
            dst = &dxt[c, yi, lo + j - padding, 0]
            for k in range((hi - lo) * N):
                dst[k] += row[lo * N + k]
        else:
            for xo in range(lo, hi):
                dst = &dxt[c, yi, xo * stride + j - padding, 0]
                for k in range(N):
                    dst[k] += row[xo * N + k]


def _im2col_fill(const floating[:, :, :, ::1] xt, floating[:, ::1] cols,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w):
    cdef Py_ssize_t c, i, j
    with nogil:
        for c in range(xt.shape[0]):
            for i in range(field_height):
                for j in range(field_width):
                    _im2col_row(xt, &cols[(c * field_height + i) * field_width + j, 0], c, i, j,
                                padding, stride, out_h, out_w)


def _col2im_fill(const floating[:, ::1] cols, floating[:, :, :, ::1] dxt,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w):
    cdef Py_ssize_t c, i, j
    with nogil:   # dxt starts at zero
        # Tap by tap, kernel row then column: each pixel adds its terms in the order of the NumPy reference.
        for c in range(dxt.shape[0]):
            for i in range(field_height):
                for j in range(field_width):
                    _col2im_row(&cols[(c * field_height + i) * field_width + j, 0], dxt, c, i, j,
                                padding, stride, out_h, out_w)


def im2col_cython(x, int field_height, int field_width, int padding, int stride):
    """(N, C, H, W) -> cols (C*fh*fw, N*out_h*out_w), same dtype as x."""
    x = np.asarray(x)
    _check_images(x, 'im2col')
    N, C, H, W = x.shape
    out_h, out_w = _output_size(H, field_height, padding, stride), _output_size(W, field_width, padding, stride)
    cols = np.empty((C * field_height * field_width, N * out_h * out_w), dtype=x.dtype)
    xt = np.ascontiguousarray(x.transpose(1, 2, 3, 0))   # (C, H, W, N): the image fastest, as in cols
    _im2col_fill(xt, cols, field_height, field_width, padding, stride, out_h, out_w)
    return cols


def col2im_cython(cols, int N, int C, int H, int W, int field_height, int field_width,
                  int padding, int stride):
    """Adjoint of im2col: sums every column entry back onto its pixel -> (N, C, H, W)."""
    out_h = _output_size(H, field_height, padding, stride)
    out_w = _output_size(W, field_width, padding, stride)
    cols = np.ascontiguousarray(cols)
    _check_cols(cols, (C * field_height * field_width, N * out_h * out_w), 'col2im')
    dxt = np.zeros((C, H, W, N), dtype=cols.dtype)
    _col2im_fill(cols, dxt, field_height, field_width, padding, stride, out_h, out_w)
    return np.ascontiguousarray(dxt.transpose(3, 0, 1, 2))


def _check_images(x, what):
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{what} expects a float32/float64 (N, C, H, W) array, got {x.dtype} {x.shape}")


def _check_cols(cols, shape, what):
    if cols.shape != shape or cols.dtype not in (np.float32, np.float64):
        raise ValueError(f"{what} expects float32/float64 cols of shape {shape}, got {cols.dtype} {cols.shape}")


cdef void _max_pool_plane(const floating *x, floating *out, int *argmax, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t out_h, Py_ssize_t out_w, int pool_size, int stride) noexcept nogil:
    """One (H, W) plane; out and argmax are its (out_h, out_w) planes."""
    cdef Py_ssize_t y, xo, i, j, top_left, index, best, k
    cdef bint has_nan = False
    for y in range(out_h):
        for xo in range(out_w):
            top_left = y * stride * W + xo * stride
            best = top_left
            for i in range(pool_size):
                for j in range(pool_size):
                    index = top_left + i * W + j
                    if x[index] > x[best]:   # '>' keeps the first maximum (PyTorch's choice)
                        best = index
            out[y * out_w + xo] = x[best]
            argmax[y * out_w + xo] = <int>best
    # A NaN must win its window, the first one, as in NumPy and PyTorch. Testing for NaN inside the
    # loop above makes it ~2-5x slower; a separate pass over the plane is cheap (vectorised), and
    # only a plane that holds a NaN is gone through again.
    for k in range(H * W):
        has_nan |= x[k] != x[k]
    if not has_nan:
        return
    for y in range(out_h):
        for xo in range(out_w):
            top_left = y * stride * W + xo * stride
            for index in range(pool_size * pool_size - 1, -1, -1):   # backwards: the first NaN is set last
                k = top_left + index // pool_size * W + index % pool_size
                if x[k] != x[k]:
                    out[y * out_w + xo] = x[k]
                    argmax[y * out_w + xo] = <int>k


def _max_pool_fill(const floating[:, :, ::1] x, floating[:, :, ::1] out, int[:, :, ::1] argmax,
                   int pool_size, int stride):
    cdef Py_ssize_t plane
    with nogil:
        for plane in range(x.shape[0]):
            _max_pool_plane(&x[plane, 0, 0], &out[plane, 0, 0], &argmax[plane, 0, 0], x.shape[1], x.shape[2],
                            out.shape[1], out.shape[2], pool_size, stride)


def _max_pool_backward_fill(const floating[:, ::1] grad_out, const int[:, ::1] argmax, floating[:, ::1] dx):
    cdef Py_ssize_t plane, k
    with nogil:
        for plane in range(dx.shape[0]):
            memset(&dx[plane, 0], 0, dx.shape[1] * sizeof(floating))
            for k in range(grad_out.shape[1]):
                dx[plane, argmax[plane, k]] += grad_out[plane, k]   # '+=': overlapping windows share pixels


def max_pool_forward_into(x, out, argmax, int pool_size, int stride):
    """Max pooling of x (N, C, H, W) written into the C-contiguous arrays out (N, C, H', W') and argmax
    (the same shape, int32; e.g. a slice of the batch).

    argmax holds, for each window, the flat index y * W + x within its (H, W) plane of
    the window's first maximum in row-major order (PyTorch's choice).
    """
    N, C, H, W = x.shape
    out_h, out_w = _output_size(H, pool_size, 0, stride), _output_size(W, pool_size, 0, stride)
    _check_pool_arrays(out, argmax, (N, C, out_h, out_w), x.dtype)
    _max_pool_fill(np.ascontiguousarray(x).reshape(N * C, H, W), out.reshape(N * C, out_h, out_w),
                   argmax.reshape(N * C, out_h, out_w), pool_size, stride,
                   )


def max_pool_backward_into(grad_out, argmax, dx):
    """Routes each window's gradient (N, C, H', W') to its maximum, written into (overwriting) the
    C-contiguous (N, C, H, W) array dx."""
    grad_out = np.ascontiguousarray(grad_out)
    N, C, out_h, out_w = grad_out.shape
    if argmax.shape != grad_out.shape or argmax.dtype != np.int32:
        raise ValueError(f"argmax must be int32 of shape {grad_out.shape}, got {argmax.dtype} {argmax.shape}")
    if dx.ndim != 4 or dx.shape[:2] != (N, C) or dx.dtype != grad_out.dtype or not dx.flags.c_contiguous:
        raise ValueError(f"dx must be a C-contiguous {grad_out.dtype} array of shape ({N}, {C}, H, W), "
                         f"got {dx.dtype} {dx.shape}")
    _max_pool_backward_fill(grad_out.reshape(N * C, out_h * out_w), np.ascontiguousarray(argmax).reshape(N * C, -1),
                            dx.reshape(N * C, -1), )


def _check_pool_arrays(out, argmax, shape, dtype):
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}, got {out.dtype} {out.shape}")
    if argmax.shape != shape or argmax.dtype != np.int32 or not argmax.flags.c_contiguous:
        raise ValueError(f"argmax must be a C-contiguous int32 array of shape {shape}, "
                         f"got {argmax.dtype} {argmax.shape}")
