"""Task 3: the L2-regularised MNIST model of task 2 (train_l2reg.py), in PyTorch.

Same architecture, initialisation scheme, data, batches, learning-rate policy and
regularisation as the NumPy framework, so the two can be compared number for number:

    python train_pytorch.py                              # the lab's run: 8 epochs, lambda 1e-3
    python train_pytorch.py --sweep                      # lambda in 1e-3, 1e-2, 1e-1, one model each
    python train_pytorch.py --compare-numpy --steps 50   # proves the two frameworks compute the same thing
    python train_pytorch.py --init-from runs/<numpy-run>/init_weights.npz   # start from NumPy's weights
    python train_pytorch.py --resume runs/<run-name>     # go on after Ctrl-C or a kill

The batches are the NumPy scripts' own: the same seed gives the same order (run.Run's rng), so with
--init-from the two frameworks start from the same weights and take the same steps. The lab recommends
torch.utils.data.DataLoader; with the whole data set as tensors in memory, indexing them with a permutation
is what DataLoader(TensorDataset(x, y), batch_size, shuffle=True) does, without collating every batch from
single images, and it gives both frameworks the same batches.

L2 regularisation is SGD's weight_decay on the conv1, conv2 and fc3 weights: weight_decay * w added to
the gradient is exactly the gradient of the NumPy framework's (weight_decay / 2) * sum(w**2) loss term.
The optimiser never sees that term as a loss, so it is computed separately (reg_loss) wherever the L2
term is reported; train_loss, valid_loss and test_loss are the cross-entropy alone.

Writes into <save-dir>/<run-name>/ what train.py writes (weights in the NumPy framework's .npz layout,
so weights move both ways), plus log.csv, TensorBoard logs with --tensorboard, and checkpoint.pt
(torch.load(..., weights_only=True) reads it), from which --resume continues bit for bit.
"""
import argparse
import csv
import io
import os
import sys

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
import cli
import data
import fast_layers
import metrics
import nn as numpy_nn
import plots
import train as task1
import train_l2reg
from run import Run

SCRIPT = 'train_pytorch'
COMPARE_TOLERANCE = 1e-8  # relative, in float64
# What --compare-numpy reads: its own steps and layers, and the first SGD step's settings.
COMPARE_FLAGS = {'compare_numpy', 'steps', 'layers', 'batch_size', 'lr_policy', 'weight_decay', 'seed', 'data_dir',
                 'valid_size', 'save_dir', 'run_name', 'overwrite', 'device'}


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, *cli.RUN_FLAGS, 'device', 'epochs', 'batch_size', 'lr_policy', 'dtype', 'limit',
                  'no_shuffle', 'valid_size', 'draw_every', 'weight_decay', epochs=task1.EPOCHS,
                  batch_size=task1.BATCH_SIZE, lr_policy=task1.LR_POLICY, valid_size=data.MNIST_VALID_SIZE,
                  weight_decay=train_l2reg.WEIGHT_DECAY)
    parser.add_argument('--sweep', type=cli.non_negative_float, nargs='*', default=None,
                        help=f"train one model per lambda and compare them (no values: the lab's {train_l2reg.SWEEP})")
    parser.add_argument('--tensorboard', action='store_true',
                        help='also log losses, accuracies, lr and conv1 filters to <run-dir>/tensorboard')
    parser.add_argument('--init-from', metavar='NPZ', default=None,
                        help='initial weights from an .npz in the NumPy layout (nn.save_params), '
                             'e.g. init_weights.npz of a NumPy run')
    parser.add_argument('--compare-numpy', action='store_true',
                        help='train the NumPy and the PyTorch model side by side in float64 from the same weights '
                             'on the same batches, print both losses per step, exit 1 if they differ')
    parser.add_argument('--steps', type=cli.positive_int, default=50,
                        help='SGD steps of --compare-numpy (default: %(default)s)')
    parser.add_argument('--layers', type=cli.layers_choice, default='textbook', metavar='{textbook,fast,PATH}',
                        help="the NumPy layers --compare-numpy runs: layers.py (textbook), fast_layers.py (fast), "
                             "or a student's layers.py (default: %(default)s)")
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args = cli.parse_args(parser, SCRIPT, argv)
    if args.compare_numpy:
        cli.refuse_flags(parser, argv, 'with --compare-numpy', COMPARE_FLAGS)
    else:
        cli.refuse_flags(parser, argv, 'without --compare-numpy', set(vars(args)) - {'steps', 'layers'})
    task1.check_mnist_args(args)
    return args


# ----------------------------------------------------------------------------- the model

class LabMnistNet(nn.Module):
    """conv1 16x5x5 SAME -> maxpool 2 -> relu -> conv2 32x5x5 SAME -> maxpool 2 -> relu -> fc3 512 -> relu -> logits 10.

    Layers are named as in train.make_net, pooling before ReLU as there. (N, 1, 28, 28) -> logits (N, 10).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        self.fc3 = nn.Linear(32 * 7 * 7, 512)
        self.logits = nn.Linear(512, 10)
        self.reset_parameters()

    def reset_parameters(self):
        """The lab's initialisation: He (kaiming) normal for the ReLU layers, zero biases, PyTorch's default for logits."""
        for layer in (self.conv1, self.conv2, self.fc3):
            nn.init.kaiming_normal_(layer.weight, mode='fan_in', nonlinearity='relu')
            nn.init.zeros_(layer.bias)
        self.logits.reset_parameters()

    def forward(self, x):
        h = torch.relu(F.max_pool2d(self.conv1(x), 2))
        h = torch.relu(F.max_pool2d(self.conv2(h), 2))
        h = torch.relu(self.fc3(h.flatten(1)))
        return self.logits(h)


REGULARIZED = ('conv1.weight', 'conv2.weight', 'fc3.weight')  # as train_l2reg.regularized_loss: weights only


def make_optimizer(model, lr, weight_decay):
    """Plain SGD; L2 as weight_decay on the regularised weights only (a parameter group of their own)."""
    params = dict(model.named_parameters())
    groups = [{'params': [params[name] for name in REGULARIZED], 'weight_decay': weight_decay},
              {'params': [p for name, p in params.items() if name not in REGULARIZED], 'weight_decay': 0.0}]
    return torch.optim.SGD(groups, lr=lr)


@torch.no_grad()
def reg_loss(optimizer):
    """The loss term whose gradient weight_decay adds: sum over groups of (weight_decay / 2) * sum(w**2)."""
    return sum(0.5 * group['weight_decay'] * sum(p.square().sum().item() for p in group['params'])
               for group in optimizer.param_groups)


# ----------------------------------------------------------------------------- weights in the NumPy layout

def numpy_params(model):
    """{'conv1.weights': (16, 25), 'conv1.bias': (16,), ...}: the keys and shapes of nn.parameters.

    A conv kernel (F, C, k, k) becomes the NumPy framework's (F, C*k*k): rows ordered
    (channel, kernel row, kernel column), which is a plain reshape.
    """
    return {f'{name}.{kind}': param.detach().cpu().numpy().reshape(layer.weight.shape[0], -1)
            if kind == 'weights' else param.detach().cpu().numpy()
            for name, layer in model.named_children() for kind, param in (('weights', layer.weight), ('bias', layer.bias))}


@torch.no_grad()
def load_numpy_layout(model, params, source):
    """Copies NumPy-layout arrays into the model; a missing key or a wrong shape is a UserError naming both."""
    arrays = {key: np.empty_like(value) for key, value in numpy_params(model).items()}
    checkpoint.copy_arrays(arrays, params, source)  # checks every key and shape
    for name, layer in model.named_children():
        layer.weight.copy_(torch.from_numpy(arrays[f'{name}.weights']).reshape(layer.weight.shape))
        layer.bias.copy_(torch.from_numpy(arrays[f'{name}.bias']))


# ----------------------------------------------------------------------------- training

def train(model, optimizer, scheduler, tensors, run, batch_size, shuffle=True, draw_every=100, writer=None):
    """The lab's loop: every epoch a new order of the training images, SGD on its mini-batches, then the
    scores of the whole training and validation sets (metrics.evaluate); conv1's filters are drawn every
    draw_every steps and, with the loss, saved after every epoch (log.csv)."""
    train_x, train_y = tensors['train']
    for epoch in run.epochs():
        lr = optimizer.param_groups[0]['lr']
        order = run.rng.permutation(len(train_y)) if shuffle else np.arange(len(train_y))  # the lab's shuffle_data
        order = torch.from_numpy(order).to(train_y.device)
        model.train()
        for step in run.steps():
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            run.check_loss(loss)  # a NaN stops the run here, before it reaches the weights
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if run.step % draw_every == 0:
                draw_filters(model, run, writer)
        scheduler.step()
        run.end_epoch(lr=lr, train=metrics.evaluate(model, *tensors['train']),
                      valid=metrics.evaluate(model, *tensors['valid']), reg_loss=reg_loss(optimizer))
        draw_filters(model, run, writer)
        write_log(os.path.join(run.dir, 'log.csv'), run.results['epochs'], writer)


def draw_filters(model, run, writer=None):
    """conv1's filters as '<run-dir>/conv1_epoch_EE_step_SSSSSS.png', as the NumPy scripts draw them."""
    weights = model.conv1.weight.detach().cpu().numpy()
    plots.draw_conv_filters(run.epoch, run.step, weights, run.dir)
    if writer is not None:
        writer.add_image('conv1_filters', plots.filter_grid(weights), run.step, dataformats='HW')


def train_model(args, tensors, run_dir, device):
    """Trains one model with args.weight_decay, tests it and writes everything into run_dir -> (results, model).
    With --resume, a run that finished is read back and an unfinished one goes on from its checkpoint."""
    cli.seed_everything(args.seed)
    model = LabMnistNet().to(device=device, dtype=getattr(torch, args.dtype))
    if args.init_from:
        load_numpy_layout(model, checkpoint.load_npz(args.init_from), f"--init-from {args.init_from}")
    optimizer = make_optimizer(model, args.lr_policy[1], args.weight_decay)
    # LambdaLR counts epochs from 0 and scales the initial lr; the policy counts from 1 and gives absolute values.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: numpy_nn.lr_at(args.lr_policy, epoch + 1) / args.lr_policy[1])
    run = Run(run_dir, args.seed, args.resume is not None, args.epochs, len(tensors['train'][1]), args.batch_size,
              state_dicts={'model': model, 'optimizer': optimizer, 'scheduler': scheduler},
              results={'script': f'{SCRIPT}.py', 'config': vars(args)})
    if run.finished:
        checkpoint.check_same_arrays(os.path.join(run_dir, 'weights.npz'), numpy_params(model))
        print(f"{run_dir} finished already: test accuracy {run.results['test']['accuracy']:.2%}")
        return run.results, model
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow to import
        writer = SummaryWriter(os.path.join(run_dir, 'tensorboard'))
    if not run.resumed:
        save_numpy_layout(model, os.path.join(run_dir, 'init_weights.npz'))
        draw_filters(model, run, writer)
        valid = metrics.evaluate(model, *tensors['valid'])
        run.results.update(initial_loss=valid['loss'], initial_reg_loss=reg_loss(optimizer),
                           initial_acc=valid['accuracy'])
        print(f"initial validation loss {valid['loss']:.4f} (ln 10 = {np.log(10):.4f}), "
              f"plus {reg_loss(optimizer):.4f} of L2")

    train(model, optimizer, scheduler, tensors, run, args.batch_size, not args.no_shuffle, args.draw_every, writer)

    test = metrics.evaluate(model, *tensors['test'])
    save_numpy_layout(model, os.path.join(run_dir, 'weights.npz'))
    plots.plot_training_progress(run_dir, plots.history(run.results['epochs']),
                                 title=f"PyTorch, lambda = {args.weight_decay:g}")
    run.finish(test=task1.summary_of(test))
    if writer is not None:
        writer.close()
    print(f"test accuracy {test['accuracy']:.2%}; results in {run_dir}")
    return run.results, model


def save_numpy_layout(model, path):
    """Writes the weights in the layout of nn.save_params, atomically."""
    checkpoint.save_npz(path, numpy_params(model))


def write_log(path, records, writer=None):
    """The per-epoch records as CSV (rewritten whole: a redone epoch replaces its row) and to TensorBoard."""
    text = io.StringIO()
    log = csv.DictWriter(text, fieldnames=list(records[0]))
    log.writeheader()
    log.writerows(records)
    cli.write_text(path, text.getvalue())
    if writer is not None:
        for key, value in records[-1].items():
            writer.add_scalar(key, value, records[-1]['epoch'])


def to_tensors(mnist, device):
    """The prepared NumPy arrays as tensors on the device."""
    return {name: (torch.from_numpy(np.ascontiguousarray(mnist[f'{name}_x'])).to(device),
                   torch.from_numpy(mnist[f'{name}_y']).to(device)) for name in ('train', 'valid', 'test')}


# ----------------------------------------------------------------------------- equivalence with the NumPy framework

def relative_difference(a, b):
    """|a - b| / max(|a|, |b|) elementwise for scalars; for arrays max|a - b| / max|a| (near-zero entries
    of a tensor would make an elementwise ratio meaningless)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max(), np.finfo(np.float64).tiny)
    return float(np.abs(a - b).max() / scale)


def compare_with_numpy(x, y, steps, batch_size, lr, weight_decay, seed, layers, device=torch.device('cpu')):
    """Runs `steps` SGD steps of the NumPy net (train.make_net with `layers`, train_l2reg.regularized_loss) and
    of LabMnistNet in float64 from the same initial weights, on the same batches x[i*batch_size:(i+1)*batch_size].

    The losses compared are both the regularised objective before each step: RegularizedLoss.forward
    for NumPy; for PyTorch cross_entropy + reg_loss(optimizer), while its gradient comes from weight_decay.
    Returns (rows of (step, numpy loss, torch loss, rel diff), {key: rel weight difference after the steps}).
    """
    if len(x) < steps * batch_size:
        raise cli.UserError(f"--compare-numpy needs {steps} x {batch_size} training images, there are {len(x)}")
    np.random.seed(seed)
    net = task1.make_net(layers, batch_size, np.float64)
    loss = train_l2reg.regularized_loss(net, weight_decay, layers)
    model = LabMnistNet().to(device=device, dtype=torch.float64)
    load_numpy_layout(model, numpy_nn.parameters(net), 'the NumPy net')
    optimizer = make_optimizer(model, lr, weight_decay)

    rows = []
    for step in range(steps):
        xb, yb = x[step * batch_size:(step + 1) * batch_size], y[step * batch_size:(step + 1) * batch_size]
        logits = numpy_nn.forward_pass(net, xb)
        labels = numpy_nn.one_hot(yb, 10)  # the course's losses take one-hot labels
        numpy_loss = float(np.squeeze(loss.forward(logits, labels)))
        numpy_nn.sgd_update_params(numpy_nn.backward_pass(net, loss, logits, labels), {'lr': lr})

        torch_loss = reg_loss(optimizer)
        optimizer.zero_grad()
        data_loss = F.cross_entropy(model(torch.from_numpy(xb).to(device)), torch.from_numpy(yb).to(device))
        data_loss.backward()
        optimizer.step()
        torch_loss += data_loss.item()
        rows.append((step + 1, numpy_loss, torch_loss, relative_difference(numpy_loss, torch_loss)))

    torch_params = numpy_params(model)
    weight_diffs = {key: relative_difference(value, torch_params[key])
                    for key, value in numpy_nn.parameters(net).items()}
    return rows, weight_diffs


def run_comparison(args, device, argv=None):
    """--compare-numpy: prints every step's two losses and the weights' differences, and writes them to
    compare_numpy.json in a run folder of its own; returns whether the two frameworks agree."""
    lr = args.lr_policy[1]
    num_images = args.steps * args.batch_size
    mnist = data.prepare_mnist(args.data_dir, np.float64, valid_size=args.valid_size)
    fast_layers.set_blas_threads(1)  # as train.py runs the NumPy layers
    print(f"NumPy ({args.layers} layers) vs PyTorch, float64: {args.steps} SGD steps, lr {lr:g}, lambda "
          f"{args.weight_decay:g}, batches of {args.batch_size} from the first {num_images} training images in "
          f"order, the same initial weights (NumPy's, seed {args.seed}).")
    print("loss = cross-entropy + (lambda/2) * sum of squared conv1, conv2, fc3 weights, before each step "
          "(PyTorch: the L2 gradient comes from SGD's weight_decay, the L2 term is computed for reporting)")
    rows, weight_diffs = compare_with_numpy(mnist['train_x'], mnist['train_y'], args.steps, args.batch_size,
                                            lr, args.weight_decay, args.seed, task1.layers_module(args.layers),
                                            device)
    print(f"{'step':>5} {'numpy loss':>22} {'torch loss':>22} {'rel diff':>10}")
    for step, numpy_loss, torch_loss, diff in rows:
        print(f"{step:5d} {numpy_loss:22.16f} {torch_loss:22.16f} {diff:10.2e}")
    print(f"weights after {args.steps} steps, max|numpy - torch| / max|numpy| per tensor:")
    for key, diff in weight_diffs.items():
        print(f"  {key:15s} {diff:.2e}")
    worst_loss = max(row[3] for row in rows)
    worst_weight = max(weight_diffs.values())
    verdict = 'EQUAL' if max(worst_loss, worst_weight) <= COMPARE_TOLERANCE else 'DIFFERENT'
    print(f"max rel diff: loss {worst_loss:.2e}, weights {worst_weight:.2e} "
          f"(tolerance {COMPARE_TOLERANCE:g}) -> {verdict}")
    with cli.run_folder(args, SCRIPT, argv) as run_dir:  # only now: too few images for --steps leave no folder
        cli.write_json(os.path.join(run_dir, 'compare_numpy.json'), {
            'script': f'{SCRIPT}.py', 'config': vars(args), 'machine': cli.machine(),
            'steps': [dict(zip(('step', 'numpy_loss', 'torch_loss', 'rel_diff'), row)) for row in rows],
            'weight_rel_diffs': weight_diffs, 'max_loss_rel_diff': worst_loss, 'max_weight_rel_diff': worst_weight,
            'tolerance': COMPARE_TOLERANCE, 'verdict': verdict})
    return verdict == 'EQUAL'


def main(argv=None):
    args = parse_args(argv)
    lambdas = train_l2reg.sweep_lambdas(args)
    device = cli.torch_device(args.device)
    if args.compare_numpy:
        # float64 on both sides: any difference beyond rounding is a real mismatch, not float32 noise.
        if not run_comparison(args, device, argv):
            sys.exit(1)
        return
    if args.init_from and args.resume is None:  # a bad file is reported before any data is read
        load_numpy_layout(LabMnistNet(), checkpoint.load_npz(args.init_from), f"--init-from {args.init_from}")
    tensors = to_tensors(task1.mnist_split(args), device)
    print(', '.join(f"{len(y)} {name} images" for name, (_, y) in tensors.items()) + f", on {device}")

    def train_one(run_args, sub_dir):
        results, model = train_model(run_args, tensors, sub_dir, device)
        return results, numpy_params(model)
    with cli.run_folder(args, SCRIPT, argv) as run_dir:
        if lambdas is None:
            train_one(args, run_dir)
        else:
            train_l2reg.sweep(args, run_dir, train_one)


if __name__ == '__main__':
    cli.run(main)
