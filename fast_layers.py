"""Fast twins of layers.py: the same classes under the same names and API, computed faster.

    import fast_layers as layers    # a drop-in replacement

Convolution, MaxPooling, FC and ReLU here subclass layers.py's and replace only how they compute:
  - Convolution runs direct kernels (fast_kernels.pyx, fast_kernels.hpp) instead of im2col and one
    matrix product: each image copied k times instead of k*k, no col2im, and the multiply-adds in
    vector registers;
  - MaxPooling runs the Cython kernels of im2col_cython.pyx (one pass, argmax as an index);
  - FC splits its matrix products between threads;
  - ReLU makes one pass over memory each way instead of two;
  - the heavy layers split their work between threads, with OpenBLAS single-threaded inside (the
    machinery is at the end of this file).
Without the compiled extensions each twin is its textbook layer. Every other layer and loss is
layers.py's own. tests/test_fast_layers.py proves each twin equal to its textbook layer.
"""
import contextvars
import ctypes
import glob
import os
import sys
import threading

import numpy as np

import im2col
import layers
from layers import (Flatten, L2Regularizer, Layer, RegularizedLoss,  # noqa: F401 (the same API)
                    SoftmaxCrossEntropyWithLogits, variance_scaling_initializer, zero_init)

try:
    import fast_kernels
except ImportError:
    fast_kernels = None
    if im2col.kernels is not None:   # else im2col.py has already said how to build both extensions
        print(f"warning: fast_kernels is not built, fast_layers runs the textbook convolution and ReLU; "
              f"build it with: {im2col.BUILD_COMMAND}", file=sys.stderr)


class Convolution(layers.Convolution):
    """layers.Convolution computed directly by fast_kernels, without the im2col matrix.

    x_shifted: (N, C, k, plane), kept for backward_params: each image copied k times, once per kernel
    column, as fast_kernels.hpp explains. The textbook layer copies it k*k times, into x_cols.
    Without the compiled extension it is layers.Convolution.
    """
    # Why direct kernels: with im2col, the lab net's conv2 spent 7 of its 22 ms (one thread, a busy
    # machine) on im2col and col2im, and its three products of 32 filters ran at 42-57 GFLOP/s; the
    # kernels run at 67-78 with k copies of the input instead of k*k, and no col2im.

    def forward(self, x):
        if fast_kernels is None:
            return super().forward(x)
        self._check_input(x)
        x = np.ascontiguousarray(x)
        shape = fast_kernels.shifted_shape(x.shape, self.kernel_size, self.pad, self.dtype)
        # Overwritten in place by the next forward: a fresh array of a few MB each step would cost
        # ~1 ms of page faults (the kernel zeroes every new page).
        if getattr(self, 'x_shifted', None) is None or self.x_shifted.shape != shape:
            self.x_shifted = np.empty(shape, dtype=self.dtype)
        out = np.empty((x.shape[0],) + self.shape[1:], dtype=self.dtype)

        def forward_images(images):
            fast_kernels.forward_into(x[images], self.weights, self.bias, self.kernel_size, self.pad,
                                      self.x_shifted[images], out[images])
        _in_parallel(forward_images, self._image_parts(x.shape[0]))
        return out

    def backward_inputs(self, grad_out):
        if fast_kernels is None:
            return super().backward_inputs(grad_out)
        grad_out = np.ascontiguousarray(grad_out)
        F, C, k = self.num_filters, self.C, self.kernel_size
        # dL/dx is again a convolution: of grad_out, padded with k - 1 - pad zeros, with the kernel
        # flipped in both directions and its filters and channels swapped (C filters of F channels).
        flipped = np.ascontiguousarray(self.weights.reshape(F, C, k, k)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        flipped, pad = flipped.reshape(C, F * k * k), k - 1 - self.pad
        grad_x = np.empty((grad_out.shape[0],) + self.input_shape[1:], dtype=self.dtype)

        def backward_images(images):
            # the shifted planes of one image at a time: nothing keeps them
            planes = np.empty((1,) + fast_kernels.shifted_shape(grad_out.shape, k, pad, self.dtype)[1:], self.dtype)
            fast_kernels.forward_into(grad_out[images], flipped, None, k, pad, planes, grad_x[images])
        _in_parallel(backward_images, self._image_parts(grad_out.shape[0]))
        return grad_x

    def backward_params(self, grad_out):
        if fast_kernels is None:
            return super().backward_params(grad_out)
        grad_out = np.ascontiguousarray(grad_out)
        grad_weights, grad_bias = np.empty_like(self.weights), np.empty_like(self.bias)
        # Threads take runs of weight columns (taps), the bias last; each sums over the whole batch,
        # so the split changes no result (fast_kernels.weight_grad_into).
        columns, block = self.weights.shape[1] + 1, fast_kernels.TAP_BLOCK

        def column_blocks(blocks):
            taps = slice(blocks.start * block, min(blocks.stop * block, columns))
            fast_kernels.weight_grad_into(self.x_shifted, grad_out, self.kernel_size, self.pad, taps,
                                          grad_weights, grad_bias)
        _in_parallel(column_blocks, _parts(-(-columns // block), self._work(grad_out.shape[0])))
        return [[self.weights, grad_weights], [self.bias, grad_bias], self.name]

    def _work(self, N):
        """Multiply-adds of one pass over N images."""
        return N * self.weights.size * self.shape[2] * self.shape[3]

    def _image_parts(self, N):
        return _parts(N, self._work(N))


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
    """layers.FC with its products split between threads, in blocks of a fixed size.

    Each block of outputs (forward, weight gradient) or of inputs (input gradient) is one GEMM, and
    threads take runs of whole blocks. OpenBLAS rounds differently for products of different shapes, so
    the blocks are the same for every thread count: the same calls, hence the same bits.
    """
    BLOCK = 128

    def _blocks(self, size, N):
        """Per-thread lists of the slices of range(size) in blocks of BLOCK."""
        blocks = [slice(start, min(start + self.BLOCK, size)) for start in range(0, size, self.BLOCK)]
        return [blocks[run] for run in _parts(len(blocks), N * self.weights.size)]

    def forward(self, x):
        self._check_input(x)
        self.inputs = x  # kept for backward_params
        # out.T = weights @ x.T: OpenBLAS runs this orientation ~20% faster than x @ weights.T.
        out_t = np.empty((self.num_outputs, x.shape[0]), dtype=self.dtype)

        def outputs(blocks):
            for rows in blocks:
                np.matmul(self.weights[rows], x.T, out=out_t[rows])
                out_t[rows] += self.bias[rows, None]
        _in_parallel(outputs, self._blocks(self.num_outputs, x.shape[0]))
        return out_t.T

    def backward_inputs(self, grad_out):
        grad_x = np.empty((grad_out.shape[0], self.num_inputs), dtype=self.dtype)

        def inputs(blocks):
            for columns in blocks:
                np.matmul(grad_out, self.weights[:, columns], out=grad_x[:, columns])
        _in_parallel(inputs, self._blocks(self.num_inputs, grad_out.shape[0]))
        return grad_x

    def backward_params(self, grad_out):
        grad_weights = np.empty_like(self.weights)

        def outputs(blocks):
            for rows in blocks:
                np.matmul(grad_out[:, rows].T, self.inputs, out=grad_weights[rows])
        _in_parallel(outputs, self._blocks(self.num_outputs, grad_out.shape[0]))
        return [[self.weights, grad_weights], [self.bias, grad_out.sum(axis=0)], self.name]


class ReLU(layers.ReLU):
    """layers.ReLU in one pass over memory each way (fast_kernels), on one thread: the lab net's
    largest ReLU takes ~0.05 ms, about what waking a second thread costs.

    positive: x > 0 (bool, the shape of x), kept for backward. Without the extension it is layers.ReLU.
    """

    def forward(self, x):
        if fast_kernels is None:
            return super().forward(x)
        self._check_input(x)
        x = np.ascontiguousarray(x)
        out, self.positive = np.empty_like(x), np.empty(x.shape, dtype=bool)
        fast_kernels.relu_forward_into(x, out, self.positive)
        return out

    def backward_inputs(self, grad_out):
        if fast_kernels is None:
            return super().backward_inputs(grad_out)
        grad_out = np.ascontiguousarray(grad_out)
        grad_x = np.empty_like(grad_out)
        fast_kernels.relu_backward_into(grad_out, self.positive, grad_x)
        return grad_x


# ----------------------------------------------------------------------------- threads
# The heavy layers split their work (the batch, a weight matrix's rows or columns) into one fixed
# part per thread and run the parts at once in Python threads; NumPy's GEMMs and the compiled
# kernels release the GIL. While they do, OpenBLAS runs single-threaded in each thread: its own
# threads scale badly on these small GEMMs, the kernels around them would run on one core, and two
# callers of a multi-threaded OpenBLAS queue for its one thread pool. A busy neighbour takes much of
# the gain back: a region waits for its slowest part.
# The parts are fixed, so results do not change from run to run, and every layer gives the same bits for
# every thread count: each image, or each weight column, is one thread's whole, and FC's products are
# made in blocks of a fixed size whatever the split (FC.BLOCK).
# Nothing starts at import: the threads and OpenBLAS's controls come with the first layer that splits work.

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


class _Team:
    """`count` worker threads, each running the part of a parallel region it is handed, then waiting
    for the next: a pair of locks per worker, no futures and no queue, so a region costs ~20 us of
    CPU where a ThreadPoolExecutor took ~45 (measured with empty parts on the 2-core machine)."""

    _STOP = object()

    def __init__(self, count):
        self._start = [threading.Lock() for _ in range(count)]    # released by the caller: go
        self._finish = [threading.Lock() for _ in range(count)]   # released by the worker: done
        for lock in self._start + self._finish:
            lock.acquire()
        self._jobs, self._results = [None] * count, [None] * count
        self._region = threading.Lock()   # one region at a time, whichever thread calls
        self._threads = [threading.Thread(target=self._serve, args=(i,), name=f'layers-{i + 1}', daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _serve(self, i):
        while True:
            self._start[i].acquire()
            if self._jobs[i] is self._STOP:
                return
            context, function, part = self._jobs[i]
            try:
                self._results[i] = (context.run(function, part), None)
            except BaseException as error:   # handed to the caller
                self._results[i] = (None, error)
            self._finish[i].release()

    def run(self, function, parts):
        """[function(part) for part in parts]: parts[1:] on the workers, parts[0] in this thread."""
        with self._region:
            workers = range(len(parts) - 1)
            for i in workers:
                # A copy of the caller's context, so np.errstate (a context variable) holds in the workers too.
                self._jobs[i] = (contextvars.copy_context(), function, parts[i + 1])
                self._start[i].release()
            try:
                first = function(parts[0])
            finally:   # never leave a thread writing into arrays after an error here
                for i in workers:
                    self._finish[i].acquire()
            results = self._results[:len(workers)]
            self._jobs[:len(workers)] = self._results[:len(workers)] = [None] * len(workers)   # free the arrays
            for _, error in results:
                if error is not None:
                    raise error
            return [first] + [result for result, _ in results]

    def shutdown(self):
        for i, thread in enumerate(self._threads):
            self._jobs[i] = self._STOP
            self._start[i].release()
            thread.join()


_NOT_LOOKED_UP = object()
_openblas = _NOT_LOOKED_UP
num_threads = min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)
_team = None  # num_threads - 1 workers, started by the first region that needs them


def _blas():
    """_find_openblas(), looked up once, on first use."""
    global _openblas
    if _openblas is _NOT_LOOKED_UP:
        _openblas = _find_openblas()
    return _openblas


def set_num_threads(threads):
    """Threads the layers use (default: the CPUs this process may run on, at most 8)."""
    global num_threads, _team
    if threads < 1:
        raise ValueError(f"need at least one thread, got {threads}")
    if _team is not None:
        _team.shutdown()
    num_threads, _team = int(threads), None


def set_blas_threads(threads):
    """Sets OpenBLAS's own thread count; False where NumPy's BLAS is not a bundled OpenBLAS."""
    if _blas() is None:
        return False
    _blas()[0](threads)
    return True


# Below this many multiply-adds a part is too small to be worth a thread's wake-up (~20 us).
MIN_WORK_PER_THREAD = 1 << 20


def _parts(size, work):
    """Fixed contiguous slices of range(size), one per thread, none of them with less than MIN_WORK_PER_THREAD."""
    count = int(max(1, min(num_threads, size, work // MIN_WORK_PER_THREAD)))
    bounds = [size * i // count for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def _in_parallel(function, parts):
    """[function(part) for part in parts], the parts in threads at once (the first in this thread).

    OpenBLAS runs single-threaded in here, whatever the layers' thread count: its worker threads never
    wake up to spin on a core the layers' threads need, and a product is computed the same way, to the
    bit, whether the layers run on one thread or on several.
    """
    blas = _blas()
    if blas is None:
        return _run(function, parts)
    blas_threads = blas[1]()
    blas[0](1)
    try:
        return _run(function, parts)
    finally:
        blas[0](blas_threads)


def _run(function, parts):
    global _team
    if len(parts) == 1:
        return [function(parts[0])]
    if _team is None:
        _team = _Team(num_threads - 1)
    return _team.run(function, parts)
