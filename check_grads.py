"""Gradient check: every layer's analytic gradients against numerical ones, in float64.

Backpropagation is easy to get subtly wrong: a missing transpose or a wrong sum
still trains, just worse. So we compare each backward pass with the definition
of the derivative, a central difference:

    dL/dw_i ~ (L(w + h e_i) - L(w - h e_i)) / 2h       error O(h^2)

and report the largest relative error over all entries,

    rel_error = |a - n| / max(|a| + |n|, tiny)

where a is the analytic and n the numerical gradient; tiny only keeps 0/0 away
(both are exactly 0 for pixels a max pool ignores). Relative, because gradients
of 1e-3 and of 1e3 deserve the same scrutiny. In float64 with h = 1e-5 a correct
layer gives ~1e-7 or less; a bug gives ~1e-1 or more.

Why not train with numerical gradients, then? They cost two forward passes per
parameter: the lab net has ~0.8 million parameters, so one step would need 1.6
million forward passes. Backpropagation gets all of them exactly for the cost of
about one extra forward pass. Numerical gradients are for checking, not training.

To turn a layer's output Y into a scalar we use L = sum(Y * G) with a random G:
then dL/dY = G, exactly what backward gets from the layer above.

    python check_grads.py                    # layers.py and fast_layers.py, one line per check; exit 1 if any fails
    python check_grads.py --layers textbook  # layers.py only
"""
import sys

import numpy as np

import cli
import fast_layers
import layers as textbook_layers

LAYERS = {'textbook': textbook_layers, 'fast': fast_layers}

TOLERANCE = 1e-5
STEP = 1e-5    # h: balances the O(h^2) truncation error against float64 round-off (~1e-16 / h)
TINY = 1e-12


def relative_error(analytic, numerical):
    """The largest |a - n| / max(|a| + |n|, tiny) over all entries."""
    return float(np.max(np.abs(analytic - numerical) / np.maximum(np.abs(analytic) + np.abs(numerical), TINY)))


def numerical_gradient(f, array):
    """Central differences of the scalar f() with respect to every entry of `array`, perturbed in place."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)   # views: writing flat[i] changes array
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + STEP
        plus = f()
        flat[i] = old - STEP
        minus = f()
        flat[i] = old   # restore exactly
        flat_grad[i] = (plus - minus) / (2 * STEP)
    return grad


# ----------------------------------------------------------------------------- one function per kind of check

def check_inputs(layer, x, rng):
    """dL/dx of a layer: backward_inputs(G) against central differences of sum(forward(x) * G)."""
    grad_out = rng.standard_normal((x.shape[0],) + layer.shape[1:])
    layer.forward(x)
    analytic = layer.backward_inputs(grad_out)
    numerical = numerical_gradient(lambda: np.sum(layer.forward(x) * grad_out), x)
    return relative_error(analytic, numerical)


def check_params(layer, x, rng):
    """dL/dweights and dL/dbias of a layer: backward_params(G) against central differences."""
    grad_out = rng.standard_normal((x.shape[0],) + layer.shape[1:])
    layer.forward(x)
    (weights, grad_weights), (bias, grad_bias), _ = layer.backward_params(grad_out)
    loss = lambda: np.sum(layer.forward(x) * grad_out)  # noqa: E731
    return (relative_error(grad_weights, numerical_gradient(loss, weights)),
            relative_error(grad_bias, numerical_gradient(loss, bias)))


def check_loss_inputs(loss, logits, labels):
    """dL/dlogits of a loss: backward_inputs against central differences of forward."""
    analytic = loss.backward_inputs(logits, labels)
    return relative_error(analytic, numerical_gradient(lambda: loss.forward(logits, labels), logits))


def away_from_kinks(rng, shape):
    """Random inputs with distinct values at least 0.01 apart and none within 0.005 of 0.

    Central differences are wrong where the function has a kink inside [x - h, x + h]:
    ReLU at 0, max pooling where two window entries (nearly) tie.
    """
    values = (np.arange(np.prod(shape)) - np.prod(shape) / 2 + 0.5) * 0.01
    return rng.permutation(values).reshape(shape)


# ----------------------------------------------------------------------------- the list of checks

def run_checks(layers, seed=42):
    """Every check of the layers of module `layers`, in order: a list of (name, max relative error)."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)   # the layers' initialisers draw from NumPy's global RNG
    results = []

    for padding, shape in (('SAME', (2, 3, 7, 6)), ('VALID', (2, 2, 6, 7))):
        x = rng.standard_normal(shape)
        conv = layers.Convolution(x, 4, 3, 'conv', padding=padding)
        conv.bias[:] = rng.standard_normal(conv.bias.shape)   # zero-initialised otherwise
        results.append((f'Convolution {padding} 3x3 inputs', check_inputs(conv, x, rng)))
        weights_error, bias_error = check_params(conv, x, rng)
        results += [(f'Convolution {padding} 3x3 weights', weights_error),
                    (f'Convolution {padding} 3x3 biases', bias_error)]

    for pool_size, stride, shape in ((2, 2, (2, 3, 6, 8)), (3, 2, (2, 2, 7, 9))):
        x = away_from_kinks(rng, shape)
        pool = layers.MaxPooling(x, 'pool', pool_size, stride)
        results.append((f'MaxPooling {pool_size}/{stride} inputs', check_inputs(pool, x, rng)))

    x = away_from_kinks(rng, (3, 2, 4, 5))
    results.append(('ReLU inputs', check_inputs(layers.ReLU(x, 'relu'), x, rng)))
    x = rng.standard_normal((3, 2, 4, 5))
    results.append(('Flatten inputs', check_inputs(layers.Flatten(x, 'flatten'), x, rng)))

    x = rng.standard_normal((4, 7))
    fc = layers.FC(x, 5, 'fc')
    fc.bias[:] = rng.standard_normal(fc.bias.shape)
    results.append(('FC inputs', check_inputs(fc, x, rng)))
    weights_error, bias_error = check_params(fc, x, rng)
    results += [('FC weights', weights_error), ('FC biases', bias_error)]

    logits, labels = rng.standard_normal((5, 10)), rng.integers(0, 10, 5)
    softmax = layers.SoftmaxCrossEntropyWithLogits()
    results.append(('SoftmaxCrossEntropyWithLogits logits', check_loss_inputs(softmax, logits, labels)))

    weights = rng.standard_normal((4, 6))
    l2 = layers.L2Regularizer(weights, 1e-2, 'l2')
    (_, analytic), _ = l2.backward_params()
    results.append(('L2Regularizer weights', relative_error(analytic, numerical_gradient(l2.forward, weights))))

    regularized = layers.RegularizedLoss(softmax, [l2, layers.L2Regularizer(rng.standard_normal(3), 0.5, 'l2b')])
    results.append(('RegularizedLoss logits', check_loss_inputs(regularized, logits, labels)))
    for (param, analytic), name in regularized.backward_params():
        numerical = numerical_gradient(lambda: regularized.forward(logits, labels), param)
        results.append((f'RegularizedLoss {name} weights', relative_error(analytic, numerical)))
    return results


def main(argv=None):
    parser = cli.ArgumentParser(description="Checks every layer's analytic gradients against central differences "
                                            f"in float64; a check passes below a relative error of {TOLERANCE:g}.")
    parser.add_argument('--seed', type=cli.seed_value, default=42, help='random seed of the inputs and weights (default: 42)')
    parser.add_argument('--layers', choices=['both', *LAYERS], default='both',
                        help='check layers.py (textbook), fast_layers.py (fast) or both (default: both)')
    args = parser.parse_args(argv)
    results = [(f'{name:8s} {check}', error) for name, module in LAYERS.items() if args.layers in ('both', name)
               for check, error in run_checks(module, args.seed)]
    width = max(len(name) for name, _ in results)
    for name, error in results:
        print(f"{name:{width}s}  max rel error {error:.2e}  {'PASS' if error < TOLERANCE else 'FAIL'}")
    failed = sum(error >= TOLERANCE for _, error in results)
    print(f"{len(results) - failed}/{len(results)} checks pass")
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    cli.run(main)
