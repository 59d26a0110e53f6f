"""fast_layers.py against layers.py: every fast twin computes what its textbook layer computes, on every
shape the layer tests use and on the lab's net, in float64 (1e-12 relative) and float32, for every
thread count; and the thread machinery itself. (test_layers.py checks both modules against PyTorch.)"""
import numpy as np
import pytest

import fast_layers
import layers
import nn
import train
from im2col import im2col_numpy
from test_layers import CONV_CASES, POOL_CASES


def assert_equal_layers(ours, theirs, rtol):
    """max|ours - theirs| <= rtol * max|theirs|, and the same dtype and shape."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    scale = max(np.abs(theirs).max(), 1e-300)
    assert np.abs(ours.astype(np.float64) - theirs).max() <= rtol * scale


RTOL = {np.float64: 1e-12, np.float32: 1e-5}


@pytest.fixture
def threads(monkeypatch):
    """Sets the fast layers' thread count for one test (every part split off, however small) and restores it."""
    monkeypatch.setattr(fast_layers, 'MIN_WORK_PER_THREAD', 1)
    before = fast_layers.num_threads
    yield fast_layers.set_num_threads
    fast_layers.set_num_threads(before)


def twins(make, x, rng):
    """The same layer built from both modules with the same weights: (textbook layer, fast layer)."""
    textbook, fast = make(layers, x), make(fast_layers, x)
    if textbook.has_params:
        textbook.bias[:] = rng.standard_normal(textbook.bias.shape)
        fast.weights[...], fast.bias[...] = textbook.weights, textbook.bias
    return textbook, fast


def passes(layer, x, grad_out):
    """forward, backward_inputs and (if it has parameters) both gradients of backward_params."""
    out = [layer.forward(x), layer.backward_inputs(grad_out)]
    if layer.has_params:
        (_, grad_weights), (_, grad_bias), _ = layer.backward_params(grad_out)
        out += [grad_weights, grad_bias]
    return out


LAYER_CASES = [(f'conv {case}', case[:4], lambda L, x, c=case: L.Convolution(x, c[4], c[5], 'conv', padding=c[6]))
               for case in CONV_CASES + [(50, 16, 14, 14, 32, 5, 'SAME'), (7, 3, 9, 9, 4, 3, 'SAME')]]
LAYER_CASES += [(f'pool {case}', case[:4], lambda L, x, c=case: L.MaxPooling(x, 'pool', c[4], c[5]))
                for case in POOL_CASES + [(50, 16, 28, 28, 2, 2), (1, 32, 14, 14, 2, 2)]]
LAYER_CASES += [(f'fc {shape}', shape, lambda L, x, m=m: L.FC(x, m, 'fc'))
                for shape, m in (((1, 7), 3), ((5, 31), 10), ((50, 1568), 512), ((7, 512), 10))]


@pytest.mark.parametrize('thread_count', [1, 2, 3])
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
@pytest.mark.parametrize('name, shape, make', LAYER_CASES, ids=[case[0] for case in LAYER_CASES])
def test_every_fast_layer_computes_what_its_textbook_layer_computes(name, shape, make, dtype, thread_count, threads):
    threads(thread_count)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    textbook, fast = twins(make, x, rng)
    grad_out = rng.standard_normal((shape[0],) + textbook.shape[1:]).astype(dtype)
    for ours, theirs in zip(passes(fast, x, grad_out), passes(textbook, x, grad_out)):
        assert_equal_layers(ours, theirs, RTOL[dtype])


def lab_net_step(module, x, y):
    """Logits and every gradient of one step of the lab's net built from `module`, same weights every call."""
    np.random.seed(0)
    net = train.make_net(module, batch_size=len(x), dtype=x.dtype)
    loss = module.SoftmaxCrossEntropyWithLogits()
    logits = nn.forward_pass(net, x)
    grads = nn.backward_pass(net, loss, logits, y)
    return [logits] + [g for (_, weights), (_, bias), _ in grads for g in (weights, bias)]


@pytest.mark.parametrize('batch', [1, 7, 50])
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_the_lab_net_on_fast_layers_computes_what_it_computes_on_textbook_layers(batch, dtype, threads):
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((batch, 1, 28, 28)).astype(dtype), rng.integers(0, 10, batch)
    expected = lab_net_step(layers, x, y)
    for count in (1, 2):
        threads(count)
        for ours, theirs in zip(lab_net_step(fast_layers, x, y), expected):
            assert_equal_layers(ours, theirs, RTOL[dtype])


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_every_thread_count_gives_the_same_results_every_time(threads, dtype):
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((7, 1, 28, 28)).astype(dtype), rng.integers(0, 10, 7)
    threads(1)
    reference = lab_net_step(fast_layers, x, y)
    for count in (2, 3, 7, 8):   # 8 > batch: some threads get no images
        threads(count)
        first, again = lab_net_step(fast_layers, x, y), lab_net_step(fast_layers, x, y)
        for ours, expected, repeated in zip(first, reference, again):
            np.testing.assert_array_equal(ours, repeated)   # a fixed split: deterministic
            assert_equal_layers(ours, expected, RTOL[dtype])   # only the order of the batch sums differs


def test_convolution_keeps_im2col_in_blocks_of_images(threads):
    """x_cols[b] is the im2col of images b*n .. (b+1)*n - 1, n the most images dividing N within chunk_bytes;
    every block size gives the textbook layer's results."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2, 7, 9))
    bytes_per_image = 2 * 3 * 3 * 7 * 9 * 8
    for chunk_bytes, n in ((1, 1), (2.5 * bytes_per_image, 2), (4 * bytes_per_image, 3), (float('inf'), 6)):
        threads(2)
        textbook, conv = twins(lambda L, x: L.Convolution(x, 4, 3, 'conv'), x, rng)
        conv.chunk_bytes = chunk_bytes
        grad_out = rng.standard_normal(conv.shape)
        for ours, theirs in zip(passes(conv, x, grad_out), passes(textbook, x, grad_out)):
            assert_equal_layers(ours, theirs, 1e-12)
        assert conv.x_cols.shape == (6 // n, 2 * 3 * 3, n * 7 * 9)
        for b in range(6 // n):
            np.testing.assert_array_equal(conv.x_cols[b], im2col_numpy(x[b * n:(b + 1) * n], 3, 3, 1, 1))


def test_fast_layers_is_a_drop_in_replacement():
    """`import fast_layers as layers` works: every name of layers.py's API is there, the fast ones subclasses."""
    for name in ('Convolution', 'MaxPooling', 'FC', 'ReLU', 'Flatten', 'SoftmaxCrossEntropyWithLogits',
                 'L2Regularizer', 'RegularizedLoss', 'variance_scaling_initializer', 'zero_init'):
        fast, textbook = getattr(fast_layers, name), getattr(layers, name)
        assert fast is textbook or issubclass(fast, textbook), name


# ----------------------------------------------------------------------------- the thread machinery

@pytest.mark.parametrize('size, count', [(1, 1), (5, 2), (50, 2), (50, 3), (2, 8), (0, 2)])
def test_parts_cover_the_range_once_in_order(threads, size, count):
    threads(count)
    parts = fast_layers._parts(size, work=size)
    assert len(parts) == max(1, min(count, size))
    assert [i for part in parts for i in range(size)[part]] == list(range(size))


def test_an_error_in_a_thread_reaches_the_caller_after_all_threads_finished(threads):
    threads(2)
    finished = []

    def work(part):
        if part.start > 0:
            raise RuntimeError('boom')
        finished.append(part)
    with pytest.raises(RuntimeError, match='boom'):
        fast_layers._in_parallel(work, fast_layers._parts(4, work=4))
    assert finished == [slice(0, 2)]


@pytest.mark.skipif(fast_layers._openblas is None, reason="NumPy's BLAS is not a bundled OpenBLAS")
def test_openblas_threads_are_restored_after_a_layer(threads):
    threads(2)
    fast_layers.set_blas_threads(3)
    seen = fast_layers._in_parallel(lambda part: fast_layers._openblas[1](), fast_layers._parts(2, work=2))
    assert seen == [1, 1]   # single-threaded inside
    assert fast_layers._openblas[1]() == 3
    fast_layers.set_blas_threads(1)
