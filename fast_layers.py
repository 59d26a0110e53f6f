"""Fast twins of layers.py: the same classes under the same names and API, computed faster.

    import fast_layers as layers    # a drop-in replacement

Convolution, MaxPooling and FC here subclass layers.py's and replace only how they compute:
  - Convolution keeps the im2col columns in blocks of a few images, each still in the core's cache
    when the matrix product reads it, and splits the blocks between threads;
  - MaxPooling runs the Cython kernels of im2col_cython.pyx (one pass, argmax as an index);
  - FC splits its matrix products between threads;
  - the threads run with OpenBLAS single-threaded inside (the machinery is at the end of this file).
Every other layer and loss is layers.py's own. tests/test_fast_layers.py proves each twin equal to
its textbook layer.
"""
import contextvars
import ctypes
import glob
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import im2col
import layers
from im2col import col2im_into, im2col_into
from layers import (Flatten, L2Regularizer, Layer, RegularizedLoss, ReLU,  # noqa: F401 (the same API)
                    SoftmaxCrossEntropyWithLogits, variance_scaling_initializer, zero_init)


class Convolution(layers.Convolution):
    """layers.Convolution, with the im2col columns kept for backward in blocks of n images:

    x_cols: (N/n, C*k*k, n*H'*W'); x_cols[b] = im2col of images b*n .. (b+1)*n - 1.
    """
    # x_cols, the im2col columns kept for backward, is stored in blocks of a few images:
    # x_cols[b] = im2col(x[b*n:(b+1)*n]), shape (C*k*k, n*H'*W'), with n images per block.
    # A block (at most chunk_bytes, or one image) is still in the core's L2 cache when the GEMM
    # reads it after im2col wrote it, and it is contiguous: the columns of a few images inside one
    # (C*k*k, N*H'*W') matrix are 400 short pieces 39 kB apart in the lab net's conv2, and
    # im2col + GEMM ran ~1.3x slower on them. Threads take contiguous runs of blocks.
    # chunk_bytes = float('inf') gives one block, the textbook matrix. Tests check that every split agrees.
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


class MaxPooling(layers.MaxPooling):
    """layers.MaxPooling with the Cython kernels: one pass over the input, ~10x faster than NumPy's windows.

    argmax: (N, C, H', W') int32, the index y * W + x of each window's maximum in its (H, W) plane.
    Without the compiled extension it is layers.MaxPooling.
    """

    def forward(self, x):
        if im2col.kernels is None:
            return super().forward(x)
        self._check_input(x)
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0],) + self.shape[1:], dtype=self.dtype)
        self.argmax = np.empty(out.shape, dtype=np.int32)

        def forward_images(images):
            im2col.kernels.max_pool_forward_into(x[images], out[images], self.argmax[images], self.pool_size,
                                                 self.stride)
        _in_parallel(forward_images, self._parts(x))
        return out

    def backward_inputs(self, grad_out):
        if im2col.kernels is None:
            return super().backward_inputs(grad_out)
        grad_out = np.ascontiguousarray(grad_out)
        grad_x = np.empty((grad_out.shape[0],) + self.input_shape[1:], dtype=self.dtype)

        def backward_images(images):
            im2col.kernels.max_pool_backward_into(grad_out[images], self.argmax[images], grad_x[images])
        _in_parallel(backward_images, self._parts(grad_x))
        return grad_x

    def _parts(self, x):
        """Per-thread slices of the batch; pooling does ~10 operations per input pixel."""
        return _parts(x.shape[0], 10 * x.size)


class FC(layers.FC):
    """layers.FC with its products split between threads."""

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


# ----------------------------------------------------------------------------- threads
# The heavy layers split their work (the batch, or a weight matrix's rows) into
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
