"""Muon (MomentUm Orthogonalized by Newton-Schulz) for the convolution filter banks of train_cifar_fast.py.

Written from Keller Jordan's published description (the Muon blog post, modded-nanogpt, and
cifar10-airbench's airbench94_muon.py). A filter bank W (out_channels, in_channels, k, k) is treated
as a matrix with rows = out_channels and cols = in_channels * k * k. Every step:

    buffer <- momentum * buffer + grad                    heavy-ball momentum
    update <- grad + momentum * buffer                    Nesterov's look-ahead
    W      <- W * sqrt(rows) / ||W||_F                     the scale of W is free (batch norm follows): fix it
    W      <- W - lr * sqrt(max(1, rows / cols)) * orthogonalize(update)

orthogonalize(G) is G with its singular values moved close to 1 (U S V^T -> about U V^T): every direction
of the update gets a similar step, instead of the few directions with large gradients taking almost all
of it. With ||W||_F fixed at sqrt(rows) (filters of unit norm on average), lr is the relative size of a
step, ||step||_F / ||W||_F, whatever the layer's shape, the loss's scale or the batch size; the shape
factor sqrt(max(1, rows / cols)) makes that so for tall matrices too (their orthogonalised update has
only cols unit singular values). No weight decay is needed: the normalisation bounds the weights.
"""
import torch

# The quintic p(s) = a s + b s^3 + c s^5 applied to every singular value s by one Newton-Schulz iteration.
# Its slope at 0 is a = 3.4445, so small singular values grow fast; the price is that s does not converge
# to exactly 1 but keeps oscillating in roughly [0.7, 1.2], which does not hurt training.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix, steps=5, eps=1e-7):
    """matrix (rows, cols) -> float32 (rows, cols) with the same singular vectors and singular values near 1.

    Dividing by the Frobenius norm first puts every singular value in [0, 1], where the iteration
    X <- a X + (b A + c A^2) X with A = X X^T, that is U S V^T -> U p(S) V^T, pushes them towards 1.
    A tall matrix is transposed first so that A is the smaller of the two Gram matrices.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.float()
    x = x / (torch.linalg.matrix_norm(x) + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for weights that batch norm follows (conv filter banks): see the module docstring.

    params: tensors (rows, ...) with rows = out_channels; lr: relative step size ||step||_F / ||W||_F;
    momentum: Nesterov momentum; ns_steps: Newton-Schulz iterations.
    """

    def __init__(self, params, lr, momentum, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for weight in group['params']:
                if weight.grad is None:
                    continue
                buffer = self.state[weight].setdefault('momentum_buffer', torch.zeros_like(weight))
                buffer.mul_(group['momentum']).add_(weight.grad)
                update = weight.grad.add(buffer, alpha=group['momentum'])
                rows, cols = len(weight), weight[0].numel()
                weight.mul_(rows ** 0.5 / torch.linalg.vector_norm(weight))
                orthogonal = orthogonalize(update.reshape(rows, cols), group['ns_steps']).view(weight.shape)
                weight.sub_(orthogonal, alpha=group['lr'] * max(1, rows / cols) ** 0.5)
