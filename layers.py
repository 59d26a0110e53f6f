"""Hand-written layers of the lab's NumPy conv-net framework.

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

Convolution, MaxPooling and FC split their work between threads, one fixed
part each (set_num_threads; the machinery is at the end of this file).
"""
import contextvars
import ctypes
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import im2col as im2col_module
from im2col import col2im_into, im2col_into, output_size


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
    """2-D convolution (cross-correlation, as in every framework), stride 1.

    weights: (num_filters, C*k*k), rows ordered (channel, kernel row, kernel column)
    bias:    (num_filters,)
    forward: (N, C, H, W) -> (N, num_filters, H', W'); 'SAME' keeps H and W, 'VALID' gives H-k+1.
    x_cols:  what forward keeps for backward, the im2col columns of the batch in blocks of n images,
             (N/n, C*k*k, n*H'*W'); n = N (chunk_bytes = inf) is the textbook (C*k*k, N*H'*W') matrix.
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
        out_h = output_size(H, kernel_size, self.pad, self.stride)
        out_w = output_size(W, kernel_size, self.pad, self.stride)
        self.shape = (N, num_filters, out_h, out_w)
        fan_in = C * kernel_size ** 2
        self.weights = np.asarray(weights_initializer_fn([num_filters, fan_in], fan_in), dtype=self.dtype)
        self.bias = np.asarray(bias_initializer_fn([num_filters]), dtype=self.dtype)

    # x_cols, the im2col columns kept for backward, is stored in blocks of a few images:
    # x_cols[b] = im2col(x[b*n:(b+1)*n]), shape (C*k*k, n*H'*W'), with n images per block.
    # A block (at most chunk_bytes, or one image) is still in the core's L2 cache when the GEMM
    # reads it after im2col wrote it, and it is contiguous: the columns of a few images inside one
    # (C*k*k, N*H'*W') matrix are 400 short pieces 39 kB apart in the lab net's conv2, and
    # im2col + GEMM ran ~1.3x slower on them. Threads take contiguous runs of blocks.
    # chunk_bytes = float('inf') gives the textbook version, one block: x_cols[0] is the batch's
    # (C*k*k, N*H'*W') matrix, one im2col and one GEMM. Tests check that every split agrees.
    chunk_bytes = 256 << 10

    def _images_per_block(self, N):
        """The most images, dividing N, whose columns fit in chunk_bytes (at least 1)."""
        bytes_per_image = self.weights.shape[1] * self.shape[2] * self.shape[3] * self.dtype.itemsize
        most = int(max(1, min(N, self.chunk_bytes // bytes_per_image)))
        return max(n for n in range(1, most + 1) if N % n == 0)

    def _blocks(self, N):
        """Per-thread runs of blocks: a list of lists of (block index, slice of its images)."""
        n = self._images_per_block(N)
        runs = _parts(N // n, N * self.weights.size * self.shape[2] * self.shape[3])
        return [[(b, slice(b * n, (b + 1) * n)) for b in range(run.start, run.stop)] for run in runs]

    def forward(self, x):
        self._check_input(x)
        N, (F, out_h, out_w), k = x.shape[0], self.shape[1:], self.kernel_size
        n = self._images_per_block(N)
        # The next forward overwrites x_cols in place: a fresh 16 MB array each step costs
        # ~1-2 ms of page faults (the kernel zeroes every new page) in the lab net's conv2.
        shape = (N // n, self.weights.shape[1], n * out_h * out_w)
        if getattr(self, 'x_cols', None) is None or self.x_cols.shape != shape:
            self.x_cols = np.empty(shape, dtype=self.dtype)
        out = np.empty((N, F, out_h, out_w), dtype=self.dtype)

        def forward_blocks(blocks):
            for b, images in blocks:
                cols = self.x_cols[b]
                im2col_into(x[images], cols, k, k, self.pad, self.stride)
                # One GEMM per image, (F, C*k*k) @ (C*k*k, H'*W'), straight into the NCHW output:
                # no transposed copy, and as fast as one GEMM for all n images.
                out_images = out[images].reshape(n, F, out_h * out_w)
                np.matmul(self.weights, cols.reshape(-1, n, out_h * out_w).transpose(1, 0, 2), out=out_images)
                out_images += self.bias[:, None]
        _in_parallel(forward_blocks, self._blocks(N))
        return out

    def _grad_rows(self, grad_out):
        """(n, F, H', W') -> (F, n*H'*W'), the layout of weights @ x_cols[b]."""
        return grad_out.transpose(1, 0, 2, 3).reshape(self.num_filters, -1)

    def backward_inputs(self, grad_out):
        k = self.kernel_size
        grad_x = np.empty((grad_out.shape[0],) + self.input_shape[1:], dtype=self.dtype)

        def backward_blocks(blocks):
            for _, images in blocks:
                grad_cols = self.weights.T @ self._grad_rows(grad_out[images])  # (C*k*k, n*H'*W')
                col2im_into(grad_cols, grad_x[images], k, k, self.pad, self.stride)
        _in_parallel(backward_blocks, self._blocks(grad_out.shape[0]))
        return grad_x

    def backward_params(self, grad_out):
        def block_sums(blocks):   # each block's share of the gradients
            sums = []
            for b, images in blocks:
                grad_rows = self._grad_rows(grad_out[images])
                # x_cols[b] @ grad_rows.T is grad_rows @ x_cols[b].T transposed; BLAS runs this
                # orientation faster because both operands are read along their contiguous rows.
                sums.append((self.x_cols[b] @ grad_rows.T, grad_rows.sum(axis=1)))
            return sums
        # Added up block by block in block order, so the result does not depend on the thread count.
        sums = [block for run in _in_parallel(block_sums, self._blocks(grad_out.shape[0])) for block in run]
        grad_weights, grad_bias = (sum(terms[1:], terms[0]) for terms in zip(*sums))
        return [[self.weights, np.ascontiguousarray(grad_weights.T)], [self.bias, grad_bias], self.name]


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
        # Non-overlapping windows that tile the input exactly are a reshape, not a gather.
        self.tiles = pool_size == stride and H % pool_size == 0 and W % pool_size == 0

    # The Cython kernels (one pass over the input, argmax as an index into the (H, W) plane)
    # are ~10x faster than the NumPy reference below; tests check that both agree.
    use_cython = im2col_module.HAVE_CYTHON

    def forward(self, x):
        self._check_input(x)
        if not self.use_cython:
            return self._forward_numpy(x)
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0],) + self.shape[1:], dtype=self.dtype)
        self.argmax = np.empty(out.shape, dtype=np.int32)

        def forward_images(images):
            im2col_module.kernels.max_pool_forward_into(x[images], out[images], self.argmax[images],
                                                        self.pool_size, self.stride)
        _in_parallel(forward_images, self._parts(x))
        return out

    def backward_inputs(self, grad_out):
        if not self.use_cython:
            return self._backward_numpy(grad_out)
        grad_out = np.ascontiguousarray(grad_out)
        grad_x = np.empty((grad_out.shape[0],) + self.input_shape[1:], dtype=self.dtype)

        def backward_images(images):
            im2col_module.kernels.max_pool_backward_into(grad_out[images], self.argmax[images], grad_x[images])
        _in_parallel(backward_images, self._parts(grad_x))
        return grad_x

    def _parts(self, x):
        """Per-thread slices of the batch; pooling does ~10 operations per input pixel."""
        return _parts(x.shape[0], 10 * x.size)

    def _windows(self, x):
        """(N, C, H, W) -> (N, C, H', W', pool*pool)."""
        p, s = self.pool_size, self.stride
        N, C, out_h, out_w = (x.shape[0],) + self.shape[1:]
        if self.tiles:
            windows = x.reshape(N, C, out_h, p, out_w, p).transpose(0, 1, 2, 4, 3, 5)
        else:
            windows = np.lib.stride_tricks.sliding_window_view(x, (p, p), axis=(2, 3))
            windows = windows[:, :, ::s, ::s][:, :, :out_h, :out_w]
        return windows.reshape(N, C, out_h, out_w, p * p)

    def _forward_numpy(self, x):
        windows = self._windows(x)
        self.argmax = windows.argmax(axis=-1)[..., None]  # index within the window, kept for backward
        return np.take_along_axis(windows, self.argmax, axis=-1)[..., 0]

    def _backward_numpy(self, grad_out):
        p, s = self.pool_size, self.stride
        N, C, out_h, out_w = grad_out.shape
        grad_windows = np.zeros((N, C, out_h, out_w, p * p), dtype=grad_out.dtype)
        np.put_along_axis(grad_windows, self.argmax, grad_out[..., None], axis=-1)
        if self.tiles:
            grad_windows = grad_windows.reshape(N, C, out_h, out_w, p, p).transpose(0, 1, 2, 4, 3, 5)
            return grad_windows.reshape((N,) + self.input_shape[1:])
        grad_x = np.zeros((N,) + self.input_shape[1:], dtype=grad_out.dtype)
        grad_windows = grad_windows.reshape(N, C, out_h, out_w, p, p)
        for i in range(p):
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

    # Each thread computes a block of outputs (forward, weight gradient) or of inputs (input
    # gradient), so it reads only its block of the weights and every result is one GEMM, as unsplit.

    def _parts(self, size, N):
        return _parts(size, N * self.weights.size)

    def forward(self, x):
        self._check_input(x)
        self.inputs = x  # kept for backward_params
        # out.T = weights @ x.T: OpenBLAS runs this orientation ~20% faster than x @ weights.T.
        out_t = np.empty((self.num_outputs, x.shape[0]), dtype=self.dtype)

        def outputs(part):
            np.matmul(self.weights[part], x.T, out=out_t[part])
            out_t[part] += self.bias[part, None]
        _in_parallel(outputs, self._parts(self.num_outputs, x.shape[0]))
        return out_t.T

    def backward_inputs(self, grad_out):
        grad_x = np.empty((grad_out.shape[0], self.num_inputs), dtype=self.dtype)

        def inputs(part):
            np.matmul(grad_out, self.weights[:, part], out=grad_x[:, part])
        _in_parallel(inputs, self._parts(self.num_inputs, grad_out.shape[0]))
        return grad_x

    def backward_params(self, grad_out):
        grad_weights = np.empty_like(self.weights)

        def outputs(part):
            np.matmul(grad_out[:, part].T, self.inputs, out=grad_weights[part])
        _in_parallel(outputs, self._parts(self.num_outputs, grad_out.shape[0]))
        return [[self.weights, grad_weights], [self.bias, grad_out.sum(axis=0)], self.name]


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


# ----------------------------------------------------------------------------- threads
# Data parallelism: the heavy layers split their work (the batch, or a weight matrix's rows) into
# one fixed part per thread and run the parts at once in Python threads; NumPy's GEMMs and the
# Cython kernels release the GIL. While they do, OpenBLAS runs single-threaded in each thread:
# its own threads scale badly on these small GEMMs (M = 16 or 32 filters), the im2col/pooling
# kernels around them would run on one core, and two callers of a multi-threaded OpenBLAS queue
# for its one thread pool. On an idle 2-core machine two threads ran conv2 of the lab net 1.9x
# faster than one (a busy neighbour takes that back: a region waits for its slowest part).
# The parts are fixed, so results do not change from run to run, and the convolution adds its
# weight gradients block by block in block order, whatever the thread count.

def _find_openblas():
    """(set_num_threads, get_num_threads) of NumPy's bundled OpenBLAS, or None (another BLAS, e.g. Accelerate)."""
    numpy_dir = os.path.dirname(np.__file__)
    # where NumPy's wheels keep it: numpy.libs (Linux, Windows), numpy/.dylibs (macOS)
    paths = glob.glob(os.path.join(numpy_dir, os.pardir, 'numpy.libs', '*openblas*'))
    paths += glob.glob(os.path.join(numpy_dir, '.dylibs', '*openblas*'))
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (('scipy_openblas', '64_'), ('openblas', '64_'), ('openblas', '')):
            setter = getattr(library, f'{prefix}_set_num_threads{suffix}', None)
            getter = getattr(library, f'{prefix}_get_num_threads{suffix}', None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                return setter, getter
    return None


_openblas = _find_openblas()
num_threads = 1
_workers = None


def set_num_threads(threads):
    """Threads the layers use (default: the CPUs this process may run on, at most 8)."""
    global num_threads, _workers
    if threads < 1:
        raise ValueError(f"need at least one thread, got {threads}")
    if _workers is not None:
        _workers.shutdown()
    num_threads = int(threads)
    _workers = ThreadPoolExecutor(num_threads - 1, thread_name_prefix='layers') if num_threads > 1 else None


def set_blas_threads(threads):
    """Sets OpenBLAS's own thread count; False where NumPy's BLAS is not a bundled OpenBLAS."""
    if _openblas is None:
        return False
    _openblas[0](threads)
    return True


set_num_threads(min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))

# Below this many multiply-adds a part is too small to be worth a thread's wake-up (~20 us).
MIN_WORK_PER_THREAD = 1 << 20


def _parts(size, work):
    """Fixed contiguous slices of range(size), one per thread, none of them with less than MIN_WORK_PER_THREAD."""
    count = int(max(1, min(num_threads, size, work // MIN_WORK_PER_THREAD)))
    bounds = [size * i // count for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def _in_parallel(function, parts):
    """[function(part) for part in parts], the parts in threads at once (the first in this thread).

    With more than one layer thread, OpenBLAS runs single-threaded in here even for one part:
    then its worker threads never wake up, and never spin on a core the layers' threads need.
    """
    if num_threads == 1 or _openblas is None:
        return _run(function, parts)
    blas_threads = _openblas[1]()
    _openblas[0](1)
    try:
        return _run(function, parts)
    finally:
        _openblas[0](blas_threads)


def _run(function, parts):
    # Each part runs in a copy of the caller's context, so np.errstate (a context variable) holds in the workers too.
    futures = [_workers.submit(contextvars.copy_context().run, function, part) for part in parts[1:]]
    try:
        first = function(parts[0])
    finally:   # never leave a thread writing into arrays after an error here
        others = [future.result() for future in futures]
    return [first] + others
