"""Every layer's forward and backward passes against PyTorch autograd, the independent oracle, for the
textbook layers (layers.py) and their fast twins (fast_layers.py) alike: every test that takes the
`layers` fixture runs once with each module.

float64 must agree to 1e-10 relative; float32 to float32 round-off, and stay float32.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fast_layers
import layers as textbook_layers
import nn
import train
import train_l2reg
from conftest import torch_lab_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=[textbook_layers, fast_layers], ids=['textbook', 'fast'])
def layers(request):
    """The module the layers come from: each test runs with layers.py and with fast_layers.py."""
    return request.param


def assert_close(actual, expected, rtol=1e-10):
    """|actual - expected| <= rtol * max|expected| entrywise: relative to the array's scale."""
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-300)
    error = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


def tensor(array):
    return torch.tensor(array, dtype=torch.float64, requires_grad=True)


# ----------------------------------------------------------------------------- Convolution

CONV_CASES = [  # N, C, H, W, filters, kernel, padding
    (1, 1, 5, 5, 2, 3, 'SAME'),
    (2, 3, 7, 9, 4, 5, 'SAME'),
    (3, 2, 8, 6, 3, 3, 'VALID'),
    (1, 3, 9, 7, 2, 1, 'VALID'),
    (2, 2, 6, 5, 3, 4, 'VALID'),
    (2, 1, 28, 28, 16, 5, 'SAME'),
]


def conv_against_torch(layers, case, dtype, rng):
    N, C, H, W, num_filters, k, padding = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    conv = layers.Convolution(x, num_filters, k, 'conv', padding=padding)
    conv.bias[:] = rng.standard_normal(num_filters)
    out = conv.forward(x)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grad_x = conv.backward_inputs(grad_out)
    (weights, grad_weights), (bias, grad_bias), name = conv.backward_params(grad_out)
    assert name == 'conv' and weights is conv.weights and bias is conv.bias

    x_t, w_t, b_t = tensor(x), tensor(conv.weights.reshape(num_filters, C, k, k)), tensor(conv.bias)
    out_t = F.conv2d(x_t, w_t, b_t, padding=conv.pad)
    out_t.backward(torch.tensor(grad_out, dtype=torch.float64))
    return [(out, out_t), (grad_x, x_t.grad), (grad_weights, w_t.grad.reshape(num_filters, -1)), (grad_bias, b_t.grad)]


@pytest.mark.parametrize('case', CONV_CASES)
def test_convolution_float64_matches_torch(layers, case):
    for ours, theirs in conv_against_torch(layers, case, np.float64, np.random.default_rng(0)):
        assert_close(ours, theirs)


@pytest.mark.parametrize('case', CONV_CASES[1:3])
def test_convolution_float32_matches_torch_and_stays_float32(layers, case):
    for ours, theirs in conv_against_torch(layers, case, np.float32, np.random.default_rng(0)):
        assert ours.dtype == np.float32
        assert_close(ours, theirs, rtol=1e-5)


def test_convolution_output_shape(layers):
    x = np.zeros((2, 3, 7, 9))
    assert layers.Convolution(x, 4, 5, 'c', padding='SAME').shape == (2, 4, 7, 9)
    assert layers.Convolution(x, 4, 5, 'c', padding='VALID').shape == (2, 4, 3, 5)


# ----------------------------------------------------------------------------- MaxPooling

POOL_CASES = [  # N, C, H, W, pool, stride
    (1, 1, 4, 4, 2, 2),
    (2, 3, 8, 6, 2, 2),
    (2, 2, 7, 9, 2, 2),   # odd sizes: the last row/column is dropped
    (2, 3, 7, 9, 3, 2),   # overlapping windows
    (1, 2, 6, 6, 3, 2),
    (2, 2, 5, 7, 2, 1),
]


@pytest.mark.parametrize('case', POOL_CASES)
@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_max_pooling_matches_torch(layers, case, dtype):
    N, C, H, W, pool_size, stride = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    pool = layers.MaxPooling(x, 'pool', pool_size, stride)
    out = pool.forward(x)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grad_x = pool.backward_inputs(grad_out)
    assert out.dtype == grad_x.dtype == dtype and out.shape == (N,) + pool.shape[1:]

    x_t = tensor(x)
    out_t = F.max_pool2d(x_t, pool_size, stride)
    out_t.backward(torch.tensor(grad_out, dtype=torch.float64))
    assert_close(out, out_t, rtol=0)   # a max is a copy: exact in any dtype
    assert_close(grad_x, x_t.grad, rtol=1e-10 if dtype == np.float64 else 1e-6)


def test_max_pooling_ties_go_to_the_first_maximum_as_in_torch(layers):
    x = np.ones((1, 1, 5, 5))
    pool = layers.MaxPooling(x, 'pool', 3, 2)
    pool.forward(x)
    grad_x = pool.backward_inputs(np.ones((1, 1, 2, 2)))
    x_t = tensor(x)
    F.max_pool2d(x_t, 3, 2).sum().backward()
    assert_close(grad_x, x_t.grad, rtol=0)


def test_max_pooling_propagates_nan_as_torch(layers):
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6))
    x[0, 0, 1, 1] = x[0, 1, 4, 5] = np.nan   # not the first entry of its window
    pool = layers.MaxPooling(x, 'pool', 3, 2)
    out = pool.forward(x)
    expected = F.max_pool2d(torch.from_numpy(x), 3, 2).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(out[~np.isnan(out)], expected[~np.isnan(expected)])


# ----------------------------------------------------------------------------- ReLU, Flatten, FC

@pytest.mark.parametrize('shape', [(1, 3, 5, 5), (4, 7)])
def test_relu_matches_torch(layers, shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    relu = layers.ReLU(x, 'relu')
    out = relu.forward(x)
    grad_out = rng.standard_normal(shape)
    x_t = tensor(x)
    F.relu(x_t).backward(torch.tensor(grad_out))
    assert_close(out, F.relu(x_t))
    assert_close(relu.backward_inputs(grad_out), x_t.grad)


def test_flatten_round_trip(layers):
    x = np.random.default_rng(3).standard_normal((3, 2, 5, 7))
    flatten = layers.Flatten(x, 'flatten')
    out = flatten.forward(x)
    assert out.shape == flatten.shape == (3, 70)
    np.testing.assert_array_equal(out, torch.flatten(torch.tensor(x), 1).numpy())
    np.testing.assert_array_equal(flatten.backward_inputs(out), x)


@pytest.mark.parametrize('dtype, rtol', [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize('N, D, M', [(1, 7, 3), (5, 31, 10)])
def test_fc_matches_torch(layers, N, D, M, dtype, rtol):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, D)).astype(dtype)
    fc = layers.FC(x, M, 'fc')
    fc.bias[:] = rng.standard_normal(M)
    out = fc.forward(x)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grad_x = fc.backward_inputs(grad_out)
    (_, grad_weights), (_, grad_bias), _ = fc.backward_params(grad_out)
    x_t, w_t, b_t = tensor(x), tensor(fc.weights), tensor(fc.bias)
    out_t = F.linear(x_t, w_t, b_t)
    out_t.backward(torch.tensor(grad_out, dtype=torch.float64))
    for ours, theirs in [(out, out_t), (grad_x, x_t.grad), (grad_weights, w_t.grad), (grad_bias, b_t.grad)]:
        assert ours.dtype == dtype
        assert_close(ours, theirs, rtol)


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize('one_hot', [False, True], ids=['int labels', 'one-hot'])
@pytest.mark.parametrize('scale', [1.0, 1e4])
def test_softmax_cross_entropy_matches_torch(layers, scale, one_hot):
    rng = np.random.default_rng(5)
    logits = scale * rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, 6)
    y = np.eye(10)[labels] if one_hot else labels
    loss = layers.SoftmaxCrossEntropyWithLogits()
    value, grad = loss.forward(logits, y), loss.backward_inputs(logits, y)
    assert np.isfinite(value) and np.isfinite(grad).all()
    logits_t = tensor(logits)
    value_t = F.cross_entropy(logits_t, torch.tensor(labels))
    value_t.backward()
    assert_close(np.array(value), value_t)
    assert_close(grad, logits_t.grad)


def test_softmax_cross_entropy_float32(layers):
    rng = np.random.default_rng(6)
    logits = (1e4 * rng.standard_normal((4, 10))).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    loss = layers.SoftmaxCrossEntropyWithLogits()
    grad = loss.backward_inputs(logits, labels)
    assert grad.dtype == np.float32 and np.isfinite(grad).all()
    logits_t = tensor(logits)
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert_close(np.array(loss.forward(logits, labels), dtype=np.float64),
                 F.cross_entropy(logits_t, torch.tensor(labels)), rtol=1e-6)
    assert_close(grad, logits_t.grad, rtol=1e-6)


def test_l2_regularizer(layers):
    weights = np.random.default_rng(7).standard_normal((5, 8))
    l2 = layers.L2Regularizer(weights, 0.03, 'l2')
    (param, grad), name = l2.backward_params()
    assert param is weights and name == 'l2'
    assert l2.forward() == pytest.approx(0.015 * np.sum(weights ** 2), rel=1e-14)
    np.testing.assert_allclose(grad, 0.03 * weights, rtol=1e-15)
    w_t = tensor(weights)
    (0.03 / 2 * (w_t ** 2).sum()).backward()
    assert_close(grad, w_t.grad)


def test_regularized_loss_adds_the_penalties(layers):
    rng = np.random.default_rng(8)
    w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal(6)
    logits, labels = rng.standard_normal((5, 10)), rng.integers(0, 10, 5)
    data_loss = layers.SoftmaxCrossEntropyWithLogits()
    loss = layers.RegularizedLoss(data_loss, [layers.L2Regularizer(w1, 0.1, 'a'), layers.L2Regularizer(w2, 0.2, 'b')])
    expected = data_loss.forward(logits, labels) + 0.05 * np.sum(w1 ** 2) + 0.1 * np.sum(w2 ** 2)
    assert loss.forward(logits, labels) == pytest.approx(expected, rel=1e-14)
    np.testing.assert_array_equal(loss.backward_inputs(logits, labels), data_loss.backward_inputs(logits, labels))
    [(p1, g1), n1], [(p2, g2), n2] = loss.backward_params()
    assert (p1 is w1, p2 is w2, n1, n2) == (True, True, 'a', 'b')
    np.testing.assert_allclose(g1, 0.1 * w1, rtol=1e-15)
    np.testing.assert_allclose(g2, 0.2 * w2, rtol=1e-15)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('make', [
    lambda layers, x: layers.Convolution(x, 4, 3, 'conv1'),
    lambda layers, x: layers.MaxPooling(x, 'pool1'),
    lambda layers, x: layers.ReLU(x, 'relu1'),
    lambda layers, x: layers.Flatten(x, 'flatten1'),
])
def test_forward_rejects_a_wrong_shape_or_dtype(layers, make):
    x = np.zeros((2, 3, 8, 8))
    layer = make(layers, x)
    with pytest.raises(ValueError, match=rf"{layer.name}.*\(3, 8, 8\).*\(2, 3, 7, 8\)"):
        layer.forward(np.zeros((2, 3, 7, 8)))
    with pytest.raises(ValueError, match=rf"{layer.name}.*float32"):
        layer.forward(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_fc_rejects_a_wrong_input_size(layers):
    fc = layers.FC(np.zeros((2, 10)), 3, 'fc3')
    with pytest.raises(ValueError, match=r"fc3.*\(10,\).*\(2, 11\)"):
        fc.forward(np.zeros((2, 11)))


def test_a_batch_of_another_size_is_fine(layers):
    x = np.random.default_rng(9).standard_normal((4, 1, 6, 6))
    conv = layers.Convolution(x, 2, 3, 'conv')
    assert conv.forward(x[:1]).shape == (1, 2, 6, 6)


@pytest.mark.parametrize('make, message', [
    (lambda layers, x: layers.Convolution(x, 4, 7, 'conv', padding='VALID'), 'does not fit'),
    (lambda layers, x: layers.Convolution(x, 4, 4, 'conv', padding='SAME'), 'odd kernel'),
    (lambda layers, x: layers.Convolution(x, 4, 3, 'conv', padding='FULL'), 'padding'),
    (lambda layers, x: layers.MaxPooling(x, 'pool', pool_size=6), 'does not fit'),
    (lambda layers, x: layers.FC(x, 3, 'fc'), 'Flatten'),
    (lambda layers, x: layers.Convolution(x.astype(np.int64), 4, 3, 'conv'), 'float32 or float64'),
])
def test_construction_rejects_what_cannot_work(layers, make, message):
    with pytest.raises(ValueError, match=message):
        make(layers, np.zeros((2, 1, 5, 5)))


# ----------------------------------------------------------------------------- the whole lab net

@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
def test_lab_net_loss_and_gradients_match_torch(layers, weight_decay):
    np.random.seed(0)
    net = train.make_net(layers, batch_size=3, dtype=np.float64)
    loss = train_l2reg.regularized_loss(net, weight_decay) if weight_decay else layers.SoftmaxCrossEntropyWithLogits()
    rng = np.random.default_rng(10)
    for layer in net:
        if layer.has_params:
            layer.bias[:] = 0.1 * rng.standard_normal(layer.bias.shape)
    x, y = rng.standard_normal((3, 1, 28, 28)), rng.integers(0, 10, 3)

    logits = nn.forward_pass(net, x)
    value = loss.forward(logits, y)
    grads = nn.backward_pass(net, loss, logits, y)

    model, modules = torch_lab_net(net)
    value_t = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    for name in ('conv1', 'conv2', 'fc3'):
        value_t = value_t + weight_decay / 2 * (modules[name].weight ** 2).sum()
    value_t.backward()
    assert_close(np.array(value), value_t)

    layer_grads = [g for g in grads if len(g) == 3]
    assert [name for *_, name in layer_grads] == ['logits', 'fc3', 'conv2', 'conv1']
    for (weights, grad_weights), (bias, grad_bias), name in layer_grads:
        module = modules[name]
        expected = module.weight.grad.reshape(weights.shape)
        if weight_decay:   # the net's own gradient; the regularizer's part comes separately
            expected = expected - weight_decay * module.weight.detach().reshape(weights.shape) * (name != 'logits')
        assert_close(grad_weights, expected)
        assert_close(grad_bias, module.bias.grad)
    regularizer_grads = [g for g in grads if len(g) == 2]
    assert len(regularizer_grads) == (3 if weight_decay else 0)
    for (weights, grad), name in regularizer_grads:
        assert_close(grad, weight_decay * weights)


def test_lab_net_float32_stays_float32_and_matches_torch(layers):
    np.random.seed(1)
    net, loss = train.make_net(layers, batch_size=4, dtype=np.float32), layers.SoftmaxCrossEntropyWithLogits()
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 4)
    logits = nn.forward_pass(net, x)
    assert logits.dtype == np.float32
    grads = nn.backward_pass(net, loss, logits, y)
    model, modules = torch_lab_net(net)   # float64 oracle from the same float32 weights
    F.cross_entropy(model(torch.from_numpy(x.astype(np.float64))), torch.from_numpy(y)).backward()
    for (weights, grad_weights), (bias, grad_bias), name in grads:
        assert grad_weights.dtype == grad_bias.dtype == np.float32, name
        assert_close(grad_weights, modules[name].weight.grad.reshape(weights.shape), rtol=1e-5)
        assert_close(grad_bias, modules[name].bias.grad, rtol=1e-5)


def test_bench_layers_runs(tmp_path):
    """bench_layers.py prints figures and writes them (never asserted here: timings depend on the machine)."""
    result = subprocess.run([sys.executable, 'bench_layers.py', '--steps', '1', '--warmup', '1', '--threads', '1',
                             '--batch-size', '4', '--save-dir', str(tmp_path), '--run-name', 'bench'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ('fast float32', 'fast float64', 'textbook float32', 'torch float32', 'fast float32 / torch float32'):
        assert name in result.stdout
    saved = json.loads((tmp_path / 'bench' / 'results.json').read_text())
    assert set(saved['seconds_per_step']['1']) == {'fast float32', 'fast float64', 'textbook float32', 'torch float32'}
    assert saved['machine']['cores'] >= 1 and (tmp_path / 'bench' / 'config.json').is_file()
