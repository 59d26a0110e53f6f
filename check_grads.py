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
    python check_grads.py path/to/lab2/      # a student's layers.py (the file or its folder), checked the same way
    python check_grads.py --json checks.json # also every check as JSON (lab.py's report reads it)

A student's file is loaded with student.load_layers: its top-level statements (a script that trains) are not
run. Its layers get one-hot labels, as in the course's code, and copies of every input, so that a method that
changes its argument in place does not spoil the numerical gradient; an exception in its code fails that
check only, with the exception's line.
"""
import math
import sys

import numpy as np

import cli
import fast_layers
import layers as textbook_layers
import student

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
    layer.forward(x.copy())
    analytic = array(layer.backward_inputs(grad_out.copy()), 'backward_inputs')
    numerical = numerical_gradient(lambda: np.sum(layer.forward(x.copy()) * grad_out), x)
    return relative_error(analytic, numerical)


def check_params(layer, x, rng):
    """dL/dweights and dL/dbias of a layer: backward_params(G) against central differences."""
    grad_out = rng.standard_normal((x.shape[0],) + layer.shape[1:])
    layer.forward(x.copy())
    (weights, grad_weights), (bias, grad_bias), _ = layer.backward_params(grad_out.copy())
    loss = lambda: np.sum(layer.forward(x.copy()) * grad_out)  # noqa: E731
    return (relative_error(array(grad_weights, 'backward_params'), numerical_gradient(loss, weights)),
            relative_error(array(grad_bias, 'backward_params'), numerical_gradient(loss, bias)))


def check_loss_inputs(loss, logits, labels):
    """dL/dlogits of a loss: backward_inputs (after forward, which may keep what it needs) against central
    differences of forward."""
    loss.forward(logits.copy(), labels)
    analytic = array(loss.backward_inputs(logits.copy(), labels), 'backward_inputs')
    return relative_error(analytic, numerical_gradient(lambda: scalar(loss.forward(logits.copy(), labels)), logits))


def array(value, method):
    """value as a float array; a TypeError naming the method when it returned something else (None)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{method} returned {type(value).__name__}, not an array")
    return value


def scalar(value):
    """A loss as a float; the course says scalar, and a size-1 array is taken as one."""
    value = np.asarray(value)
    if value.size != 1:
        raise TypeError(f"forward returned an array of shape {value.shape}, not a scalar")
    return float(value.reshape(()))


def away_from_kinks(rng, shape):
    """Random inputs with distinct values at least 0.01 apart and none within 0.005 of 0.

    Central differences are wrong where the function has a kink inside [x - h, x + h]:
    ReLU at 0, max pooling where two window entries (nearly) tie.
    """
    values = (np.arange(np.prod(shape)) - np.prod(shape) / 2 + 0.5) * 0.01
    return rng.permutation(values).reshape(shape)


# ----------------------------------------------------------------------------- the list of checks

def run_checks(layers, seed=42, files=()):
    """Every check of the layers of module `layers`, in order: a list of (layer, check, max relative error,
    error). error is None, or the one line of an exception the layers raised (then the relative error is inf),
    with its line in `files` (a student's layers.py) where it has one."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)   # the layers' initialisers draw from NumPy's global RNG
    results = []

    def record(layer, checks, compute):
        """Runs compute() -> one max relative error per name in `checks`, and records them."""
        try:
            errors = compute()
        except (Exception, SystemExit) as error:   # a student's sys.exit() in a method fails its check only
            where = student.where_it_failed(error, files)
            message = f"{type(error).__name__}: {student.one_line(error)}" + (f" ({where})" if where else '')
            results.extend((layer, check, math.inf, message) for check in checks)
            return
        results.extend((layer, check, float(value), None) for check, value in zip(checks, errors))

    for padding, shape in (('SAME', (2, 3, 7, 6)), ('VALID', (2, 2, 6, 7))):
        x = rng.standard_normal(shape)
        bias = rng.standard_normal(4)   # the layer's are zero-initialised, which would hide a missing bias

        def conv():
            layer = layers.Convolution(x, 4, 3, 'conv', padding=padding)
            layer.bias[:] = bias
            return layer
        record('Convolution', [f'{padding} 3x3 inputs'], lambda: [check_inputs(conv(), x, rng)])
        record('Convolution', [f'{padding} 3x3 weights', f'{padding} 3x3 biases'], lambda: check_params(conv(), x, rng))

    # Windows that do not overlap, as the course's MaxPooling asserts (test_layers.py checks overlapping ones).
    for pool_size, stride, shape in ((2, 2, (2, 3, 6, 8)), (3, 3, (2, 2, 6, 9))):
        x = away_from_kinks(rng, shape)
        record('MaxPooling', [f'{pool_size}/{stride} inputs'],
               lambda: [check_inputs(layers.MaxPooling(x, 'pool', pool_size, stride), x, rng)])

    x = away_from_kinks(rng, (3, 2, 4, 5))
    record('ReLU', ['inputs'], lambda: [check_inputs(layers.ReLU(x, 'relu'), x, rng)])
    x = rng.standard_normal((3, 2, 4, 5))
    record('Flatten', ['inputs'], lambda: [check_inputs(layers.Flatten(x, 'flatten'), x, rng)])

    x, bias = rng.standard_normal((4, 7)), rng.standard_normal(5)

    def fc():
        layer = layers.FC(x, 5, 'fc')
        layer.bias[:] = bias
        return layer
    record('FC', ['inputs'], lambda: [check_inputs(fc(), x, rng)])
    record('FC', ['weights', 'biases'], lambda: check_params(fc(), x, rng))

    logits, labels = rng.standard_normal((5, 10)), np.eye(10)[rng.integers(0, 10, 5)]   # one-hot, as the course's
    record('SoftmaxCrossEntropyWithLogits', ['logits'],
           lambda: [check_loss_inputs(layers.SoftmaxCrossEntropyWithLogits(), logits, labels)])

    weights, weights_b = rng.standard_normal((4, 6)), rng.standard_normal(3)

    def l2():
        l2 = layers.L2Regularizer(weights, 1e-2, 'l2')
        (_, analytic), _ = l2.backward_params()
        return [relative_error(array(analytic, 'backward_params'), numerical_gradient(lambda: scalar(l2.forward()),
                                                                                      weights))]
    record('L2Regularizer', ['weights'], l2)

    def regularized():
        loss = layers.RegularizedLoss(layers.SoftmaxCrossEntropyWithLogits(), [
            layers.L2Regularizer(weights, 1e-2, 'l2'), layers.L2Regularizer(weights_b, 0.5, 'l2b')])
        errors = [check_loss_inputs(loss, logits, labels)]
        for (param, analytic), name in loss.backward_params():
            numerical = numerical_gradient(lambda: scalar(loss.forward(logits.copy(), labels)), param)
            errors.append(relative_error(array(analytic, 'backward_params'), numerical))
        return errors
    record('RegularizedLoss', ['logits', 'l2 weights', 'l2b weights'], regularized)
    return results


def main(argv=None):
    parser = cli.ArgumentParser(description="Checks every layer's analytic gradients against central differences "
                                            f"in float64; a check passes below a relative error of {TOLERANCE:g}.")
    parser.add_argument('path', nargs='?', default=None,
                        help="a student's layers.py, or the folder holding it, to check instead of this project's "
                             "layers (its top-level statements are not run)")
    parser.add_argument('--seed', type=cli.seed_value, default=42,
                        help='random seed of the inputs and weights (default: 42)')
    parser.add_argument('--layers', choices=['both', *LAYERS], default='both',
                        help="check layers.py (textbook), fast_layers.py (fast) or both (default: both); "
                             "not with PATH")
    parser.add_argument('--json', metavar='FILE', default=None,
                        help='also write every check to FILE: {"tolerance", "checks": [{"module", "layer", "check", '
                             '"max_rel_error", "passed", "error"}], "passed", "total"}')
    args = parser.parse_args(argv)
    if args.path is not None:
        modules, files = {args.path: student.load_layers(args.path)}, [student.layers_file(args.path)]
    else:
        modules, files = {name: module for name, module in LAYERS.items() if args.layers in ('both', name)}, []
    checks = [{'module': name, 'layer': layer, 'check': check, 'max_rel_error': error,
               'passed': error < TOLERANCE, 'error': message}
              for name, module in modules.items()
              for layer, check, error, message in run_checks(module, args.seed, files)]
    names = [f"{check['module']:8s} {check['layer']} {check['check']}" for check in checks]
    width = max(len(name) for name in names)
    for name, check in zip(names, checks):
        verdict = 'PASS' if check['passed'] else 'FAIL' + (f"  {check['error']}" if check['error'] else '')
        print(f"{name:{width}s}  max rel error {check['max_rel_error']:.2e}  {verdict}")
    passed = sum(check['passed'] for check in checks)
    print(f"{passed}/{len(checks)} checks pass")
    if args.json:
        cli.write_json(args.json, {'tolerance': TOLERANCE, 'checks': checks, 'passed': passed, 'total': len(checks)})
    if passed < len(checks):
        sys.exit(1)


if __name__ == '__main__':
    cli.run(main)
