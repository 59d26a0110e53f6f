"""fast_layers.py against layers.py: every fast twin computes what its textbook layer computes, on every
shape the layer tests use and on the lab's net, in float64 (1e-12 relative) and float32, for every
thread count; the kernels of fast_kernels.pyx against NumPy references; and the thread machinery.
(test_layers.py checks both modules against PyTorch.)"""
import numpy as np
import pytest

import fast_layers
import layers
import nn
import train
from test_layers import CONV_CASES, POOL_CASES

try:
    import fast_kernels
except ImportError:   # the fast layers then run their textbook twins' code; only the kernels' own tests skip
    fast_kernels = None
needs_kernels = pytest.mark.skipif(fast_kernels is None, reason='the extension is not built (python '
                                                                 'setup_cython.py build_ext --inplace)')


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
LAYER_CASES += [(f'relu {shape}', shape, lambda L, x: L.ReLU(x, 'relu'))
                for shape in ((1, 3, 4, 5), (7, 16, 14, 14), (50, 512))]


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
@pytest.mark.parametrize('batch', [1, 7, 50])
def test_every_thread_count_gives_the_same_bits(threads, dtype, batch):
    """The lab's net: logits and every gradient, bit for bit, on 1, 2, 3, 7 and 8 threads, run after run."""
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((batch, 1, 28, 28)).astype(dtype), rng.integers(0, 10, batch)
    threads(1)
    reference = lab_net_step(fast_layers, x, y)
    for count in (2, 3, 7, 8):   # 8 > batch 7: some threads get no images
        threads(count)
        for ours, expected in zip(lab_net_step(fast_layers, x, y), reference):
            np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_a_convolution_gives_the_same_bits_for_every_thread_count(threads, dtype):
    """The images (forward, input gradient) or weight columns (weight gradient) go to threads whole, so
    unlike the FC layers' products, not even the rounding depends on the split."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 16, 14, 14)).astype(dtype)
    grad_out = rng.standard_normal((7, 32, 14, 14)).astype(dtype)
    results = []
    for count in (1, 2, 3, 8):
        threads(count)
        np.random.seed(0)
        results.append(passes(fast_layers.Convolution(x, 32, 5, 'conv'), x, grad_out))
    for other in results[1:]:
        for ours, expected in zip(other, results[0]):
            np.testing.assert_array_equal(ours, expected)


def shifted_planes(x, k, pad):
    """NumPy reference of the shifted planes (N, C, k, plane): x padded, shifted left by each kernel column j,
    cut to the output width and flattened row by row; the rest of a plane (its slack) zeros."""
    N, C, H, W = x.shape
    out_w = W + 2 * pad - k + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    planes = np.stack([padded[:, :, :, j:j + out_w] for j in range(k)], axis=2).reshape(N, C, k, -1)
    shape = fast_kernels.shifted_shape(x.shape, k, pad, x.dtype)
    return np.concatenate([planes, np.zeros(shape[:3] + (shape[3] - planes.shape[3],), x.dtype)], axis=3)


@needs_kernels
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
@pytest.mark.parametrize('case', CONV_CASES + [(3, 16, 14, 14, 32, 5, 'SAME')], ids=str)
def test_convolution_keeps_the_shifted_planes_of_every_image(case, dtype, threads):
    N, C, H, W, num_filters, k, padding = case
    threads(2)
    x = np.random.default_rng(2).standard_normal((N, C, H, W)).astype(dtype)
    conv = fast_layers.Convolution(x, num_filters, k, 'conv', padding=padding)
    conv.forward(x)
    np.testing.assert_array_equal(conv.x_shifted, shifted_planes(x, k, conv.pad))


@needs_kernels
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
@pytest.mark.parametrize('channels, k', [(3, 5), (1, 3)], ids=['many taps: lanes over filters',
                                                              'few taps: lanes over pixels'])
def test_the_kernels_work_on_one_image_of_planes_or_all_of_them_and_any_split_of_the_weight_columns(channels, k,
                                                                                                    dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, channels, 9, 7)).astype(dtype)
    pad, columns = k // 2, channels * k * k + 1
    weights, bias = rng.standard_normal((4, columns - 1)).astype(dtype), rng.standard_normal(4).astype(dtype)
    kept = np.empty(fast_kernels.shifted_shape(x.shape, k, pad, dtype), dtype)
    out, again = np.empty((5, 4, 9, 7), dtype), np.empty((5, 4, 9, 7), dtype)
    fast_kernels.forward_into(x, weights, bias, k, pad, kept, out)
    fast_kernels.forward_into(x, weights, bias, k, pad, np.empty((1,) + kept.shape[1:], dtype), again)
    np.testing.assert_array_equal(again, out)

    grad_out = rng.standard_normal(out.shape).astype(dtype)
    whole = np.empty_like(weights), np.empty_like(bias)
    fast_kernels.weight_grad_into(kept, grad_out, k, pad, slice(0, columns), *whole)
    block = fast_kernels.TAP_BLOCK
    for cuts in ([1], [block], [2, block + 1, columns - 1], list(range(block, columns, block)), [columns - 1]):
        split = np.full_like(weights, np.nan), np.full_like(bias, np.nan)
        for begin, end in zip([0] + cuts, cuts + [columns]):
            fast_kernels.weight_grad_into(kept, grad_out, k, pad, slice(begin, end), *split)
        np.testing.assert_array_equal(split[0], whole[0])
        np.testing.assert_array_equal(split[1], whole[1])


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
@pytest.mark.parametrize('channels, k', [(3, 5), (1, 3)], ids=['many taps: lanes over filters',
                                                              'few taps: lanes over pixels'])
def test_nan_and_inf_in_the_input_reach_the_same_outputs_and_gradients_as_in_the_textbook_layer(channels, k, dtype,
                                                                                                 threads):
    """63 pixels: with lanes over pixels the weight gradient's last vector is partial; the NaN sits in the
    very last pixel, the inf in the first row. No lane past the image may pick either up."""
    threads(2)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, channels, 7, 9)).astype(dtype)
    x[1, channels - 1, 6, 8], x[0, 0, 0, 3] = np.nan, np.inf
    textbook, fast = twins(lambda L, x: L.Convolution(x, 5, k, 'conv'), x, rng)
    grad_out = rng.standard_normal(textbook.shape).astype(dtype)
    expected, ours = passes(textbook, x, grad_out), passes(fast, x, grad_out)
    for mine, theirs in zip(ours, expected):
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs))
        finite = np.isfinite(theirs)
        assert_equal_layers(mine[finite], theirs[finite], RTOL[dtype])


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_relu_keeps_nan_and_signed_zeros_as_the_textbook_relu(dtype):
    x = np.array([[np.nan, -0.0, 0.0, -np.inf, np.inf, -1.5, 2.5, 1e-40]], dtype=dtype)
    grad_out = np.array([[1.0, np.nan, -2.0, 3.0, np.inf, -np.inf, 4.0, 5.0]], dtype=dtype)
    textbook, fast = layers.ReLU(x, 'relu'), fast_layers.ReLU(x, 'relu')
    with np.errstate(invalid='ignore'):   # inf * 0 in the textbook's backward
        for ours, theirs in zip(passes(fast, x, grad_out), passes(textbook, x, grad_out)):
            np.testing.assert_array_equal(ours, theirs)   # NaNs in the same places, and every bit else
            np.testing.assert_array_equal(np.signbit(ours), np.signbit(theirs))
    np.testing.assert_array_equal(fast.positive, textbook.positive)


@needs_kernels
def test_the_kernels_refuse_arrays_of_the_wrong_shape_or_dtype():
    x, weights = np.zeros((2, 3, 6, 6)), np.zeros((4, 27))
    shifted, out = np.zeros(fast_kernels.shifted_shape(x.shape, 3, 1, x.dtype)), np.zeros((2, 4, 6, 6))
    with pytest.raises(ValueError, match='weights'):
        fast_kernels.forward_into(x, weights[:, :26], None, 3, 1, shifted, out)
    with pytest.raises(ValueError, match='out'):
        fast_kernels.forward_into(x, weights, None, 3, 1, shifted, out[:, :3])
    with pytest.raises(ValueError, match='shifted'):
        fast_kernels.forward_into(x, weights, None, 3, 1, shifted[:1, :2], out)
    with pytest.raises(ValueError, match='shifted'):
        fast_kernels.forward_into(x, weights, None, 3, 1, shifted.astype(np.float32), out)
    with pytest.raises(ValueError, match='does not fit'):
        fast_kernels.shifted_shape((1, 1, 2, 2), 5, 0, np.float64)
    with pytest.raises(ValueError, match='taps'):
        fast_kernels.weight_grad_into(shifted, out, 3, 1, slice(0, 29), np.zeros((4, 27)), np.zeros(4))
    with pytest.raises(ValueError, match='positive'):
        fast_kernels.relu_forward_into(x, np.zeros_like(x), np.zeros(x.shape, dtype=np.int8))


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


@pytest.mark.skipif(fast_layers._blas() is None, reason="NumPy's BLAS is not a bundled OpenBLAS")
def test_openblas_threads_are_restored_after_a_layer(threads):
    threads(2)
    before = fast_layers._blas()[1]()
    fast_layers.set_blas_threads(3)
    try:
        seen = fast_layers._in_parallel(lambda part: fast_layers._blas()[1](), fast_layers._parts(2, work=2))
        assert seen == [1, 1]   # single-threaded inside
        assert fast_layers._blas()[1]() == 3
    finally:  # the textbook layers' products round by OpenBLAS's thread count: later tests compare bits
        fast_layers.set_blas_threads(before)
