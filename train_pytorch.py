"""Task 3: the L2-regularised MNIST model of task 2 (train_l2reg.py), in PyTorch.

Same architecture, initialisation scheme, data, batches, learning-rate policy and
regularisation as the NumPy framework, so the two can be compared number for number:

    python train_pytorch.py                              # the lab's run: 8 epochs, lambda 1e-3
    python train_pytorch.py --sweep                      # lambda in 1e-3, 1e-2, 1e-1, one model each
    python train_pytorch.py --compare-numpy --steps 50   # proves the two frameworks compute the same thing
    python train_pytorch.py --resume runs/<run-name>     # go on after Ctrl-C or a kill

After every epoch, and at the step where Ctrl-C or SIGTERM stops it, the run folder gets checkpoint.pt
(model, optimizer, scheduler, RNG states, results; torch.load(..., weights_only=True) reads it), from which
--resume continues bit for bit.

L2 regularisation is SGD's weight_decay on the conv1, conv2 and fc3 weights:
weight_decay * w added to the gradient is exactly the gradient of the NumPy
framework's (weight_decay / 2) * sum(w**2) loss term. The optimiser never sees
that term as a loss, so it is computed separately wherever a loss is reported:
every reported loss (initial_loss, train_loss, valid_loss, test_loss) is the
regularised objective data_loss + reg_loss, the value RegularizedLoss.forward
gives in the NumPy scripts; data_loss is the training set's cross-entropy alone.
initial_loss is measured on the validation set before the first step, train_loss
and train_acc on the whole training set after each epoch (not averaged over the
epoch's changing weights).

Weights are written in the NumPy framework's .npz layout (nn.save_params), so
--init-from accepts initial weights exported by the NumPy scripts and the NumPy
scripts can load what this one writes.
"""
import csv
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

import checkpoint
import cli
import data
import nn as numpy_nn
import plots

SCRIPT = 'train_pytorch'
COMPARE_TOLERANCE = 1e-8  # relative, in float64
EVAL_BATCH_SIZE = 1000     # evaluation needs no gradients, so bigger batches only save time


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
    cli.add_common_args(parser, resume=True)
    cli.add_mnist_training_args(parser, weight_decay=1e-3)
    parser.add_argument('--device', choices=['cpu', 'cuda', 'auto'], default='cpu',
                        help='where to train; auto = cuda if available, else cpu (default: cpu)')
    parser.add_argument('--draw-every', type=cli.positive_int, default=100,
                        help='draw the conv1 filters every N steps, and after every epoch (default: 100)')
    parser.add_argument('--tensorboard', action='store_true',
                        help='also log losses, accuracies, lr and conv1 filters to <run-dir>/tensorboard')
    parser.add_argument('--init-from', metavar='NPZ', default=None,
                        help='initial weights from an .npz in the NumPy layout (nn.save_params), '
                             'e.g. init_weights.npz of a NumPy run')
    parser.add_argument('--compare-numpy', action='store_true',
                        help='train the NumPy and the PyTorch model side by side in float64 from the same weights '
                             'on the same batches, print both losses per step, exit 1 if they differ')
    parser.add_argument('--steps', type=cli.positive_int, default=50,
                        help='SGD steps for --compare-numpy (default: 50)')
    return cli.parse_args(parser, SCRIPT, argv)


# ----------------------------------------------------------------------------- the model

class LabMnistNet(nn.Module):
    """conv1 16x5x5 SAME -> maxpool 2 -> relu -> conv2 32x5x5 SAME -> maxpool 2 -> relu -> fc3 512 -> relu -> logits 10.

    Layers are named as in the NumPy net (nn.lab_mnist_net), pooling before ReLU as there.
    (N, 1, 28, 28) -> logits (N, 10).
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


REGULARIZED = ('conv1.weight', 'conv2.weight', 'fc3.weight')  # as nn.l2_regularized: weights, not biases or logits


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
    """{'conv1.weights': (16, 25), 'conv1.bias': (16,), ...}: the keys and shapes of nn.save_params.

    A conv kernel (F, C, k, k) becomes the NumPy framework's (F, C*k*k): rows ordered
    (channel, kernel row, kernel column), which is a plain reshape.
    """
    params = {}
    for name, layer in model.named_children():
        params[f'{name}.weights'] = layer.weight.detach().cpu().numpy().reshape(layer.weight.shape[0], -1)
        params[f'{name}.bias'] = layer.bias.detach().cpu().numpy()
    return params


def save_params(model, path):
    """Writes the weights in the layout of nn.save_params, atomically."""
    checkpoint.save_npz(path, numpy_params(model))


def read_params(path):
    """The arrays of an .npz from nn.save_params / save_params; a UserError if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError) as error:
        raise cli.UserError(f"--init-from {path}: cannot read ({error})")


@torch.no_grad()
def load_params(model, params, source):
    """Copies NumPy-layout arrays into the model; a missing key or a wrong shape is a UserError naming both shapes."""
    expected = numpy_params(model)
    for key, shape in ((key, value.shape) for key, value in expected.items()):
        if key not in params:
            raise cli.UserError(f"{source}: missing parameter {key!r} (the model needs shape {shape})")
        if params[key].shape != shape:
            raise cli.UserError(f"{source}: {key!r} has shape {params[key].shape}, the model needs {shape}")
    for name, layer in model.named_children():
        layer.weight.copy_(torch.from_numpy(params[f'{name}.weights']).reshape(layer.weight.shape))
        layer.bias.copy_(torch.from_numpy(params[f'{name}.bias']))


# ----------------------------------------------------------------------------- data, steps, evaluation

def make_loader(x, y, batch_size, shuffle=False, generator=None):
    """Mini-batches of in-memory tensors. The sampler yields whole batches of indices, so a batch is one
    indexing operation instead of batch_size __getitem__ calls and a collate: the loader then costs about
    0.2 s per 55000 images, a plain slicing loop 0.1 s, next to an epoch of training of over 10 s."""
    dataset = TensorDataset(x, y)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


def train_step(model, optimizer, x, y):
    """One SGD step on a batch; returns the batch's data loss, from before the update."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, loader):
    """(mean data loss, accuracy) over every batch of the loader."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    model.train()
    return total_loss / count, correct / count


def to_tensors(mnist, args, device):
    """The prepared NumPy arrays as tensors on the device, the training set cut to --limit."""
    limit = args.limit or len(mnist['train_x'])
    split = {'train': (mnist['train_x'][:limit], mnist['train_y'][:limit]),
             'valid': (mnist['valid_x'], mnist['valid_y']), 'test': (mnist['test_x'], mnist['test_y'])}
    return {name: (torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device))
            for name, (x, y) in split.items()}


# ----------------------------------------------------------------------------- training

def draw_filters(model, run_dir, epoch, step, writer=None):
    """conv1's filters as '<run-dir>/conv1_epoch_EE_step_SSSSSS.png', named as nn.draw_conv_filters names them."""
    weights = model.conv1.weight.detach().cpu().numpy()
    plots.save_filter_grid(os.path.join(run_dir, 'conv1_epoch_%02d_step_%06d.png' % (epoch, step)), weights)
    if writer is not None:
        writer.add_image('conv1_filters', plots.filter_grid(weights), step, dataformats='HW')


def write_log(path, rows):
    """The per-epoch rows as CSV, rewritten whole: a redone epoch replaces its row instead of adding one."""
    def write(f):
        log = csv.DictWriter(f, fieldnames=list(rows[0]))
        log.writeheader()
        log.writerows(rows)
    cli.atomic_write(path, write, mode='w', newline='')  # csv writes its own line ends


def train(args, tensors, run_dir, device, resume=False):
    """Trains one model with args.weight_decay; writes weights, filters, logs and results.json into run_dir.

    Writes checkpoint.pt before the first epoch, after every epoch and when Ctrl-C or SIGTERM stops it
    between two steps. With resume=True a run that finished in run_dir is read back, and an unfinished
    one continues from its checkpoint.pt.
    """
    cli.seed_everything(args.seed)
    dtype = getattr(torch, args.dtype)
    model = LabMnistNet().to(device=device, dtype=dtype)
    finished = resume and checkpoint.finished_results(run_dir, 'test_acc')
    if finished:
        load_params(model, read_params(os.path.join(run_dir, 'weights.npz')), run_dir)
        print(f"{run_dir} finished already: test accuracy {finished['test_acc']:.2%}")
        return finished, model
    checkpoint_path = os.path.join(run_dir, checkpoint.PT)
    state = checkpoint.load_torch(checkpoint_path) if resume and os.path.exists(checkpoint_path) else None
    if args.init_from and state is None:
        load_params(model, read_params(args.init_from), f"--init-from {args.init_from}")
    if state is None:
        save_params(model, os.path.join(run_dir, 'init_weights.npz'))

    policy = args.lr_policy
    optimizer = make_optimizer(model, cli.lr_at(policy, 1), args.weight_decay)
    # LambdaLR counts epochs from 0 and scales the initial lr; the policy counts from 1 and gives absolute values.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: cli.lr_at(policy, epoch + 1) / cli.lr_at(policy, 1))
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = make_loader(*tensors['train'], args.batch_size, shuffle=not args.no_shuffle, generator=generator)
    eval_loaders = {name: make_loader(*tensors[name], EVAL_BATCH_SIZE) for name in ('train', 'valid', 'test')}
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow to import
        writer = SummaryWriter(os.path.join(run_dir, 'tensorboard'))

    def save_checkpoint(epochs_done, batches_done=0, epoch_generator=None, epoch_seconds=0.0):
        """epoch_generator: the batch order generator's state at the start of epoch epochs_done + 1 (default: now)."""
        checkpoint.save_torch(checkpoint_path, {
            'epoch': epochs_done, 'batches_done': batches_done, 'step': step, 'model': model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'generator': generator.get_state() if epoch_generator is None else epoch_generator,
            'torch_rng': torch.get_rng_state(), 'epoch_seconds': epoch_seconds,
            'results': checkpoint.results_text(results)})

    if state is None:
        valid_loss, _ = evaluate(model, eval_loaders['valid'])
        results = {'config': vars(args), 'initial_loss': valid_loss + reg_loss(optimizer), 'epochs': []}
        print(f"initial validation loss {results['initial_loss']:.4f} (ln 10 = {np.log(10):.4f} + regularisation)")
        draw_filters(model, run_dir, 0, 0, writer)
        done, step = 0, 0
        save_checkpoint(0)
    else:
        checkpoint.restore_torch(state, model, optimizer, scheduler, generator)
        results = json.loads(state['results'])
        done, step = state['epoch'], state['step']
        print(checkpoint.resuming(run_dir, done, args.epochs, state['batches_done'], len(train_loader)))
    with cli.stop_between_steps():
        for epoch in range(done + 1, args.epochs + 1):
            lr = optimizer.param_groups[0]['lr']
            start = time.perf_counter() - (state['epoch_seconds'] if state else 0.0)
            progress, batches = checkpoint.torch_epoch(
                train_loader, generator, epoch, f"epoch {epoch}/{args.epochs} lr {lr:g}",
                lambda steps_done, epoch_generator: save_checkpoint(
                    epoch - 1, steps_done, epoch_generator, time.perf_counter() - start), resumed=state)
            state = None  # only the first epoch resumes
            for _, (x, y) in batches:
                loss = train_step(model, optimizer, x, y)
                step += 1
                if step % args.draw_every == 0:
                    draw_filters(model, run_dir, epoch, step, writer)
                    progress.set_postfix(loss=f"{loss:.3f}")
            seconds = time.perf_counter() - start
            scheduler.step()
            draw_filters(model, run_dir, epoch, step, writer)

            penalty = reg_loss(optimizer)
            data_loss, train_acc = evaluate(model, eval_loaders['train'])
            valid_data_loss, valid_acc = evaluate(model, eval_loaders['valid'])
            row = {'epoch': epoch, 'lr': lr, 'train_loss': data_loss + penalty, 'train_acc': train_acc,
                   'valid_loss': valid_data_loss + penalty, 'valid_acc': valid_acc,
                   'data_loss': data_loss, 'reg_loss': penalty,
                   'seconds': seconds, 'images_per_second': len(tensors['train'][1]) / seconds}
            results['epochs'].append(row)
            print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {train_acc:.2%}, "
                  f"valid loss {row['valid_loss']:.4f} acc {valid_acc:.2%}, "
                  f"{seconds:.1f} s ({row['images_per_second']:.0f} img/s)")
            cli.write_json(os.path.join(run_dir, 'results.json'), results)
            write_log(os.path.join(run_dir, 'log.csv'), results['epochs'])
            if writer is not None:
                for key in ('lr', 'train_loss', 'valid_loss', 'train_acc', 'valid_acc', 'data_loss', 'reg_loss'):
                    writer.add_scalar(key, row[key], epoch)
            save_checkpoint(epoch)

    save_params(model, os.path.join(run_dir, 'weights.npz'))
    test_data_loss, test_acc = evaluate(model, eval_loaders['test'])
    epoch_seconds = [row['seconds'] for row in results['epochs']]
    results.update(test_loss=test_data_loss + reg_loss(optimizer), test_acc=test_acc,
                   seconds_per_epoch=float(np.mean(epoch_seconds)),
                   images_per_second=args.epochs * len(tensors['train'][1]) / sum(epoch_seconds))
    cli.write_json(os.path.join(run_dir, 'results.json'), results)
    history = {key: [row[key] for row in results['epochs']]
               for key in ('train_loss', 'valid_loss', 'train_acc', 'valid_acc', 'lr')}
    plots.plot_training_progress(os.path.join(run_dir, 'training_plot.png'), history,
                                 title=f"PyTorch, lambda = {args.weight_decay:g}")
    if writer is not None:
        writer.close()
    print(f"test accuracy {test_acc:.2%}; results in {run_dir}")
    return results, model


def sweep(args, tensors, run_dir, device):
    """One model per lambda in <run-dir>/wd_<lambda>/, and a table comparing them: sweep.json and sweep.md."""
    rows = []
    resume = args.resume is not None
    for weight_decay in args.sweep or cli.LAB_SWEEP:
        sub_dir = cli.make_run_dir(run_dir, f"wd_{weight_decay:g}", SCRIPT, args.overwrite or resume)
        print(f"--- lambda = {weight_decay:g} -> {sub_dir}")
        run_args = type(args)(**{**vars(args), 'weight_decay': weight_decay, 'sweep': None})
        results, model = train(run_args, tensors, sub_dir, device, resume)
        last = results['epochs'][-1]
        rows.append({'weight_decay': weight_decay, 'valid_acc': last['valid_acc'], 'test_acc': results['test_acc'],
                     'data_loss': last['data_loss'], 'reg_loss': last['reg_loss'],
                     'conv1_mean_abs_weight': model.conv1.weight.abs().mean().item(), 'run_dir': sub_dir})
    cli.write_json(os.path.join(run_dir, 'sweep.json'), rows)
    lines = ['| lambda | valid acc | test acc | data loss | reg loss | mean abs conv1 weight |',
             '|---:|---:|---:|---:|---:|---:|']
    lines += [f"| {r['weight_decay']:g} | {r['valid_acc']:.2%} | {r['test_acc']:.2%} | {r['data_loss']:.4f} | "
              f"{r['reg_loss']:.4f} | {r['conv1_mean_abs_weight']:.4f} |" for r in rows]
    with open(os.path.join(run_dir, 'sweep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return rows


# ----------------------------------------------------------------------------- equivalence with the NumPy framework

def relative_difference(a, b):
    """|a - b| / max(|a|, |b|) elementwise for scalars; for arrays max|a - b| / max|a| (near-zero entries
    of a tensor would make an elementwise ratio meaningless)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max(), np.finfo(np.float64).tiny)
    return float(np.abs(a - b).max() / scale)


def compare_with_numpy(x, y, steps, batch_size, lr, weight_decay, seed, device=torch.device('cpu')):
    """Runs `steps` SGD steps of the NumPy net (nn.lab_mnist_net + nn.l2_regularized) and of LabMnistNet
    in float64 from the same initial weights, on the same batches x[i*batch_size:(i+1)*batch_size].

    The losses compared are both the regularised objective before each step: RegularizedLoss.forward
    for NumPy; for PyTorch cross_entropy + reg_loss(optimizer), while its gradient comes from weight_decay.
    Returns (rows of (step, numpy loss, torch loss, rel diff), {key: rel weight difference after the steps}).
    """
    if len(x) < steps * batch_size:
        raise cli.UserError(f"--compare-numpy needs {steps} x {batch_size} training images, there are {len(x)}")
    np.random.seed(seed)
    net, data_loss = numpy_nn.lab_mnist_net(batch_size, np.float64)
    loss = numpy_nn.l2_regularized(net, data_loss, weight_decay)
    model = LabMnistNet().to(device=device, dtype=torch.float64)
    load_params(model, numpy_nn.parameters(net), 'the NumPy net')
    optimizer = make_optimizer(model, lr, weight_decay)

    rows = []
    for step in range(steps):
        xb, yb = x[step * batch_size:(step + 1) * batch_size], y[step * batch_size:(step + 1) * batch_size]
        logits = numpy_nn.forward_pass(net, xb)
        numpy_loss = loss.forward(logits, yb)
        numpy_nn.sgd_update_params(numpy_nn.backward_pass(net, loss, logits, yb), {'lr': lr})

        torch_reg = reg_loss(optimizer)
        torch_data = train_step(model, optimizer, torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device))
        torch_loss = torch_data + torch_reg
        rows.append((step + 1, numpy_loss, torch_loss, relative_difference(numpy_loss, torch_loss)))

    torch_params = numpy_params(model)
    weight_diffs = {key: relative_difference(value, torch_params[key])
                    for key, value in numpy_nn.parameters(net).items()}
    return rows, weight_diffs


def run_comparison(args, device):
    lr = cli.lr_at(args.lr_policy, 1)
    num_images = args.steps * args.batch_size
    mnist = data.prepare_mnist(args.data_dir, np.float64, valid_size=args.valid_size)
    print(f"NumPy vs PyTorch, float64: {args.steps} SGD steps, lr {lr:g}, lambda {args.weight_decay:g}, "
          f"batches of {args.batch_size} from the first {num_images} training images in order, "
          f"the same initial weights (NumPy's, seed {args.seed}).")
    print("loss = cross-entropy + (lambda/2) * sum of squared conv1, conv2, fc3 weights, before each step "
          "(PyTorch: the L2 gradient comes from SGD's weight_decay, the L2 term is computed for reporting)")
    rows, weight_diffs = compare_with_numpy(mnist['train_x'], mnist['train_y'], args.steps, args.batch_size,
                                            lr, args.weight_decay, args.seed, device)
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
    return verdict == 'EQUAL'


def main(argv=None):
    args = parse_args(argv)
    device = cli.torch_device(args.device)
    if args.compare_numpy:
        # float64 on both sides: any difference beyond rounding is a real mismatch, not float32 noise.
        if not run_comparison(args, device):
            sys.exit(1)
        return
    if args.init_from and args.resume is None:  # a bad file is reported before any data is read
        load_params(LabMnistNet(), read_params(args.init_from), f"--init-from {args.init_from}")
    mnist = data.prepare_mnist(args.data_dir, getattr(np, args.dtype), valid_size=args.valid_size)
    tensors = to_tensors(mnist, args, device)
    run_dir = cli.open_run_dir(args, SCRIPT, argv)
    with cli.resume_hint(SCRIPT, run_dir):
        if args.sweep is not None:
            sweep(args, tensors, run_dir, device)
        else:
            train(args, tensors, run_dir, device, resume=args.resume is not None)


if __name__ == '__main__':
    cli.run(main)
