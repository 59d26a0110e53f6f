# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fast im2col / col2im for the Convolution layer and max pooling for MaxPooling (float32 and float64).

Column layout (shared with the NumPy reference in im2col.py):

    cols[(c * field_height + i) * field_width + j, (n * out_h + y) * out_w + x]
        = x_padded[n, c, y * stride + i, x * stride + j]

Rows run over (channel, kernel row, kernel column), which is the order of the
course's weight matrix (num_filters, C*k*k).  Columns run over (image, output
row, output column) with the image slowest, so each image owns one contiguous
block of every row: the batch can be split between threads with no two threads
touching the same cache line, and col2im needs no atomics.
Padding is handled by index arithmetic; no padded copy of x is made.

The kernels release the GIL, so fast_layers.py runs them on its own threads,
one part of the batch each.

The max-pooling kernels keep, per window, the index y * W + x of its maximum
within the (H, W) plane; backward adds each window's gradient there.
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


cdef void _im2col_image(const floating[:, :, :, ::1] x, floating[:, :] cols, Py_ssize_t n,
                        int field_height, int field_width, int padding, int stride,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t c, i, j, y, xo, yi, lo, hi
    cdef floating *dst
    cdef const floating *src
    for c in range(C):
        for i in range(field_height):
            for j in range(field_width):
                # Output columns lo..hi-1 read inside the image; the rest read the zero padding.
                _valid_range(W, j - padding, stride, out_w, &lo, &hi)
                for y in range(out_h):
                    dst = &cols[(c * field_height + i) * field_width + j, (n * out_h + y) * out_w]
                    yi = y * stride + i - padding
                    if yi < 0 or yi >= H:
                        memset(dst, 0, out_w * sizeof(floating))
                        continue
                    src = &x[n, c, yi, 0]   # column xo reads src[xo * stride + j - padding]
                    memset(dst, 0, lo * sizeof(floating))
                    if stride == 1:
                        memcpy(dst + lo, src + lo + j - padding, (hi - lo) * sizeof(floating))
                    else:
                        for xo in range(lo, hi):
                            dst[xo] = src[xo * stride + j - padding]
                    memset(dst + hi, 0, (out_w - hi) * sizeof(floating))


cdef void _im2col_image_same(const floating[:, :, :, ::1] x, floating[:, :] cols, Py_ssize_t n,
                             int field_height, int field_width, int padding) noexcept nogil:
    """_im2col_image for stride 1 and output size == input size ('SAME' padding), the lab's convolutions.

    Then kernel tap (i, j) reads the image plane shifted by (i - padding) * W + (j - padding):
    a row of cols is one long copy of the plane, plus zeros where the shift runs off the
    image. Copying whole planes instead of out_w values at a time is ~2x faster.
    """
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3], size = H * W
    cdef Py_ssize_t c, i, j, y, xo, ylo, yhi, lo, hi, first, last
    cdef floating *dst
    cdef const floating *src
    for c in range(C):
        src = &x[n, c, 0, 0]
        for i in range(field_height):
            _valid_range(H, i - padding, 1, H, &ylo, &yhi)
            for j in range(field_width):
                _valid_range(W, j - padding, 1, W, &lo, &hi)
                dst = &cols[(c * field_height + i) * field_width + j, n * size]
                if ylo >= yhi or lo >= hi:
                    memset(dst, 0, size * sizeof(floating))
                    continue
                first, last = ylo * W + lo, (yhi - 1) * W + hi   # the entries that read inside the image
                memset(dst, 0, first * sizeof(floating))
                memcpy(dst + first, src + first + (i - padding) * W + (j - padding), (last - first) * sizeof(floating))
                memset(dst + last, 0, (size - last) * sizeof(floating))
                for y in range(ylo, yhi):   # the copy ran across row ends: zero what fell off the sides
                    for xo in range(lo):
                        dst[y * W + xo] = 0
                    for xo in range(hi, W):
                        dst[y * W + xo] = 0


cdef void _col2im_image(const floating[:, :] cols, floating[:, :, :, ::1] dx, Py_ssize_t n,
                        int field_height, int field_width, int padding, int stride,
                        Py_ssize_t out_h, Py_ssize_t out_w) noexcept nogil:
    cdef Py_ssize_t C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t c, i, j, y, xo, yi, lo, hi
    cdef floating *dst
    cdef const floating *src
    memset(&dx[n, 0, 0, 0], 0, C * H * W * sizeof(floating))
    for c in range(C):
        for i in range(field_height):
            for j in range(field_width):
                _valid_range(W, j - padding, stride, out_w, &lo, &hi)
                for y in range(out_h):
                    yi = y * stride + i - padding
                    if yi < 0 or yi >= H or hi <= lo:
                        continue
                    src = &cols[(c * field_height + i) * field_width + j, (n * out_h + y) * out_w]
                    dst = &dx[n, c, yi, j - padding + lo * stride]
                    if stride == 1:
                        for xo in range(hi - lo):
                            dst[xo] += src[lo + xo]
                    else:
                        for xo in range(hi - lo):
                            dst[xo * stride] += src[lo + xo]


def _im2col_fill(const floating[:, :, :, ::1] x, floating[:, :] cols,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w):
    cdef Py_ssize_t n
    cdef bint same = stride == 1 and out_h == x.shape[2] and out_w == x.shape[3]
    with nogil:
        for n in range(x.shape[0]):
            if same:
                _im2col_image_same(x, cols, n, field_height, field_width, padding)
            else:
                _im2col_image(x, cols, n, field_height, field_width, padding, stride, out_h, out_w)


def _col2im_fill(const floating[:, :] cols, floating[:, :, :, ::1] dx,
                 int field_height, int field_width, int padding, int stride,
                 Py_ssize_t out_h, Py_ssize_t out_w):
    cdef Py_ssize_t n
    with nogil:
        for n in range(dx.shape[0]):
            _col2im_image(cols, dx, n, field_height, field_width, padding, stride, out_h, out_w)


def im2col_cython(x, int field_height, int field_width, int padding, int stride):
    """(N, C, H, W) -> cols (C*fh*fw, N*out_h*out_w), same dtype as x."""
    x = np.ascontiguousarray(x)
    _check_images(x, 'im2col')
    N, C, H, W = x.shape
    out_h = _output_size(H, field_height, padding, stride)
    out_w = _output_size(W, field_width, padding, stride)
    cols = np.empty((C * field_height * field_width, N * out_h * out_w), dtype=x.dtype)
    _im2col_fill(x, cols, field_height, field_width, padding, stride, out_h, out_w)
    return cols


def col2im_cython(cols, int N, int C, int H, int W, int field_height, int field_width,
                  int padding, int stride):
    """Adjoint of im2col: sums every column entry back onto its pixel -> (N, C, H, W)."""
    out_h = _output_size(H, field_height, padding, stride)
    out_w = _output_size(W, field_width, padding, stride)
    cols = np.ascontiguousarray(cols)
    _check_cols(cols, (C * field_height * field_width, N * out_h * out_w), 'col2im')
    dx = np.empty((N, C, H, W), dtype=cols.dtype)
    _col2im_fill(cols, dx, field_height, field_width, padding, stride, out_h, out_w)
    return dx


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


def max_pool_forward(x, int pool_size, int stride):
    """(N, C, H, W) -> out (N, C, H', W') and argmax (N, C, H', W') int32.

    argmax holds, for each window, the flat index y * W + x within its (H, W) plane of
    the window's first maximum in row-major order (PyTorch's choice).
    """
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    out_h = _output_size(H, pool_size, 0, stride)
    out_w = _output_size(W, pool_size, 0, stride)
    out = np.empty((N, C, out_h, out_w), dtype=x.dtype)
    argmax = np.empty((N, C, out_h, out_w), dtype=np.int32)
    max_pool_forward_into(x, out, argmax, pool_size, stride)
    return out, argmax


def max_pool_forward_into(x, out, argmax, int pool_size, int stride):
    """max_pool_forward written into the C-contiguous arrays out and argmax (e.g. a slice of the batch)."""
    N, C, H, W = x.shape
    out_h, out_w = _output_size(H, pool_size, 0, stride), _output_size(W, pool_size, 0, stride)
    _check_pool_arrays(out, argmax, (N, C, out_h, out_w), x.dtype)
    _max_pool_fill(np.ascontiguousarray(x).reshape(N * C, H, W), out.reshape(N * C, out_h, out_w),
                   argmax.reshape(N * C, out_h, out_w), pool_size, stride,
                   )


def max_pool_backward(grad_out, argmax, int H, int W):
    """Routes each window's gradient to its maximum: (N, C, H', W') -> (N, C, H, W)."""
    N, C = grad_out.shape[:2]
    dx = np.empty((N, C, H, W), dtype=grad_out.dtype)
    max_pool_backward_into(grad_out, argmax, dx)
    return dx


def max_pool_backward_into(grad_out, argmax, dx):
    """max_pool_backward written into (overwriting) the C-contiguous (N, C, H, W) array dx."""
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
