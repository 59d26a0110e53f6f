"""muon.py: the Newton-Schulz orthogonalisation against the SVD, and train_cifar_fast.py's Muon + SGD steps
(and SGD alone) against a plain loop over the parameters that applies the update rules as written."""
import argparse

import pytest
import torch

import muon
from train_cifar_fast import NEWTON_SCHULZ_STEPS, FastNet, make_optimizers


def reference_orthogonalize(matrix, steps=5):
    """The same map from its definition: the quintic with the published coefficients applied `steps` times
    to the singular values of the matrix divided by its Frobenius norm, the singular vectors kept (float64,
    through the SVD)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    s = s / torch.linalg.matrix_norm(matrix.double())
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize('shape', [(8, 8), (16, 216), (64, 576), (216, 16), (300, 40)])
def test_orthogonalize_moves_every_singular_value_near_one_and_keeps_the_singular_vectors(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = muon.orthogonalize(matrix)
    assert out.shape == matrix.shape and out.dtype == torch.float32
    singular_values = torch.linalg.svdvals(out)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    torch.testing.assert_close(out.double(), reference_orthogonalize(matrix), rtol=1e-4, atol=1e-5)


def test_orthogonalize_does_not_depend_on_the_scale_of_its_input():
    matrix = torch.randn(12, 30, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(muon.orthogonalize(1e-3 * matrix), muon.orthogonalize(1e3 * matrix))


def _set_random_gradients(model, generator):
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator).contiguous(
                memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)


@pytest.mark.parametrize('optimizer', ['muon', 'sgd'])
def test_muon_and_sgd_steps_match_a_plain_loop_over_the_parameters(optimizer):
    args = argparse.Namespace(optimizer=optimizer, lr=0.02, head_lr=0.3, bias_lr=0.05, momentum=0.85,
                              weight_decay=1e-3, batch_size=10, muon_lr=0.1, muon_momentum=0.8)
    model = FastNet((4, 8, 8)).to(memory_format=torch.channels_last)  # the memory layout of training
    optimizers = make_optimizers(model, args)
    assert [type(o) for o in optimizers] == [torch.optim.SGD] + ([muon.Muon] if optimizer == 'muon' else [])
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    buffers = {name: torch.zeros_like(p) for name, p in expected.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step uses the momentum buffers
        _set_random_gradients(model, generator)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            w, g = expected[name], p.grad.double()
            if p.ndim == 4 and optimizer == 'muon':  # Nesterov momentum, normalised weight, orthogonalised update
                buffers[name] = args.muon_momentum * buffers[name] + g
                update = g + args.muon_momentum * buffers[name]
                rows, cols = p.shape[0], p[0].numel()
                w = w * rows ** 0.5 / w.norm()
                step = reference_orthogonalize(update.reshape(rows, cols), NEWTON_SCHULZ_STEPS).reshape(p.shape)
                expected[name] = w - args.muon_lr * max(1, rows / cols) ** 0.5 * step
            else:  # Nesterov SGD; weight decay per image, so per step that of the batch, at every lr alike
                lr = {4: args.lr, 2: args.head_lr, 1: args.bias_lr}[p.ndim]
                g = g + args.weight_decay * args.batch_size / lr * w
                buffers[name] = args.momentum * buffers[name] + g
                expected[name] = w - lr * (g + args.momentum * buffers[name])
        for o in optimizers:
            o.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda message: f'{name}: {message}')  # the frozen whitening and BN scales too


@pytest.mark.parametrize('shape', [(16, 8, 3, 3), (40, 4, 1, 1)])  # wide (16 x 72) and tall (40 x 4) filter banks
def test_muon_step_size_relative_to_the_weight_is_the_learning_rate(shape):
    weight = torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(2)))
    weight.grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    optimizer = muon.Muon([weight], lr=0.05, momentum=0.0)
    normalised = weight.detach() * shape[0] ** 0.5 / weight.detach().norm()
    optimizer.step()
    relative_step = (weight.detach() - normalised).norm() / normalised.norm()
    assert 0.05 * 0.75 < relative_step < 0.05 * 1.15  # the singular values of the update lie in about [0.7, 1.14]
