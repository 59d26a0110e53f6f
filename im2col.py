"""im2col / col2im: the clear NumPy reference, and the compiled ones from im2col_cython.pyx.

Layout, the course's: cols has one row per (channel, kernel row, kernel column) and one
column per (output row, output column, image), the image fastest, so weights @ cols
reshapes to (num_filters, out_h, out_w, N).

    cols = im2col_cython(x, fh, fw, padding, stride)               # (N, C, H, W) -> (C*fh*fw, N*out_h*out_w)
    dx = col2im_cython(cols, N, C, H, W, fh, fw, padding, stride)  # back to (N, C, H, W)

col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>.

Where the extension is not built yet, the names im2col_cython and col2im_cython
stand for the NumPy versions below (slower, same results), with a warning.
"""
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BUILD_COMMAND = "python setup_cython.py build_ext --inplace"


def output_size(size, field, padding, stride):
    """Spatial output size of a field sliding over `size` pixels."""
    if field <= 0 or stride <= 0 or padding < 0:
        raise ValueError(f"field ({field}) and stride ({stride}) must be positive, padding ({padding}) >= 0")
    if size + 2 * padding < field:
        raise ValueError(f"a {field}-wide field does not fit in {size} pixels with padding {padding}")
    return (size + 2 * padding - field) // stride + 1


def im2col_numpy(x, field_height, field_width, padding, stride):
    """Reference im2col with stride tricks: (N, C, H, W) -> (C*fh*fw, out_h*out_w*N)."""
    N, C, H, W = x.shape
    out_h = output_size(H, field_height, padding, stride)
    out_w = output_size(W, field_width, padding, stride)
    x_padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    # windows[n, c, y, x, i, j] = x_padded[n, c, y*stride + i, x*stride + j]
    windows = sliding_window_view(x_padded, (field_height, field_width), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride][:, :, :out_h, :out_w]
    return windows.transpose(1, 4, 5, 2, 3, 0).reshape(C * field_height * field_width, out_h * out_w * N)


def col2im_numpy(cols, N, C, H, W, field_height, field_width, padding, stride):
    """Reference col2im: scatter-add every column entry back onto its pixel."""
    out_h = output_size(H, field_height, padding, stride)
    out_w = output_size(W, field_width, padding, stride)
    cols = cols.reshape(C, field_height, field_width, out_h, out_w, N)
    dx_padded = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=cols.dtype)
    for i in range(field_height):
        for j in range(field_width):
            dx_padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += \
                cols[:, i, j].transpose(3, 0, 1, 2)
    return dx_padded[:, :, padding:padding + H, padding:padding + W]


try:
    import im2col_cython as kernels   # also holds the max-pooling kernels of fast_layers.MaxPooling
    from im2col_cython import col2im_cython, im2col_cython
except ImportError:
    print(f"warning: im2col_cython is not built, using the slow NumPy im2col; build it with: {BUILD_COMMAND}",
          file=sys.stderr)
    kernels = None
    im2col_cython, col2im_cython = im2col_numpy, col2im_numpy
