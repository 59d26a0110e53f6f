# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The kernels of fast_layers.py (float32 and float64): the Python face of fast_kernels.hpp.

Direct convolution, stride 1, with no im2col matrix: each image is copied into k "shifted planes"
per channel (fast_kernels.hpp explains them), and the kernels multiply-add whole planes in vector
registers.

    shape = shifted_shape(x.shape, k, pad, x.dtype)   # (N, C, k, plane)
    forward_into(x, weights, bias, k, pad, shifted, out)                      # out = conv(x) + bias
    weight_grad_into(shifted, grad_out, k, pad, taps, grad_weights, grad_bias)

Weights are the course's (F, C*k*k) matrix. forward_into is also the input gradient: the same sum
over grad_out with the kernel flipped (fast_layers.Convolution.backward_inputs). The functions
release the GIL and work on the images (forward) or the weight columns (gradient) they are given,
so fast_layers.py runs them on several threads at once.

ReLU in one pass each way: relu_forward_into(x, out, positive), relu_backward_into(grad_out, positive, grad_x).
"""
import numpy as np

from cython cimport floating

cdef extern from "fast_kernels.hpp" namespace "kernels" nogil:
    const int GRAD_TAPS
    Py_ssize_t plane_length[T](int H, int W, int k, int pad)
    void forward[T](const T *x, Py_ssize_t n, int C, int H, int W, int k, int pad, const T *weights, const T *bias,
                    int F, T *shifted, bint keep_shifted, T *out)
    void weight_grad[T](const T *shifted, const T *grad_out, Py_ssize_t n, int C, int H, int W, int k, int pad, int F,
                        int tap_begin, int tap_end, T *grad_weights, T *grad_bias)
    bint has_avx2()
    void relu_forward[T](const T *x, Py_ssize_t n, T *out, unsigned char *positive)
    void relu_backward[T](const T *grad_out, const unsigned char *positive, Py_ssize_t n, T *grad_x)

# The weight gradient runs its taps (weight columns) in blocks of this many: a split between threads
# at multiples of it computes no more than the whole.
TAP_BLOCK = GRAD_TAPS
# Whether the AVX2 + FMA build of the convolution kernels runs on this CPU (else their plain build).
AVX2 = has_avx2()


def shifted_shape(images_shape, int k, int pad, dtype):
    """(N, C, k, plane): the shifted planes of N images (N, C, H, W) for a k x k kernel and `pad` zeros around."""
    N, C, H, W = images_shape
    _output_size(H, W, k, pad)
    plane = plane_length[float](H, W, k, pad) if np.dtype(dtype) == np.float32 else plane_length[double](H, W, k, pad)
    return (N, C, k, plane)


def forward_into(x, weights, bias, int k, int pad, shifted, out):
    """out (N, F, H', W') = the convolution of x (N, C, H, W) with weights (F, C*k*k), plus bias (F) (or None).

    shifted receives the shifted planes: of every image if it has shifted_shape(x.shape, ...), else
    of one image at a time if it has room for one, (1, C, k, plane).
    """
    N, C, H, W = x.shape
    F = weights.shape[0]
    expected = shifted_shape(x.shape, k, pad, x.dtype)
    _check(weights, (F, C * k * k), x.dtype, 'weights')
    if bias is not None:
        _check(bias, (F,), x.dtype, 'bias')
    _check(out, (N, F) + _output_size(H, W, k, pad), x.dtype, 'out')
    keep = shifted.shape == expected
    _check(shifted, expected if keep else (1,) + expected[1:], x.dtype, 'shifted')
    if N > 0:
        _forward(x, weights, bias, k, pad, shifted, keep, out)


def _forward(const floating[:, :, :, ::1] x, const floating[:, ::1] weights, const floating[::1] bias,
             int k, int pad, floating[:, :, :, ::1] shifted, bint keep, floating[:, :, :, ::1] out):
    cdef const floating *bias_data = NULL
    if bias is not None:
        bias_data = &bias[0]
    with nogil:
        forward(&x[0, 0, 0, 0], x.shape[0], x.shape[1], x.shape[2], x.shape[3], k, pad, &weights[0, 0], bias_data,
                weights.shape[0], &shifted[0, 0, 0, 0], keep, &out[0, 0, 0, 0])


def weight_grad_into(shifted, grad_out, int k, int pad, taps, grad_weights, grad_bias):
    """The gradients of the weights (F, C*k*k) and bias (F) for grad_out (N, F, H', W') and the shifted
    planes forward_into kept, summed over the N images.

    Only the columns taps = slice(begin, end) of the C*k*k + 1 (the last one: the bias) are written.
    Every entry is summed in the same order whichever slice computes it, so splitting the columns
    between threads does not change a bit of the result.
    """
    N, F, OH, OW = grad_out.shape
    C = shifted.shape[1]
    H, W = OH + k - 1 - 2 * pad, OW + k - 1 - 2 * pad   # stride 1
    _check(shifted, shifted_shape((N, C, H, W), k, pad, grad_out.dtype), grad_out.dtype, 'shifted')
    _check(grad_weights, (F, C * k * k), grad_out.dtype, 'grad_weights')
    _check(grad_bias, (F,), grad_out.dtype, 'grad_bias')
    if not 0 <= taps.start <= taps.stop <= C * k * k + 1:
        raise ValueError(f"taps must be a slice of range({C * k * k + 1}), got {taps}")
    if taps.start < taps.stop:
        _weight_grad(shifted, grad_out, k, pad, taps.start, taps.stop, grad_weights, grad_bias)


def _weight_grad(const floating[:, :, :, ::1] shifted, const floating[:, :, :, ::1] grad_out, int k, int pad,
                 int begin, int end, floating[:, ::1] grad_weights, floating[::1] grad_bias):
    cdef int H = grad_out.shape[2] + k - 1 - 2 * pad, W = grad_out.shape[3] + k - 1 - 2 * pad
    with nogil:
        weight_grad(&shifted[0, 0, 0, 0], &grad_out[0, 0, 0, 0], shifted.shape[0], shifted.shape[1], H, W, k, pad,
                    grad_out.shape[1], begin, end, &grad_weights[0, 0], &grad_bias[0])


def relu_forward_into(x, out, positive):
    """out = np.maximum(x, 0) and positive = x > 0 (bool), in one pass; all of the same shape, C-contiguous."""
    _check(out, x.shape, x.dtype, 'out')
    _check(positive, x.shape, np.bool_, 'positive')
    _relu_forward(x.reshape(-1), out.reshape(-1), positive.reshape(-1).view(np.uint8))


def _relu_forward(const floating[::1] x, floating[::1] out, unsigned char[::1] positive):
    with nogil:
        relu_forward(&x[0], x.shape[0], &out[0], &positive[0])


def relu_backward_into(grad_out, positive, grad_x):
    """grad_x = grad_out * positive, in one pass; all of the same shape, C-contiguous."""
    _check(grad_x, grad_out.shape, grad_out.dtype, 'grad_x')
    _check(positive, grad_out.shape, np.bool_, 'positive')
    _relu_backward(grad_out.reshape(-1), positive.reshape(-1).view(np.uint8), grad_x.reshape(-1))


def _relu_backward(const floating[::1] grad_out, const unsigned char[::1] positive, floating[::1] grad_x):
    with nogil:
        relu_backward(&grad_out[0], &positive[0], grad_out.shape[0], &grad_x[0])


def _output_size(H, W, int k, int pad):
    if k < 1 or pad < 0 or H + 2 * pad < k or W + 2 * pad < k:
        raise ValueError(f"a {k}x{k} kernel with padding {pad} does not fit a {H}x{W} image")
    return H + 2 * pad - k + 1, W + 2 * pad - k + 1


def _check(array, shape, dtype, name):
    if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {dtype} array of shape {shape}, got {array.dtype} {array.shape}")
