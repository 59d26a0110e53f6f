"""Checks a student's solution of the lab item by item against independent oracles: for students, and for TAs
grading many at once.

    python check_solution.py path/to/lab2/            # a folder: its layers.py and any .py with multiclass_hinge_loss
    python check_solution.py path/to/layers.py        # one file
    python check_solution.py path/to/lab2/ --no-train # without net.train, the one epoch on MNIST
    python check_solution.py submissions/*/ --json grades.json --markdown grades.md   # a TA's batch

Items: every method of the course's classes (Convolution.forward, ..., FC.backward_params, ...,
RegularizedLoss.backward_params), grouped by the lab's tasks; net.train (task 1 end to end: the lab's net built
from the student's layers trains one epoch on 2,000 MNIST images, batch 50, lr 0.1, beside this project's
layers on the same batches from the same initial weights); multiclass_hinge_loss (the bonus); and the file
itself when a statement of it does not parse or run. Verdicts: ok, wrong (what differs, by how much, on which
input), missing (not implemented: pass, ..., NotImplementedError, None returned), error (the exception, at the
student's file:line) and timeout.

The oracles: forward and both backward passes against PyTorch autograd in float64, on several shapes (odd
sizes, batch 1, non-square images), with random non-zero weights and biases set on the layer; the lab's
numerical gradient check (relative error < 1e-5) of backward against the student's own forward, where that
forward is right; float32 inputs; logits of scale 1e3 for the softmax (a NaN or an inf is wrong). A size-1
array where the course says scalar is accepted, and said. Conventions the lab leaves open are reported, not
failed: L2 as lambda/2 * sum(w^2) (gradient lambda*w) or lambda * sum(w^2) (gradient 2*lambda*w). The hinge loss
is CS231n's, which the lab links: the mean over the batch of sum_{j != y} max(0, s_j - s_y + delta); one off by
a constant factor or offset is wrong, and the factor is named. A method that changes its argument in place is
said to (ok otherwise); one that changes the layer's weights is wrong.

The student's code is run, never trusted: its files are loaded without their top-level statements (student.py),
and each class's checks run in a child process (student.Child) with a time limit, a memory limit and a
temporary working folder, so that a hang, os._exit, a crash or a memory bomb costs one item, and nothing is
written into the student's folder or the project. This isolates mistakes, not malice: check submissions you
do not trust in a container.

Exit status: 0 when every item of every submission is ok, 1 when some are not, 2 on bad usage.
"""
import argparse
import importlib
import inspect
import os
import sys
import time
import traceback
import zlib

import numpy as np
import torch
import torch.nn.functional as F

import cli
import data
import student

TASK1, TASK2, BONUS = 'task 1', 'task 2', 'bonus'
METHODS = {  # the course's classes, in the lab's order, and the methods a student writes or is given
    'Convolution': ('forward', 'backward_inputs', 'backward_params'),
    'MaxPooling': ('forward', 'backward_inputs'),
    'Flatten': ('forward', 'backward_inputs'),
    'FC': ('forward', 'backward_inputs', 'backward_params'),
    'ReLU': ('forward', 'backward_inputs'),
    'SoftmaxCrossEntropyWithLogits': ('forward', 'backward_inputs'),
    'L2Regularizer': ('forward', 'backward_params'),
    'RegularizedLoss': ('forward', 'backward_inputs', 'backward_params'),
}
TASK_OF_CLASS = {name: TASK2 if name in ('L2Regularizer', 'RegularizedLoss') else TASK1 for name in METHODS}
HINGE, TRAIN = 'multiclass_hinge_loss', 'net.train'

RTOL = {np.float64: 1e-9, np.float32: 1e-4}   # of the largest entry: students' algorithms differ in rounding
LAB_TOLERANCE = 1e-5   # the lab's numerical gradient check, in float64
TRAIN_IMAGES, VALID_IMAGES, BATCH_SIZE, LR = 2000, 1000, 50, 0.1
TRAIN_TOLERANCE = {'accuracy': 0.02, 'loss': 0.10}   # vs the reference: ties in max pooling may go either way
TRAIN_TIME_LIMIT = 10   # net.train may take this many times --timeout in all


class Verdict(Exception):
    """Ends a check with a verdict other than ok."""

    def __init__(self, verdict, detail):
        super().__init__(detail)
        self.verdict, self.detail = verdict, detail


def items_of(has_hinge, train):
    """[(item, task)] in the order of the lab."""
    items = [(f'{name}.{method}', TASK_OF_CLASS[name]) for name, methods in METHODS.items() for method in methods]
    if train:
        items.insert(len([item for item, task in items if task == TASK1]), (TRAIN, TASK1))
    return items + ([(HINGE, BONUS)] if has_hinge else [])


# ----------------------------------------------------------------------------- the student's code, called

class Student:
    """A student's module as the checks see it: its classes constructed and its methods called with copies
    of their arguments, and what goes wrong made a Verdict. Notes (an argument changed in place, a size-1
    array for a scalar) are kept per method."""

    def __init__(self, module, files):
        self.module, self.files, self.notes = module, files, {}
        self.failed_prerequisite = None   # why the last prerequisite call failed, to explain what fails next

    def make(self, name, *args, **kwargs):
        cls = getattr(self.module, name, None)
        if cls is None:
            raise Verdict('missing', f"{os.path.basename(self.files[0])} defines no {name}")
        if isinstance(cls, student.Unavailable):   # the class did not parse, or its definition raised
            raise Verdict('error', repr(cls)[1:-1])
        try:
            return cls(*args, **kwargs)
        except BaseException as error:   # SystemExit too
            if isinstance(error, KeyboardInterrupt):
                raise
            raise Verdict('error', f"{name}({describe_args(args)}) raised {self.exception(error)}") from None

    def call(self, obj, method, *args, prerequisite=False):
        """obj.method(*copies of args). As a prerequisite (forward before a backward check) a failure is kept,
        to explain a later one, and None is returned; otherwise it is this item's verdict."""
        name = f"{type(obj).__name__}.{method}"
        function = getattr(obj, method, None)
        if function is None:
            raise Verdict('missing', f"{name} is not defined")
        copies = [arg.copy() if isinstance(arg, np.ndarray) else arg for arg in args]
        try:
            result = function(*copies)
        except NotImplementedError as error:
            if prerequisite:
                self.failed_prerequisite = f"{name} is not implemented"
                return None
            raise Verdict('missing', f"{name} raises NotImplementedError" + (f" ({error})" if str(error) else ''))
        except BaseException as error:   # SystemExit too: sys.exit() in a method costs only its item
            if isinstance(error, KeyboardInterrupt):
                raise
            if prerequisite:
                self.failed_prerequisite = f"{name} raised {self.exception(error)}"
                return None
            raise Verdict('error', f"{name} raised {self.exception(error)}"
                          + self.prerequisite_note()) from None
        self._note_changed_arguments(obj, method, function, args, copies)
        if result is None and not prerequisite:
            raise Verdict('missing', f"{name} returns None")
        return result

    def prerequisite_note(self):
        return f"; {self.failed_prerequisite}, which it needs" if self.failed_prerequisite else ''

    def _note_changed_arguments(self, obj, method, function, args, copies):
        for i, (arg, copy) in enumerate(zip(args, copies)):
            if isinstance(arg, np.ndarray) and not np.array_equal(arg, copy, equal_nan=True):
                try:
                    names = list(inspect.signature(function).parameters)
                except (TypeError, ValueError):
                    names = []
                argument = names[i] if i < len(names) else f"#{i + 1}"
                self.notes.setdefault(f"{type(obj).__name__}.{method}", set()).add(
                    f"changes its argument {argument} in place")

    def exception(self, error):
        """'Type: message (file:line)', the line the student's (or else the innermost one)."""
        where = student.where_it_failed(error, self.files)
        frames = traceback.extract_tb(error.__traceback__)
        if not where and frames:
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
        return f"{type(error).__name__}: {student.one_line(error)}" + (f" ({where})" if where else '')


def describe_args(args):
    return ', '.join(f"array {tuple(arg.shape)}" if isinstance(arg, np.ndarray) else repr(arg) for arg in args)


def as_array(value, what, case):
    """value as a float64 array, or a wrong verdict saying what it is; Ellipsis (the starter's `...`) is missing."""
    if value is Ellipsis:
        raise Verdict('missing', f"{what} is ... (the starter's placeholder)")
    if isinstance(value, torch.Tensor):
        value = value.detach().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Verdict('wrong', f"{what} is a {type(value).__name__}, not an array ({case})") from None


def as_scalar(value, what, case, notes):
    """A loss as a float: a 0-d value, or a size-1 array (accepted, and noted); a larger array is wrong."""
    array = as_array(value, what, case)
    if array.size != 1:
        raise Verdict('wrong', f"{what} is an array of shape {array.shape}, not a scalar ({case})")
    if array.ndim:
        notes.add(f"returns an array of shape {array.shape} where the course says scalar (accepted)")
    return float(array.reshape(()))


# ----------------------------------------------------------------------------- comparing with an oracle

def compare(actual, expected, what, case, rtol, factors=None):
    """The error of `actual` against the oracle's `expected` (a float64 array): the largest difference
    relative to the largest |expected|. A Verdict('wrong', ...) if it is over rtol, with what the
    difference looks like: a NaN or an inf, a transpose, a constant factor (named from `factors`
    {value: meaning} when it is one of them)."""
    actual = as_array(actual, what, case)
    if actual.shape != expected.shape:
        transposed = actual.ndim == 2 and actual.T.shape == expected.shape \
            and np.allclose(actual.T, expected, rtol=1e-6, atol=1e-12 * np.abs(expected).max())
        raise Verdict('wrong', f"{what} has shape {actual.shape}, not {expected.shape} ({case})"
                      + (": it is the transpose of the right one" if transposed else ''))
    if not np.isfinite(actual).all():
        kind = 'NaN' if np.isnan(actual).any() else 'inf'
        raise Verdict('wrong', f"{what} is {kind} ({case})")
    scale = np.abs(expected).max() or 1.0
    error = float(np.abs(actual - expected).max() / scale)
    if error <= rtol:
        return error
    differ = int((np.abs(actual - expected) > rtol * scale).sum())
    where = f"at {differ} of {expected.size} entries, " if expected.size > 1 else ''
    raise Verdict('wrong', f"{what} differs from the oracle's {where}by up to {error:.2g} of its largest entry "
                           f"({case})" + constant_factor(actual, expected, factors or {}))


def constant_factor(actual, expected, factors):
    """': 0.5 times the right value (why)' when actual is expected times one number, else ''."""
    large = np.abs(expected) > 1e-3 * np.abs(expected).max()
    if not large.any():
        return ''
    ratios = actual[large] / expected[large]
    ratio = float(np.median(ratios))
    if ratio == 0 or np.isclose(ratio, 1) or np.abs(ratios - ratio).max() > 1e-6 * abs(ratio):
        return ''
    why = next((meaning for value, meaning in factors.items() if np.isclose(ratio, value, rtol=1e-6)), None)
    return f": {ratio:.4g} times the right value" + (f" ({why})" if why else '')


def lab_check(analytic, f, array):
    """The lab's check: the largest relative error of `analytic` against central differences of f()
    (a scalar) with respect to `array`, which it perturbs in place."""
    import check_grads   # here, in the child: it imports fast_layers, whose threads would not survive a fork
    return check_grads.relative_error(analytic, check_grads.numerical_gradient(f, array))


def tensor(array):
    return torch.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def away_from_kinks(rng, shape):
    """Distinct values 0.1 apart, none within 0.05 of 0: no ties in a pool, no ReLU at its kink."""
    size = int(np.prod(shape))
    return rng.permutation((np.arange(size) - size // 2 + 0.5) * 0.1).reshape(shape)


# ----------------------------------------------------------------------------- the layers' cases and oracles

class LayerCase:
    """One input x of a layer and the oracle's answers for it: the output, dL/dx and dL/dparams for a random
    dL/dout (grad_out), from torch autograd in float64.

    build (and options): the constructor's arguments after the example input, as the course's are;
    torch_forward(x, **params): the layer's function in torch. The float32 case feeds the layer float32
    arrays and compares it with the float64 oracle of the same (rounded) values."""

    def __init__(self, name, description, x, build, torch_forward, params=None, dtype=np.float64, options=None):
        self.name, self.description, self.build, self.torch_forward = name, description, build, torch_forward
        self.dtype, self.options = dtype, options or {}
        self.x = x.astype(dtype)
        self.params = {key: value.astype(dtype) for key, value in (params or {}).items()}
        x_t, params_t = tensor(self.x), {key: tensor(value) for key, value in self.params.items()}
        out_t = torch_forward(x_t, **params_t)
        seed = zlib.crc32(description.encode())   # the same dL/dout for a case in float64 and in float32
        self.grad_out = np.random.default_rng(seed).standard_normal(tuple(out_t.shape)).astype(dtype)
        (out_t * torch.from_numpy(self.grad_out.astype(np.float64))).sum().backward()
        self.out = out_t.detach().numpy()
        self.grad_x = x_t.grad.numpy()
        self.grad_params = {key: value.grad.numpy() for key, value in params_t.items()}

    def case(self):
        return f"{self.description}{', float32' if self.dtype == np.float32 else ''}"

    def layer(self, you):
        """The student's layer for this case, with its parameters set (the initial biases are zero and would
        hide a missing bias)."""
        layer = you.make(self.name, self.x, *self.build, **self.options)
        for key, value in self.params.items():
            setattr(layer, key, value.copy())
        return layer

    def in_float32(self):
        return LayerCase(self.name, self.description, self.x, self.build, self.torch_forward, self.params,
                         np.float32, self.options)


def layer_cases(name):
    """The cases of one of the course's layers: odd sizes, batch 1, non-square images, and one in float32."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cases = []

    def add(description, x, build, torch_forward, params=None, options=None):
        cases.append(LayerCase(name, description, x, build, torch_forward, params, options=options))

    if name == 'Convolution':
        for shape, filters, k, padding in (((2, 3, 7, 6), 4, 3, 'SAME'), ((1, 2, 6, 7), 3, 3, 'VALID'),
                                           ((3, 1, 5, 8), 2, 5, 'SAME')):
            C = shape[1]
            params = {'weights': rng.standard_normal((filters, C * k * k)) * 0.5, 'bias': rng.standard_normal(filters)}

            def conv(x, weights, bias, filters=filters, C=C, k=k, pad=(k - 1) // 2 if padding == 'SAME' else 0):
                return F.conv2d(x, weights.view(filters, C, k, k), bias, padding=pad)
            add(f"x {shape}, {filters} filters {k}x{k} {padding}", rng.standard_normal(shape), (filters, k, 'conv'),
                conv, params, {'padding': padding})
    elif name == 'MaxPooling':
        for shape, size in (((2, 3, 6, 8), 2), ((1, 2, 4, 4), 2), ((2, 1, 6, 9), 3)):
            add(f"x {shape}, pool {size}, stride {size}", away_from_kinks(rng, shape), ('pool', size, size),
                lambda x, size=size: F.max_pool2d(x, size, size))
    elif name == 'Flatten':
        for shape in ((2, 3, 4, 5), (1, 2, 3, 3)):
            add(f"x {shape}", rng.standard_normal(shape), ('flatten',), lambda x: x.reshape(x.shape[0], -1))
    elif name == 'FC':
        for (N, D), M in (((4, 7), 5), ((1, 9), 3), ((3, 6), 1)):
            params = {'weights': rng.standard_normal((M, D)), 'bias': rng.standard_normal(M)}
            add(f"x {(N, D)}, {M} outputs", rng.standard_normal((N, D)), (M, 'fc'),
                lambda x, weights, bias: x @ weights.T + bias, params)
    elif name == 'ReLU':
        for shape in ((2, 3, 4, 5), (3, 7), (1, 6)):
            add(f"x {shape}", away_from_kinks(rng, shape), ('relu',), torch.relu)
    return cases + [cases[0].in_float32()]


def unchanged_parameters(layer, case, method):
    """Wrong if `method` changed the layer's weights or bias: SGD owns them."""
    for key, value in case.params.items():
        current = getattr(layer, key, None)
        if isinstance(current, np.ndarray) and current.shape == value.shape and not np.array_equal(current, value):
            raise Verdict('wrong', f"{case.name}.{method} changes layer.{key} ({case.case()})")


def check_layer_forward(you, name):
    for case in layer_cases(name):
        layer = case.layer(you)
        out = you.call(layer, 'forward', case.x)
        compare(out, case.out, f"{name}.forward's output", case.case(), RTOL[case.dtype])
        unchanged_parameters(layer, case, 'forward')


def forward_is_right(you, layer, case):
    """Whether the student's forward gives the oracle's output on this case (then the lab's check applies)."""
    out = you.call(layer, 'forward', case.x, prerequisite=True)
    try:
        compare(out, case.out, 'forward', case.case(), RTOL[case.dtype])
    except Verdict:
        return False
    return True


def check_layer_backward_inputs(you, name):
    for i, case in enumerate(layer_cases(name)):
        layer = case.layer(you)
        right_forward = forward_is_right(you, layer, case)
        grad_x = you.call(layer, 'backward_inputs', case.grad_out)
        compare(grad_x, case.grad_x, f"{name}.backward_inputs", case.case(), RTOL[case.dtype])
        unchanged_parameters(layer, case, 'backward_inputs')
        if i == 0 and right_forward:
            x = case.x.copy()
            error = lab_check(as_array(grad_x, 'backward_inputs', case.case()),
                              lambda: float(np.sum(np.asarray(you.call(layer, 'forward', x), dtype=np.float64)
                                                   * case.grad_out)), x)
            if error >= LAB_TOLERANCE:
                raise Verdict('wrong', f"the lab's numerical check of {name}.backward_inputs against forward: "
                                       f"relative error {error:.1e} ({case.case()})")


def check_layer_backward_params(you, name):
    for i, case in enumerate(layer_cases(name)):
        layer = case.layer(you)
        right_forward = forward_is_right(you, layer, case)
        grads = you.call(layer, 'backward_params', case.grad_out)
        pairs = parameter_pairs(grads, layer, ('weights', 'bias'), f"{name}.backward_params", case.case())
        for key, (param, grad) in zip(('weights', 'bias'), pairs):
            compare(grad, case.grad_params[key], f"the gradient of {key}", case.case(), RTOL[case.dtype],
                    factors={1 / case.x.shape[0]: '1/N: averaged over the batch instead of summed'})
        unchanged_parameters(layer, case, 'backward_params')
        if i == 0 and right_forward:
            for key, (param, grad) in zip(('weights', 'bias'), pairs):
                error = lab_check(as_array(grad, 'gradient', case.case()),
                                  lambda: float(np.sum(np.asarray(you.call(layer, 'forward', case.x), dtype=np.float64)
                                                       * case.grad_out)), param)
                if error >= LAB_TOLERANCE:
                    raise Verdict('wrong', f"the lab's numerical check of the gradient of {key} against forward: "
                                           f"relative error {error:.1e} ({case.case()})")


def parameter_pairs(grads, owner, keys, what, case):
    """The [param, grad] pairs of a course gradient list [[w, dw], [b, db], name]: each param must be the
    owner's own array (SGD updates it in place) and each grad of its shape."""
    if not isinstance(grads, (list, tuple)) or len(grads) != len(keys) + 1:
        length = f" of length {len(grads)}" if isinstance(grads, (list, tuple)) else ''
        raise Verdict('wrong', f"{what} returns a {type(grads).__name__}{length}, not "
                               f"[{', '.join(f'[{key}, d{key}]' for key in keys)}, name] ({case})")
    pairs = []
    for key, pair in zip(keys, grads[:-1]):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise Verdict('wrong', f"{what}: the entry for {key} is not a [{key}, gradient] pair ({case})")
        param, grad = pair
        if grad is Ellipsis or grad is None:
            raise Verdict('missing', f"{what}: the gradient of {key} is {'...' if grad is Ellipsis else 'None'}")
        if param is not getattr(owner, key):
            raise Verdict('wrong', f"{what}: the array paired with the gradient of {key} is not the layer's {key} "
                                   f"itself, so SGD would update a copy ({case})")
        pairs.append((param, grad))
    return pairs


# ----------------------------------------------------------------------------- the losses

SOFTMAX_HINT = ("exp overflowed or a softmax underflowed to 0 before its log: compute log softmax as "
                "x - max - log(sum(exp(x - max)))")


def softmax_cases():
    """(description, logits, one-hot labels, dtype): unit scale, batch 1, logits of scale 1e3, float32."""
    rng = np.random.default_rng(7)
    cases = []
    for description, shape, scale, dtype in (('logits (5, 10)', (5, 10), 1, np.float64),
                                             ('logits (1, 10), batch 1', (1, 10), 1, np.float64),
                                             ('logits (4, 10) of scale 1e3', (4, 10), 1e3, np.float64),
                                             ('logits (5, 10), float32', (5, 10), 1, np.float32)):
        logits = (rng.standard_normal(shape) * scale).astype(dtype)
        cases.append((description, logits, np.eye(shape[1])[rng.integers(0, shape[1], shape[0])], dtype))
    return cases


def softmax_oracle(logits, labels):
    x = tensor(logits)
    loss = F.cross_entropy(x, torch.from_numpy(labels.argmax(axis=1)))
    loss.backward()
    return loss.item(), x.grad.numpy()


def check_softmax_forward(you):
    notes = you.notes.setdefault('SoftmaxCrossEntropyWithLogits.forward', set())
    for description, logits, labels, dtype in softmax_cases():
        loss = you.make('SoftmaxCrossEntropyWithLogits')
        value = you.call(loss, 'forward', logits, labels)
        value = as_scalar(value, 'the loss', description, notes)
        expected, _ = softmax_oracle(logits, labels)
        if not np.isfinite(value):
            raise Verdict('wrong', f"the loss is {value} ({description}): {SOFTMAX_HINT}")
        compare(np.array(value), np.array(expected), 'the loss', description, RTOL[dtype],
                factors={logits.shape[0]: 'N times: summed over the batch, not averaged',
                         1 / logits.shape[1]: '1/C: averaged over the classes too'})


def check_softmax_backward(you):
    for i, (description, logits, labels, dtype) in enumerate(softmax_cases()):
        loss = you.make('SoftmaxCrossEntropyWithLogits')
        value = you.call(loss, 'forward', logits, labels, prerequisite=True)
        grad = you.call(loss, 'backward_inputs', logits, labels)
        _, expected = softmax_oracle(logits, labels)
        grad_array = as_array(grad, 'backward_inputs', description)
        if not np.isfinite(grad_array).all():
            raise Verdict('wrong', f"backward_inputs is {'NaN' if np.isnan(grad_array).any() else 'inf'} "
                                   f"({description}): exp overflowed; subtract each row's max first")
        compare(grad, expected, 'backward_inputs', description, RTOL[dtype],
                factors={logits.shape[0]: 'N times: the mean of the forward pass is not divided out'})
        if i == 0 and value is not None and np.size(value) == 1 and np.isclose(float(np.sum(value)),
                                                                               softmax_oracle(logits, labels)[0]):
            x = logits.copy()
            error = lab_check(grad_array, lambda: float(np.sum(you.call(loss, 'forward', x, labels))), x)
            if error >= LAB_TOLERANCE:
                raise Verdict('wrong', f"the lab's numerical check against forward: relative error {error:.1e} "
                                       f"({description})")


# L2: the lab leaves the constant open; both are right if forward and backward agree.
L2_CONVENTIONS = ((0.5, "lambda/2 * sum(w^2), gradient lambda*w (torch's weight_decay)"),
                  (1.0, "lambda * sum(w^2), gradient 2*lambda*w"))


def l2_cases():
    rng = np.random.default_rng(11)
    return [('weights (4, 6), lambda 0.01', rng.standard_normal((4, 6)), 0.01),
            ('weights (3,), lambda 0.5', rng.standard_normal(3), 0.5)]


def check_l2_forward(you):
    notes = you.notes.setdefault('L2Regularizer.forward', set())
    for description, weights, decay in l2_cases():
        l2, original = you.make('L2Regularizer', weights, decay, 'l2'), weights.copy()
        value = as_scalar(you.call(l2, 'forward'), 'the penalty', description, notes)
        unchanged_weights(l2, original, 'forward', description)
        matches = [meaning for factor, meaning in L2_CONVENTIONS
                   if np.isclose(value, factor * decay * np.sum(weights ** 2), rtol=1e-9)]
        if not matches:
            compare(np.array(value), np.array(0.5 * decay * np.sum(weights ** 2)), 'the penalty', description,
                    1e-9, factors={1 / decay: 'without lambda', 2.0: 'lambda * sum(w^2)'})
        notes.add(matches[0])


def check_l2_backward(you):
    for description, weights, decay in l2_cases():
        l2, original = you.make('L2Regularizer', weights, decay, 'l2'), weights.copy()
        grads = you.call(l2, 'backward_params')
        if l2.weights is not weights:
            raise Verdict('wrong', f"L2Regularizer keeps a copy of the weights it regularizes, not them: the "
                                   f"update of its gradient would miss them ({description})")
        (param, grad), = parameter_pairs(grads, l2, ('weights',), 'L2Regularizer.backward_params', description)
        unchanged_weights(l2, original, 'backward_params', description)
        grad = as_array(grad, 'the gradient', description)
        gradients = [grad.shape == weights.shape and np.allclose(grad, 2 * factor * decay * weights, rtol=1e-9, atol=0)
                     for factor, _ in L2_CONVENTIONS]
        if not any(gradients):
            compare(grad, decay * weights, 'the gradient', description, 1e-9,
                    factors={1 / decay: 'without lambda', 2.0: '2*lambda*w'})
        # It must also be the gradient of the student's forward, where that forward follows a convention.
        value = you.call(l2, 'forward', prerequisite=True)
        value = float(np.sum(value)) if value is not None and np.size(value) == 1 else None
        for (factor, meaning), right in zip(L2_CONVENTIONS, gradients):
            if value is not None and np.isclose(value, factor * decay * np.sum(weights ** 2), rtol=1e-9) and not right:
                error = lab_check(grad, lambda: float(np.sum(you.call(l2, 'forward'))), l2.weights)
                raise Verdict('wrong', f"forward computes {meaning.split(',')[0]}, but backward_params returns "
                                       f"{'2*' if factor == 0.5 else ''}lambda*w: they disagree (the lab's numerical "
                                       f"check: relative error {error:.1e}; {description})")


def unchanged_weights(l2, original, method, description):
    if not np.array_equal(l2.weights, original):
        raise Verdict('wrong', f"L2Regularizer.{method} changes the weights it regularizes ({description})")


def reference_losses(decays=(0.5, 0.1)):
    """This project's SoftmaxCrossEntropyWithLogits and L2Regularizers: what a RegularizedLoss is checked
    with, so that its verdict does not depend on the student's."""
    import layers
    rng = np.random.default_rng(13)
    logits, labels = rng.standard_normal((6, 10)), np.eye(10)[rng.integers(0, 10, 6)]
    regularizers = [layers.L2Regularizer(rng.standard_normal(shape), decay, f'w{i}')
                    for i, (shape, decay) in enumerate((((4, 5), decays[0]), ((3,), decays[1])))]
    return layers.SoftmaxCrossEntropyWithLogits(), regularizers, logits, labels


REGULARIZED_CASE = "logits (6, 10), two L2Regularizers (lambda 0.5 and 0.1) of this project's layers.py"


def check_regularized(you, method):
    data_loss, regularizers, logits, labels = reference_losses()
    loss = you.make('RegularizedLoss', data_loss, regularizers)
    if method == 'forward':
        notes = you.notes.setdefault('RegularizedLoss.forward', set())
        value = as_scalar(you.call(loss, 'forward', logits, labels), 'the loss', REGULARIZED_CASE, notes)
        penalties = [regularizer.forward() for regularizer in regularizers]
        expected = data_loss.forward(logits, labels) + sum(penalties)
        if not np.isclose(value, expected, rtol=1e-9):
            missing = [f"the penalty {regularizer.name}" for regularizer, penalty in zip(regularizers, penalties)
                       if np.isclose(value, expected - penalty, rtol=1e-9)]
            if np.isclose(value, expected - sum(penalties), rtol=1e-9):
                missing = ['every penalty']
            raise Verdict('wrong', f"the loss is {value:.6g}, not {expected:.6g} ({REGULARIZED_CASE})"
                          + (f": {missing[0]} is left out" if missing else ''))
    elif method == 'backward_inputs':
        compare(you.call(loss, 'backward_inputs', logits, labels), data_loss.backward_inputs(logits, labels),
                'backward_inputs', REGULARIZED_CASE, 1e-12)
    else:
        grads = you.call(loss, 'backward_params')
        if not isinstance(grads, (list, tuple)) or len(grads) != len(regularizers):
            raise Verdict('wrong', f"backward_params returns {type(grads).__name__} of "
                                   f"{len(grads) if hasattr(grads, '__len__') else '?'} entries, not one "
                                   f"[[w, dw], name] per regularizer ({REGULARIZED_CASE})")
        for regularizer, entry in zip(regularizers, grads):
            (param, grad), = parameter_pairs(entry, regularizer, ('weights',), 'backward_params', REGULARIZED_CASE)
            compare(grad, regularizer.backward_params()[0][1], f"the gradient of {regularizer.name}",
                    REGULARIZED_CASE, 1e-12)


def hinge_cases():
    rng = np.random.default_rng(17)
    return [(f"logits {shape}, delta {delta}", (rng.standard_normal(shape) * 2).astype(np.float32),
             rng.integers(0, shape[1], shape[0]), delta)
            for shape, delta in (((7, 10), 1.0), ((1, 10), 1.0), ((50, 10), 1.0), ((7, 10), 2.0))]


def cs231n_hinge(logits, target, delta):
    """CS231n's multiclass SVM loss in float64: mean over the batch of sum_{j != y} max(0, s_j - s_y + delta)."""
    x = tensor(logits)
    correct = x[torch.arange(len(target)), torch.from_numpy(target)][:, None]
    margins = torch.clamp(x - correct + delta, min=0)
    margins = margins.masked_fill(F.one_hot(torch.from_numpy(target), x.shape[1]).bool(), 0)
    loss = margins.sum(dim=1).mean()
    loss.backward()
    return loss.item(), x.grad.numpy()


def check_hinge(you):
    function = getattr(you.module, HINGE)
    notes = you.notes.setdefault(HINGE, set())
    offsets = []
    for description, logits, target, delta in hinge_cases():
        x, labels = torch.tensor(logits, requires_grad=True), torch.from_numpy(target)
        try:
            loss = function(x, labels) if delta == 1.0 else function(x, labels, delta=delta)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                raise
            if isinstance(error, NotImplementedError):
                raise Verdict('missing', f"{HINGE} raises NotImplementedError") from None
            call = f"{HINGE}(logits, target{', delta=' + str(delta) if delta != 1.0 else ''})"
            raise Verdict('error', f"{call} raised {you.exception(error)} ({description})") from None
        if loss is None:
            raise Verdict('missing', f"{HINGE} returns None")
        if not isinstance(loss, torch.Tensor):
            raise Verdict('wrong', f"{HINGE} returns a {type(loss).__name__}, not a torch tensor: "
                                   f"it cannot be backpropagated ({description})")
        value = as_scalar(loss, 'the loss', description, notes)
        expected, expected_grad = cs231n_hinge(logits, target, delta)
        if not np.isclose(value, expected, rtol=1e-5, atol=1e-6):
            offsets.append((value - expected, delta, value / expected if expected else None, description))
            continue
        try:
            loss.reshape(()).backward()
        except RuntimeError as error:
            raise Verdict('wrong', f"the loss cannot be backpropagated ({student.one_line(error)})") from None
        if x.grad is None:
            raise Verdict('wrong', f"the loss does not depend on the logits through autograd ({description})")
        compare(x.grad.numpy(), expected_grad, 'the gradient of the loss', description, RTOL[np.float32])
    if offsets:
        raise Verdict('wrong', hinge_difference(offsets))


def hinge_difference(offsets):
    """What a hinge loss that differs from CS231n's does differently, from (value - expected, delta, ratio,
    description) of each case that differs."""
    differences, deltas, ratios, descriptions = zip(*offsets)
    if len(offsets) > 1 and all(np.isclose(d, delta, rtol=1e-4) for d, delta in zip(differences, deltas)):
        return ("it is CS231n's loss + delta: the true class's own term max(0, s_y - s_y + delta) = delta is "
                f"counted ({descriptions[0]})")
    if all(ratio is not None for ratio in ratios) and np.ptp(ratios) <= 1e-4 * abs(np.mean(ratios)):
        ratio = float(np.mean(ratios))
        why = {0.1: 'averaged over all B*C entries instead of summed over the classes (1/C)',
               1.0 / 9: 'averaged over the C-1 wrong classes instead of summed'}
        meaning = next((text for value, text in why.items() if np.isclose(ratio, value, rtol=1e-4)), None)
        return (f"it is {ratio:.4g} times CS231n's loss (mean over the batch of the sum over j != y)"
                + (f": {meaning}" if meaning else '') + f" ({descriptions[0]})")
    return f"the loss differs from CS231n's by {differences[0]:+.4g} ({descriptions[0]})"


CHECKS = {
    **{f'{name}.forward': (lambda name: lambda you: check_layer_forward(you, name))(name)
       for name in ('Convolution', 'MaxPooling', 'Flatten', 'FC', 'ReLU')},
    **{f'{name}.backward_inputs': (lambda name: lambda you: check_layer_backward_inputs(you, name))(name)
       for name in ('Convolution', 'MaxPooling', 'Flatten', 'FC', 'ReLU')},
    **{f'{name}.backward_params': (lambda name: lambda you: check_layer_backward_params(you, name))(name)
       for name in ('Convolution', 'FC')},
    'SoftmaxCrossEntropyWithLogits.forward': check_softmax_forward,
    'SoftmaxCrossEntropyWithLogits.backward_inputs': check_softmax_backward,
    'L2Regularizer.forward': check_l2_forward,
    'L2Regularizer.backward_params': check_l2_backward,
    **{f'RegularizedLoss.{method}': (lambda method: lambda you: check_regularized(you, method))(method)
       for method in METHODS['RegularizedLoss']},
    HINGE: check_hinge,
}


def run_check(item, you):
    """(verdict, detail) of one item, its notes included. An exception that is not a verdict is the student's
    when its traceback passes through their file (code of theirs the checks run directly: a property, an
    array-like), else a bug of this script, said as such so that one submission does not stop a batch."""
    you.failed_prerequisite = None
    try:
        CHECKS[item](you)
        verdict, detail = 'ok', ''
    except Verdict as outcome:
        verdict, detail = outcome.verdict, outcome.detail
    except Exception as error:
        verdict = 'error'
        if student.where_it_failed(error, you.files):
            detail = f"{item} raised {you.exception(error)}"
        else:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            detail = (f"check_solution.py could not check this item: {type(error).__name__}: "
                      f"{student.one_line(error)} ({os.path.basename(frame.filename)}:{frame.lineno}); please report it")
    notes = sorted(you.notes.get(item, ()))
    return verdict, '; '.join(([detail] if detail else []) + notes)


# ----------------------------------------------------------------------------- net.train

def mnist_subset(data_dir):
    """The first TRAIN_IMAGES training and VALID_IMAGES validation images of the lab's MNIST split, in
    float64, with one-hot labels as the course's train.py makes them."""
    mnist = data.prepare_mnist(data_dir, np.float32, download=False)
    one_hot = np.eye(10)
    return {'train_x': mnist['train_x'][:TRAIN_IMAGES].astype(np.float64),
            'train_y': one_hot[mnist['train_y'][:TRAIN_IMAGES]],
            'valid_x': mnist['valid_x'][:VALID_IMAGES].astype(np.float64),
            'valid_y': one_hot[mnist['valid_y'][:VALID_IMAGES]]}


def train_one_epoch(layers_module, mnist, seed, send):
    """The lab's net (train.make_net) from `layers_module`, started from this project's layers' initial
    weights for `seed`, trained one epoch of SGD (batch 50, lr 0.1) in a fixed batch order, then evaluated on
    the validation images: {'valid_loss', 'valid_accuracy', 'seconds'} (a loss that is an array counts as its
    sum). send(('step', i)) after every step."""
    import layers
    import nn
    import train
    np.random.seed(seed)
    initial = {layer.name: (layer.weights, layer.bias) for layer in train.make_net(layers, BATCH_SIZE, np.float64)
               if layer.has_params}
    net = train.make_net(layers_module, BATCH_SIZE, np.float64)
    for layer in net:
        if layer.name in initial:
            for key, value in zip(('weights', 'bias'), initial[layer.name]):
                if np.shape(getattr(layer, key, None)) != value.shape:
                    raise Verdict('wrong', f"{layer.name}.{key} has shape {np.shape(getattr(layer, key, None))}, "
                                           f"the course's is {value.shape}")
                setattr(layer, key, value.copy())
    loss = layers_module.SoftmaxCrossEntropyWithLogits()
    order = np.random.default_rng(seed).permutation(TRAIN_IMAGES).reshape(-1, BATCH_SIZE)
    started = time.perf_counter()
    for step, batch in enumerate(order):
        x, y = mnist['train_x'][batch], mnist['train_y'][batch]
        logits = nn.forward_pass(net, x)
        value = float(np.sum(loss.forward(logits, y)))
        if not np.isfinite(value):
            raise Verdict('wrong', f"the loss is {value} at step {step + 1} of {len(order)}")
        nn.sgd_update_params(nn.backward_pass(net, loss, logits, y), {'lr': LR})
        send(('step', step))
    correct, valid_loss = 0, 0.0
    for start in range(0, VALID_IMAGES, BATCH_SIZE):
        x, y = mnist['valid_x'][start:start + BATCH_SIZE], mnist['valid_y'][start:start + BATCH_SIZE]
        logits = nn.forward_pass(net, x)
        valid_loss += float(np.sum(loss.forward(logits, y))) * len(x)
        correct += int((np.asarray(logits).argmax(axis=1) == y.argmax(axis=1)).sum())
    return {'valid_loss': valid_loss / VALID_IMAGES, 'valid_accuracy': correct / VALID_IMAGES,
            'seconds': time.perf_counter() - started}


def train_verdict(result, reference):
    """(verdict, detail) of net.train: its validation accuracy and loss next to the reference's."""
    figures = (f"accuracy {result['valid_accuracy']:.1%} (this project's layers: {reference['valid_accuracy']:.1%}), "
               f"loss {result['valid_loss']:.3f} ({reference['valid_loss']:.3f}) on {VALID_IMAGES:,} validation "
               f"images after one epoch on {TRAIN_IMAGES:,}; {result['seconds']:.1f} s ({reference['seconds']:.1f} s)")
    close = abs(result['valid_accuracy'] - reference['valid_accuracy']) <= TRAIN_TOLERANCE['accuracy'] \
        and abs(result['valid_loss'] - reference['valid_loss']) <= TRAIN_TOLERANCE['loss'] * reference['valid_loss']
    return ('ok', figures) if close else ('wrong', figures)


# ----------------------------------------------------------------------------- one submission

class Submission:
    """One path given on the command line: its layers file, the file with its hinge loss, and the
    verdicts, item by item."""

    def __init__(self, path, train):
        self.path, self.verdicts = path, {}
        self.layers_path, self.hinge_path, self.file_items = None, None, []
        absolute = os.path.abspath(path)   # the checks run in a temporary working folder
        if os.path.isdir(path):
            candidate = os.path.join(absolute, 'layers.py')
            self.layers_path = candidate if os.path.isfile(candidate) else None
            py_files = sorted(os.path.join(absolute, name) for name in os.listdir(absolute) if name.endswith('.py'))
            self.hinge_path = next((file for file in py_files if student.defines(file, HINGE)), None)
            has_hinge = True   # a folder is a whole submission: no hinge loss in it is the bonus missing
        else:
            self.layers_path = absolute
            self.hinge_path = absolute if student.defines(absolute, HINGE) else None
            has_hinge = self.hinge_path is not None
        self.items = items_of(has_hinge, train)

    def item_names(self):
        return [name for name, _ in self.file_items] + [item for item, _ in self.items]

    def results(self):
        """[{'item', 'task', 'verdict', 'detail'}], the file's own item first when it has one."""
        tasks = dict(self.items)
        return [{'item': item, 'task': tasks.get(item, 'file'), 'verdict': self.verdicts[item][0],
                 'detail': self.verdicts[item][1]} for item in self.item_names()]


def check_submission(submission, limits, reference_training):
    """Fills submission.verdicts: the classes' items in child processes, one class at a time, then the
    hinge loss, then net.train."""
    if submission.layers_path is None:
        for item, _ in submission.items:
            if item != HINGE:
                submission.verdicts[item] = ('missing', f"no layers.py in {submission.path}")
    else:
        file_problems, failure = static_problems(submission.layers_path), None
        for name, methods in METHODS.items():
            items = [f'{name}.{method}' for method in methods]
            if failure:   # the file did not load: it will not for the next class either
                submission.verdicts.update({item: failure for item in items})
                continue
            problems, failure = check_in_children(submission.layers_path, items, submission.verdicts, limits)
            file_problems += problems
        report_file_problems(submission, submission.layers_path, file_problems, failure)
    if any(item == HINGE for item, _ in submission.items):
        if submission.hinge_path is None:
            submission.verdicts[HINGE] = ('missing', f"no .py file in {submission.path} defines {HINGE}")
        else:
            problems, _ = check_in_children(submission.hinge_path, [HINGE], submission.verdicts, limits)
            if submission.hinge_path != submission.layers_path:
                report_file_problems(submission, submission.hinge_path, problems)
    if any(item == TRAIN for item, _ in submission.items):
        submission.verdicts[TRAIN] = check_training(submission, limits, reference_training)


def static_problems(path):
    """The problems of a file that parsing finds (a syntax error), without running anything."""
    try:
        _, problems = student.parse(open(path, encoding='utf-8').read(), path, salvage=True)
    except (OSError, ValueError) as error:   # ValueError: not UTF-8, a null byte
        return [student.Problem(0, f"cannot read it ({student.one_line(error)})", set())]
    return problems


def report_file_problems(submission, path, problems, failure=None):
    """The file's own item, for problems no item accounts for (a statement outside the course's classes that
    does not parse or raises), or for the (verdict, detail) `failure` of loading it at all."""
    name = os.path.basename(path)
    if failure:
        submission.file_items.append((name, 'file'))
        submission.verdicts[name] = failure
        return
    items = {item for item, _ in submission.items} | set(METHODS)
    unexplained, seen = [], set()
    for problem in problems:
        if (not problem.names or not problem.names <= items) and problem.message not in seen:
            seen.add(problem.message)
            unexplained.append(problem.message if problem.line == 0 or f'line {problem.line}' in problem.message
                               else f"line {problem.line}: {problem.message}")
    if unexplained:
        submission.file_items.append((name, 'file'))
        submission.verdicts[name] = ('error', '; '.join(unexplained))


def check_in_children(path, items, verdicts, limits):
    """Runs the checks of `items` (of one class, or the hinge loss) on the file at `path` in a child process,
    and in a new one after a child dies or hangs, until each item has its verdict in `verdicts`. Returns
    (the problems loading the file met, None or the (verdict, detail) of every item when it did not load)."""
    problems, remaining, timed_out = [], list(items), []
    while remaining:
        running, done, loaded = None, set(), False

        def run(send, todo=tuple(remaining)):
            single_threaded()
            module, found = student.load(path, salvage=True)
            send(('problems', found))
            you = Student(module, [path])
            for item in todo:
                send(('start', item))
                send(('verdict', item) + run_check(item, you))

        with student.Child(run, limits.memory) as child:
            for message in child.messages(limits.timeout):
                if message[0] == 'problems':
                    problems, loaded = message[1], True
                elif message[0] == 'start':
                    running = message[1]
                else:
                    verdicts[message[1]] = message[2:]
                    done.add(message[1])
                    running = None
        if child.ending is None and running is None and len(done) == len(remaining):
            break
        if not loaded:   # the file's own definitions hang or crash: no item of it can be checked
            failure = ('timeout' if child.timed_out else 'error', f"loading {os.path.basename(path)}: {child.ending}")
            verdicts.update({item: failure for item in remaining})
            return problems, failure
        culprit = running or next(item for item in remaining if item not in done)
        if child.timed_out:
            forward = f"{culprit.split('.')[0]}.forward"   # which a backward check runs first
            verdicts[culprit] = ('timeout', f"{culprit} gave no answer within {limits.timeout:g} s"
                                 + (f" ({forward}, which it runs first, never returned either)"
                                    if forward in timed_out else ''))
            timed_out.append(culprit)
        else:
            verdicts[culprit] = ('error', f"{child.ending} while checking {culprit} (os._exit, a crash, or "
                                          f"memory beyond the limit of {limits.memory / 2 ** 30:g} GiB in its code)")
        remaining = [item for item in remaining if item not in done and item != culprit]
    return problems, None


def check_training(submission, limits, reference_training):
    """(verdict, detail) of net.train; not run when an item it needs is missing or fails outright."""
    needed = [item for item, task in submission.items if task == TASK1 and item != TRAIN]
    broken = [item for item in needed if submission.verdicts[item][0] in ('missing', 'error', 'timeout')]
    if broken:
        kind = 'missing' if all(submission.verdicts[item][0] == 'missing' for item in broken) else 'error'
        return kind, f"not run: {', '.join(broken)} {'is' if len(broken) == 1 else 'are'} " \
                     f"{'missing' if kind == 'missing' else 'not working'}"
    reference = reference_training()
    outcome = {}

    def run(send):
        single_threaded()
        module, _ = student.load(submission.layers_path, salvage=True)
        try:
            send(('result', train_one_epoch(module, limits.mnist, limits.seed, send)))
        except Verdict as verdict:
            send(('verdict', verdict.verdict, verdict.detail))
        except Exception as error:
            send(('verdict', 'error', Student(module, [submission.layers_path]).exception(error)))

    with student.Child(run, limits.memory) as child:
        for message in child.messages(limits.timeout, total=TRAIN_TIME_LIMIT * limits.timeout):
            outcome[message[0]] = message[1:]
    if 'result' in outcome:
        return train_verdict(outcome['result'][0], reference)
    if 'verdict' in outcome:
        return outcome['verdict']
    if child.timed_out:
        steps = outcome['step'][0] + 1 if 'step' in outcome else 0
        return 'timeout', f"{child.ending} (training one epoch, after {steps} of {TRAIN_IMAGES // BATCH_SIZE} steps)"
    return 'error', f"{child.ending} while training"


def single_threaded():
    """One thread for torch and for OpenBLAS in a child: on 2 shared cores OpenBLAS's second thread spins
    (a training epoch took 8.7 s of CPU with it, 3.3 s without), and checks run one after another anyway."""
    import fast_layers   # here, in the child: its worker threads would not survive a fork
    torch.set_num_threads(1)
    fast_layers.set_blas_threads(1)


class Limits:
    """What every check runs with: time and memory limits, the seed, and the MNIST subset (for net.train)."""

    def __init__(self, timeout, memory_gib, seed, mnist):
        self.timeout, self.memory, self.seed, self.mnist = timeout, int(memory_gib * 2 ** 30), seed, mnist


def reference_trainer(limits):
    """A function returning this project's layers' net.train figures, computed (in a child) on first use."""
    cache = {}

    def reference():
        if 'result' not in cache:
            def run(send):
                import layers
                single_threaded()
                send(('result', train_one_epoch(layers, limits.mnist, limits.seed, send)))
            with student.Child(run, limits.memory) as child:
                for message in child.messages(limits.timeout, total=TRAIN_TIME_LIMIT * limits.timeout):
                    if message[0] == 'result':
                        cache['result'] = message[1]
            if 'result' not in cache:
                raise RuntimeError(f"this project's layers did not train: {child.ending}")
        return cache['result']
    return reference


# ----------------------------------------------------------------------------- output

def print_table(submission):
    """The submission's items, grouped by task: item, verdict, detail."""
    results = submission.results()
    width = max(len(result['item']) for result in results)
    print(submission.path)
    for task in ('file', TASK1, TASK2, BONUS):
        rows = [result for result in results if result['task'] == task]
        if rows:
            print(f"  {task}")
        for row in rows:
            print(f"    {row['item']:{width}s}  {row['verdict']:7s}  {row['detail']}".rstrip())
    ok = sum(result['verdict'] == 'ok' for result in results)
    print(f"  {ok} of {len(results)} items ok\n", flush=True)


def markdown_cell(text):
    """Student-controlled text made safe for one Markdown table cell: no '|', no line breaks."""
    return ' '.join(str(text).split()).replace('\\', '\\\\').replace('|', '\\|')


def markdown(submissions):
    """The TA's grade sheet: one row per submission, one column per item; then every verdict other than ok,
    and every note, per submission."""
    columns = []
    for submission in submissions:
        columns += [name for name in submission.item_names() if name not in columns]
    lines = ['| submission | ' + ' | '.join(columns) + ' | ok |', '|---|' + '---|' * len(columns) + '---:|']
    for submission in submissions:
        verdicts = submission.verdicts
        cells = [verdicts[column][0] if column in verdicts else '' for column in columns]
        ok = sum(cell == 'ok' for cell in cells)
        lines.append(f"| {markdown_cell(submission.path)} | " + ' | '.join(cells)
                     + f" | {ok}/{len(submission.item_names())} |")
    lines.append('')
    for submission in submissions:
        details = [result for result in submission.results() if result['detail']]
        if details:
            lines.append(f"**{markdown_cell(submission.path)}**\n")
            lines += [f"- {result['item']}: {result['verdict']}, {markdown_cell(result['detail'])}"
                      for result in details]
            lines.append('')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH',
                        help='a folder holding layers.py (and any .py with multiclass_hinge_loss), or one .py file')
    parser.add_argument('--json', metavar='FILE', default=None,
                        help='write [{"path", "items": [{"item", "task", "verdict", "detail"}]}] to FILE')
    parser.add_argument('--markdown', metavar='FILE', default=None,
                        help="write the grade sheet to FILE: a row per submission, a column per item")
    parser.add_argument('--no-train', action='store_true', help='skip net.train (one epoch on MNIST, ~10 s each)')
    parser.add_argument('--data-dir', default=os.environ.get('DATA_DIR', 'data'),
                        help='folder holding MNIST/raw/, for net.train (default: $DATA_DIR, else ./data)')
    parser.add_argument('--timeout', type=cli.positive_float, default=30.0,
                        help=f'seconds one item (one training step) may take (default: 30; net.train in all: '
                             f'{TRAIN_TIME_LIMIT} times that)')
    parser.add_argument('--memory', type=cli.positive_float, default=2.0, metavar='GIB',
                        help='memory a check may allocate, in GiB (default: 2)')
    parser.add_argument('--seed', type=cli.seed_value, default=42, help="net.train's initial weights and batch order "
                                                                         "(default: 42)")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not os.path.exists(path):
            raise cli.UserError(f"{path}: no such file or folder")
        if not os.path.isdir(path) and not path.endswith('.py'):
            raise cli.UserError(f"{path}: not a folder or a .py file")
    for flag, path in (('--json', args.json), ('--markdown', args.markdown)):   # before the work, not after
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise cli.UserError(f"{flag} {path}: no folder {os.path.dirname(os.path.abspath(path))} to write it in")
    return args


# What students' files import, loaded once here rather than in every child: the course's layers.py imports
# scipy.stats, and hinge-loss scripts torchvision, matplotlib and skimage (each ~0.5-1 s to import).
PRELOADED = ('scipy.stats', 'torchvision', 'matplotlib.pyplot', 'skimage.io')


def preload():
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:   # a child that needs it will say so
            pass


def main(argv=None):
    args = parse_args(argv)
    preload()
    mnist = None
    if not args.no_train:
        try:
            mnist = mnist_subset(args.data_dir)
        except data.DataError as error:
            raise cli.UserError(f"net.train needs MNIST: {error} (or pass --no-train)") from None
    limits = Limits(args.timeout, args.memory, args.seed, mnist)
    reference = reference_trainer(limits)
    submissions = []
    for path in args.paths:
        submission = Submission(path, train=not args.no_train)
        check_submission(submission, limits, reference)
        print_table(submission)
        submissions.append(submission)
    if args.json:
        cli.write_json(args.json, [{'path': submission.path, 'items': submission.results()}
                                   for submission in submissions])
    if args.markdown:
        cli.write_text(args.markdown, markdown(submissions) + '\n')
    all_ok = all(result['verdict'] == 'ok' for submission in submissions for result in submission.results())
    if not all_ok:
        sys.exit(1)


if __name__ == '__main__':
    cli.run(main)
