"""Hand-written layers of the lab's NumPy conv-net framework, in textbook form.

The course API: a layer's constructor takes the layer below it (or, for the
first layer, an example input array) and reads its `.shape`; every layer has

    forward(x)                -> output, keeping exactly what backward needs
    backward_inputs(grad_out) -> dL/dx
    backward_params(grad_out) -> [[weights, dL/dweights], [bias, dL/dbias], name]
    has_params                -> whether backward_params exists

Shapes are NCHW: (N, C, H, W) for images, (N, D) for vectors. The batch size N
of the example input is only an example; any N works at run time. Parameters
take the dtype of the layer below (float32 or float64), and forward() refuses
inputs of another dtype or shape with a ValueError naming the layer.

This file is the clear version. fast_layers.py holds faster twins of
Convolution, MaxPooling and FC under the same names and API, and the tests
prove that both compute the same thing.
"""
import numpy as np

from im2col import col2im_cython, im2col_cython, output_size


def variance_scaling_initializer(shape, fan_in, factor=2.0):
    """He initialisation: truncated normal (cut at 2 sigma), sigma = sqrt(factor / fan_in).

    Draws from NumPy's global RNG so that np.random.seed() fixes a whole net.
    """
    sigma = np.sqrt(factor / fan_in)
    z = np.random.standard_normal(shape)
    outside = np.abs(z) > 2
    while outside.any():
        z[outside] = np.random.standard_normal(outside.sum())
        outside = np.abs(z) > 2
    return z * sigma


def zero_init(shape, fan_in=None):
    return np.zeros(shape)


def _dtype_of(input_layer):
    dtype = np.dtype(input_layer.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"layers work in float32 or float64, got {dtype}")
    return dtype


class Layer:
    """Base class: stores the name, the input shape and dtype, and checks inputs."""
    has_params = False

    def __init__(self, input_layer, name):
        self.name = name
        self.input_shape = tuple(input_layer.shape)
        self.dtype = _dtype_of(input_layer)

    def _check_input(self, x):
        if x.shape[1:] != self.input_shape[1:] or x.dtype != self.dtype:
            raise ValueError(f"layer {self.name!r} expects {self.dtype} input of shape "
                             f"(N,) + {self.input_shape[1:]}, got {x.dtype} {x.shape}")

    def forward(self, x):
        raise NotImplementedError

    def backward_inputs(self, grad_out):
        raise NotImplementedError

    def backward_params(self, grad_out):
        raise NotImplementedError(f"layer {self.name!r} has no parameters")


class Convolution(Layer):
    """2-D convolution (cross-correlation, as in every framework), stride 1, as one matrix product.

    weights: (num_filters, C*k*k), rows ordered (channel, kernel row, kernel column)
    bias:    (num_filters,)
    forward: (N, C, H, W) -> (N, num_filters, H', W'); 'SAME' keeps H and W, 'VALID' gives H-k+1.
    """
    has_params = True

    def __init__(self, input_layer, num_filters, kernel_size, name, padding='SAME',
                 weights_initializer_fn=variance_scaling_initializer, bias_initializer_fn=zero_init):
        super().__init__(input_layer, name)
        if len(self.input_shape) != 4:
            raise ValueError(f"layer {name!r} needs a (N, C, H, W) input, got shape {self.input_shape}")
        N, C, H, W = self.input_shape
        if padding not in ('SAME', 'VALID'):
            raise ValueError(f"layer {name!r}: padding must be 'SAME' or 'VALID', got {padding!r}")
        if padding == 'SAME' and kernel_size % 2 == 0:
            raise ValueError(f"layer {name!r}: 'SAME' padding needs an odd kernel size, got {kernel_size}")
        if kernel_size < 1 or (padding == 'VALID' and kernel_size > min(H, W)):
            raise ValueError(f"layer {name!r}: a {kernel_size}x{kernel_size} kernel does not fit a {H}x{W} input")
        self.C, self.num_filters, self.kernel_size, self.padding = C, num_filters, kernel_size, padding
        self.pad = (kernel_size - 1) // 2 if padding == 'SAME' else 0
        self.stride = 1
        self.shape = (N, num_filters, output_size(H, kernel_size, self.pad, self.stride),
                      output_size(W, kernel_size, self.pad, self.stride))
        fan_in = C * kernel_size ** 2
        self.weights = np.asarray(weights_initializer_fn([num_filters, fan_in], fan_in), dtype=self.dtype)
        self.bias = np.asarray(bias_initializer_fn([num_filters]), dtype=self.dtype)

    def forward(self, x):
        self._check_input(x)
        k, (F, out_h, out_w) = self.kernel_size, self.shape[1:]
        # One column per output pixel of every image, the image fastest (the course's im2col): (C*k*k, H'*W'*N).
        self.x_cols = im2col_cython(x, k, k, self.pad, self.stride)   # kept for backward_params
        out = self.weights @ self.x_cols + self.bias[:, None]  # (F, H'*W'*N)
        return out.reshape(F, out_h, out_w, x.shape[0]).transpose(3, 0, 1, 2)

    def _grad_rows(self, grad_out):
        """dL/dout (N, F, H', W') -> (F, H'*W'*N), the layout of weights @ x_cols."""
        return grad_out.transpose(1, 2, 3, 0).reshape(self.num_filters, -1)

    def backward_inputs(self, grad_out):
        grad_cols = self.weights.T @ self._grad_rows(grad_out)  # (C*k*k, H'*W'*N)
        N, (C, H, W), k = grad_out.shape[0], self.input_shape[1:], self.kernel_size
        # col2im adds each column entry back onto the pixel im2col copied it from.
        return col2im_cython(grad_cols, N, C, H, W, k, k, self.pad, self.stride)

    def backward_params(self, grad_out):
        grad_rows = self._grad_rows(grad_out)
        grad_weights = grad_rows @ self.x_cols.T  # (F, C*k*k)
        return [[self.weights, grad_weights], [self.bias, grad_rows.sum(axis=1)], self.name]


class MaxPooling(Layer):
    """Max pooling: (N, C, H, W) -> (N, C, H', W'), H' = (H - pool_size) // stride + 1.

    The gradient flows to the first maximum of each window (row-major), as in PyTorch.
    """

    def __init__(self, input_layer, name, pool_size=2, stride=2):
        super().__init__(input_layer, name)
        if len(self.input_shape) != 4:
            raise ValueError(f"layer {name!r} needs a (N, C, H, W) input, got shape {self.input_shape}")
        N, C, H, W = self.input_shape
        if pool_size < 1 or stride < 1 or pool_size > min(H, W):
            raise ValueError(f"layer {name!r}: pool {pool_size} with stride {stride} does not fit a {H}x{W} input")
        self.pool_size, self.stride = pool_size, stride
        self.shape = (N, C, (H - pool_size) // stride + 1, (W - pool_size) // stride + 1)

    def _windows(self, x):
        """(N, C, H, W) -> a view (N, C, H', W', pool*pool): every window's pixels, row by row."""
        p, s, (out_h, out_w) = self.pool_size, self.stride, self.shape[2:]
        windows = np.lib.stride_tricks.sliding_window_view(x, (p, p), axis=(2, 3))[:, :, ::s, ::s]
        return windows[:, :, :out_h, :out_w].reshape(x.shape[:2] + (out_h, out_w, p * p))

    def forward(self, x):
        self._check_input(x)
        windows = self._windows(x)
        self.argmax = windows.argmax(axis=-1)[..., None]  # index within the window, kept for backward
        return np.take_along_axis(windows, self.argmax, axis=-1)[..., 0]

    def backward_inputs(self, grad_out):
        p, s, (N, C, out_h, out_w) = self.pool_size, self.stride, grad_out.shape
        grad_windows = np.zeros((N, C, out_h, out_w, p * p), dtype=grad_out.dtype)
        np.put_along_axis(grad_windows, self.argmax, grad_out[..., None], axis=-1)
        grad_windows = grad_windows.reshape(N, C, out_h, out_w, p, p)
        grad_x = np.zeros((N,) + self.input_shape[1:], dtype=grad_out.dtype)
        for i in range(p):  # '+=': overlapping windows (stride < pool_size) share pixels
            for j in range(p):
                grad_x[:, :, i:i + s * out_h:s, j:j + s * out_w:s] += grad_windows[..., i, j]
        return grad_x


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W)."""

    def __init__(self, input_layer, name):
        super().__init__(input_layer, name)
        self.shape = (self.input_shape[0], int(np.prod(self.input_shape[1:])))

    def forward(self, x):
        self._check_input(x)
        return x.reshape(x.shape[0], -1)

    def backward_inputs(self, grad_out):
        return grad_out.reshape((grad_out.shape[0],) + self.input_shape[1:])


class FC(Layer):
    """Fully connected: (N, D) -> (N, num_outputs), y = x @ weights.T + bias.

    weights: (num_outputs, D), bias: (num_outputs,)
    """
    has_params = True

    def __init__(self, input_layer, num_outputs, name,
                 weights_initializer_fn=variance_scaling_initializer, bias_initializer_fn=zero_init):
        super().__init__(input_layer, name)
        if len(self.input_shape) != 2:
            raise ValueError(f"layer {name!r} needs a (N, D) input (add a Flatten), got shape {self.input_shape}")
        self.num_inputs, self.num_outputs = self.input_shape[1], num_outputs
        self.shape = (self.input_shape[0], num_outputs)
        self.weights = np.asarray(weights_initializer_fn([num_outputs, self.num_inputs], self.num_inputs),
                                  dtype=self.dtype)
        self.bias = np.asarray(bias_initializer_fn([num_outputs]), dtype=self.dtype)

    def forward(self, x):
        self._check_input(x)
        self.inputs = x  # kept for backward_params
        return x @ self.weights.T + self.bias

    def backward_inputs(self, grad_out):
        return grad_out @ self.weights

    def backward_params(self, grad_out):
        return [[self.weights, grad_out.T @ self.inputs], [self.bias, grad_out.sum(axis=0)], self.name]


class ReLU(Layer):
    """max(0, x), any shape."""

    def __init__(self, input_layer, name):
        super().__init__(input_layer, name)
        self.shape = self.input_shape

    def forward(self, x):
        self._check_input(x)
        self.positive = x > 0  # kept for backward
        return np.maximum(x, 0)

    def backward_inputs(self, grad_out):
        return grad_out * self.positive


def _one_hot(y, num_classes, dtype):
    """Integer labels (N,) or one-hot (N, C) -> one-hot (N, C) in `dtype`."""
    if y.ndim == 2:
        return y.astype(dtype, copy=False)
    one_hot = np.zeros((y.shape[0], num_classes), dtype=dtype)
    one_hot[np.arange(y.shape[0]), y] = 1
    return one_hot


class SoftmaxCrossEntropyWithLogits:
    """Mean over the batch of -sum_j y_j log softmax_j(x).

    x: logits (N, C); y: one-hot (N, C) or integer labels (N,).
    log softmax is computed as x - max - log sum exp(x - max), so logits of 1e4 neither overflow nor give NaN.
    """
    has_params = False

    def forward(self, x, y):
        shifted = x - x.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -(_one_hot(y, x.shape[1], x.dtype) * log_probs).sum() / x.shape[0]

    def backward_inputs(self, x, y):
        """(softmax(x) - y) / N."""
        exp = np.exp(x - x.max(axis=1, keepdims=True))
        probs = exp / exp.sum(axis=1, keepdims=True)
        return (probs - _one_hot(y, x.shape[1], x.dtype)) / x.shape[0]


class L2Regularizer:
    """(weight_decay / 2) * sum(w**2); gradient weight_decay * w, exactly torch.optim.SGD's weight_decay."""
    has_params = True

    def __init__(self, weights, weight_decay, name):
        self.weights, self.weight_decay, self.name = weights, weight_decay, name

    def forward(self):
        return 0.5 * self.weight_decay * np.sum(self.weights ** 2)

    def backward_params(self):
        return [[self.weights, self.weight_decay * self.weights], self.name]


class RegularizedLoss:
    """data_loss(x, y) + sum of the regularizers' losses; backward_params lists the regularizers' gradients."""
    has_params = True

    def __init__(self, data_loss, regularizer_losses):
        self.data_loss, self.regularizer_losses = data_loss, list(regularizer_losses)

    def forward(self, x, y):
        return self.data_loss.forward(x, y) + self.regularization()

    def regularization(self):
        return sum(regularizer.forward() for regularizer in self.regularizer_losses)

    def backward_inputs(self, x, y):
        return self.data_loss.backward_inputs(x, y)

    def backward_params(self):
        return [regularizer.backward_params() for regularizer in self.regularizer_losses]
