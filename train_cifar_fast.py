"""Beyond the lab: a strong, fast CIFAR-10 conv-net for the CPU and the GPU, one or many processes.

    python train_cifar_fast.py --data-dir data --time-budget 600       # CPU: the best model 10 minutes buy
    python train_cifar_fast.py --data-dir data --device cuda --preset gpu --seeds 5   # GPU: time to 94%
    python -m torch.distributed.run --nproc_per_node=2 train_cifar_fast.py --data-dir data --epochs 2

The lab's model stops near 70%. What takes CIFAR-10 past 90% in minutes are the ideas of the fast
CIFAR-10 trainers (KellerJordan/cifar10-airbench, tysam-code/hlb-CIFAR10); this is airbench94_muon's recipe,
written here from scratch:
  - the whole data set is a tensor in memory (on the GPU when there is one); augmentation is a few tensor
    operations per batch: alternating flips (a random half of the images mirrored in even epochs, the other
    half in odd ones) and random translations by up to 2 pixels (reflect padding);
  - a small VGG-like net: a frozen 2x2 patch-whitening convolution (from the eigenvectors of the training
    patches' covariance; its bias trains for the first 3/8 of the steps), then three blocks
    conv3x3 -> maxpool -> BN -> GELU -> conv3x3 -> BN -> GELU (BN shifts only, fast-moving statistics),
    a global max-pool and a linear head whose logits are divided by the width; convolutions start as
    identity maps (dirac init) plus noise;
  - label smoothing 0.2, the loss summed over the batch, a linear decay of the learning rates to zero, and Muon
    (muon.py: momentum orthogonalised by 3 Newton-Schulz steps) for the conv filter banks, Nesterov SGD for the
    rest (or --optimizer sgd for everything);
  - test-time augmentation: the logits averaged over the image and its mirror image, and with --tta 2 over
    both shifted by one pixel too (6 views, weighted as the training augmentation would draw them);
  - channels_last memory, and bfloat16 autocast where the hardware computes in bfloat16 (GPUs, CPUs with
    AVX-512 BF16 or AMX: faster than float32 there; the README has both on one such CPU); elsewhere float32,
    because bfloat16 would be emulated and several times slower (bench_cifar.py measures both);
  - --ema evaluates an exponential moving average of the weights instead (off by default, as in airbench94_muon).
Shapes per image: 3x32x32 -> whiten 24x31x31 -> block1 w1x15x15 -> block2 w2x7x7 -> block3 w3x3x3 -> max w3 -> 10.

Nothing is chosen on validation data (fixed schedule, no early stopping), so by default the lab's 5000
validation images are trained on too and the test set is the yardstick; --holdout keeps them out.

--time-budget SECONDS covers everything from the first warm-up step to the final test accuracy: a few
warm-up steps (run, timed, then undone) give the speed of a step and of the final evaluation, and the
schedule then follows the training clock so that the learning rate reaches zero, and the final evaluation
ends, when the budget runs out. The clock stops during the evaluations along the way (--eval-every); the
GPU is synchronised before every clock reading.

Under torchrun each process takes a disjoint 1/N shard of every epoch's permutation and a 1/N share of
the batch; DistributedDataParallel averages the gradients (gloo on the CPU, nccl on GPUs), batch norm
statistics are averaged across processes before every evaluation, and process 0 evaluates and writes.

Writes into <save-dir>/<run-name>/:
    config.json             the script and its command line
    results.json            config, machine, load average, per-evaluation (epoch, seconds, test accuracy) points,
                            epochs and seconds to 85/90/94% test accuracy, final test scores (metrics.summary's
                            'test', as every training script's results.json has it); one entry per seed under
                            'runs', 'test' of the model of --seed, and a summary over the seeds
    time_to_accuracy.png    test accuracy and training loss against training seconds, one line per seed
    model_seed<S>.pt        state_dict of the evaluated model of each seed (the EMA with --ema)
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import itertools
import math
import os
import time

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import data
import distributed
import metrics
import muon
from plots import plot_time_to_accuracy
from run import Diverged

SCRIPT = 'train_cifar_fast'

# ----------------------------------------------------------------------------- settings
# Every setting is the default of the command-line option of the same name (--label-smoothing, ...).

RECIPE = dict(
    label_smoothing=0.2,  # of the cross-entropy targets
    warmup=0.0,           # fraction of the steps with a rising learning rate (airbench94_muon has none)
    ema=0.0,              # decay per step of an evaluated weight average; 0 evaluates the trained weights
    translate=2,          # random translations of the training images by up to this many pixels
    precision='auto',     # autocast dtype; auto: bf16 where the hardware computes in it, else fp32
)
EMA_EVERY = 5  # steps between EMA updates (decay ** 5 each time: the same average at a fifth of the cost)
WHITEN_BIAS_STEPS = 3 / 8  # fraction of the steps the whitening bias trains for, its lr falling to 0 (3 of 8 epochs)
NEWTON_SCHULZ_STEPS = 3    # Muon's orthogonalisation: 3 iterations orthogonalise enough, at 3/5 of the cost of 5
TARGETS = (0.85, 0.90, 0.94)  # test accuracies whose first training second is reported

# The presets fill the options not given (parse_args). The GPU preset is airbench94_muon's recipe (KellerJordan/
# cifar10-airbench: 94.01% on the real CIFAR-10 in 8 epochs, mean of 200 runs), written from its description, run
# for 10 epochs instead of 8: widths 64/256/256, batch 2000, the loss summed over the batch (so SGD's learning
# rates are per image and hold at any batch size), Muon lr 0.24 and momentum 0.6 for the filter banks, Nesterov SGD
# with momentum 0.85 for the rest: the head at lr 0.67, the whitening and BN biases at 0.053, weight decay 2e-6 per
# image; no warm-up, a linear decay to 0. The CPU preset is the same net at batch 500 for 7 epochs: four times
# the steps per epoch (in one-seed probes of a narrower net for 7 epochs, batch 500 beat 2000 and 250; they were
# not committed, so no number is quoted here). Muon's lr follows the batch (the same total step per epoch) and
# 1 - momentum its square root (the momentum averages over more steps, fewer images, as the batch shrinks): at
# batch 500, 0.06 and 0.8.
# --optimizer sgd trains the filter banks with SGD at --lr (airbench94's filter lr, per image) instead.
PRESETS = {
    'cpu': dict(widths=(64, 256, 256), batch_size=500, optimizer='muon', lr=1.5e-3, head_lr=0.67, bias_lr=0.053,
                momentum=0.85, weight_decay=2e-6, muon_lr=0.06, muon_momentum=0.8, epochs=7.0, tta=2),
    'gpu': dict(widths=(64, 256, 256), batch_size=2000, optimizer='muon', lr=1.5e-3, head_lr=0.67, bias_lr=0.053,
                momentum=0.85, weight_decay=2e-6, muon_lr=0.24, muon_momentum=0.6, epochs=10.0, tta=2),
}


def fraction(text):
    """A number in [0, 1): label smoothing, warm-up fraction, EMA decay."""
    value = cli.non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def widths(text):
    """'64,128,256' -> (64, 128, 256): the channels of the three blocks."""
    try:
        values = tuple(int(w) for w in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive integers like 64,128,256, got {text!r}")
    return values


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, 'data_dir', 'save_dir', 'run_name', 'overwrite', 'seed', 'device')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu',
                        help='defaults for the options below; explicit options override them (default: cpu)')
    parser.add_argument('--widths', type=widths, help='channels of the three blocks, e.g. 64,128,256')
    parser.add_argument('--batch-size', type=cli.positive_int, help='global mini-batch size (all processes together)')
    parser.add_argument('--optimizer', choices=['sgd', 'muon'],
                        help='sgd: Nesterov SGD for everything; muon: Muon for the conv filter banks, SGD for the rest')
    parser.add_argument('--lr', type=cli.positive_float,
                        help="SGD's peak learning rate per image of the filter banks (--optimizer sgd)")
    parser.add_argument('--head-lr', type=cli.positive_float,
                        help="SGD's peak learning rate per image of the linear head")
    parser.add_argument('--bias-lr', type=cli.positive_float,
                        help="SGD's peak learning rate per image of the whitening and batch-norm biases")
    parser.add_argument('--momentum', type=cli.non_negative_float, help="SGD's Nesterov momentum")
    parser.add_argument('--weight-decay', type=cli.non_negative_float,
                        help='fraction of every weight SGD trains taken off per training image, at the peak '
                             'learning rate')
    parser.add_argument('--muon-lr', type=cli.positive_float,
                        help="Muon's peak relative step size of the filter banks (--optimizer muon)")
    parser.add_argument('--muon-momentum', type=fraction, help="Muon's Nesterov momentum (--optimizer muon)")
    parser.add_argument('--label-smoothing', type=fraction, help='in [0, 1) (default: %(default)s)')
    parser.add_argument('--warmup', type=fraction,
                        help='fraction of the steps with a rising learning rate (default: %(default)s)')
    parser.add_argument('--ema', type=fraction,
                        help=f'EMA decay per step (applied every {EMA_EVERY} steps); 0 evaluates the raw weights '
                             '(default: %(default)s)')
    parser.add_argument('--translate', type=int, choices=[0, 1, 2, 3, 4],
                        help='random translation of the training images by up to this many pixels (default: %(default)s)')
    parser.add_argument('--tta', type=int, choices=[0, 1, 2],
                        help='test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts')
    parser.add_argument('--epochs', type=cli.positive_float, help='length of the schedule in epochs (may be fractional)')
    parser.add_argument('--time-budget', type=cli.positive_float, default=None,
                        help='seconds from the first warm-up step to the final test accuracy; sizes the schedule, '
                             'overriding --epochs')
    parser.add_argument('--eval-every', type=cli.positive_float, default=1.0,
                        help="evaluate on the test set every this many epochs (one view per image), and at the end "
                             "(with --tta's views) (default: 1)")
    parser.add_argument('--seeds', type=cli.positive_int, default=1,
                        help='train this many models, seeds --seed, --seed+1, ..., and summarise (default: 1)')
    parser.add_argument('--precision', choices=['auto', 'bf16', 'fp16', 'fp32'],
                        help='autocast dtype; auto: bf16 on GPUs and on CPUs with AVX-512 BF16 or AMX, else fp32 '
                             '(fp16 on CUDA only; default: %(default)s)')
    parser.add_argument('--threads', type=cli.positive_int, default=None,
                        help='CPU threads per process (default: the available cores / processes on this machine)')
    parser.add_argument('--warmup-steps', type=cli.positive_int, default=6,
                        help='steps that warm up the kernels and measure the speed, then are undone (default: 6)')
    parser.add_argument('--holdout', action='store_true',
                        help="keep the lab's validation images out of training and report their accuracy too")
    parser.add_argument('--valid-size', type=cli.positive_int, default=5000,
                        help="the lab's validation split (default: 5000)")
    parser.add_argument('--limit', type=cli.positive_int, default=None, help='train on the first N images only (quick runs)')
    parser.set_defaults(**RECIPE)
    for action in parser._actions:  # a preset fills these when not given (None), so --help shows its values
        if action.dest in PRESETS['cpu']:
            action.help += f" (default: {preset_defaults(action.dest)})"
    return parser


def preset_defaults(dest):
    """What --help says of an option a preset fills: its value, or each preset's where they differ."""
    values = {name: as_typed(preset[dest]) for name, preset in PRESETS.items()}
    if len(set(values.values())) == 1:
        return values['cpu']
    return ', '.join(f"{value} with --preset {name}" for name, value in values.items())


def as_typed(value):
    """A preset's value as one would type it: 64,128,256; 0.00133; muon."""
    if isinstance(value, tuple):
        return ','.join(map(str, value))
    return f'{value:g}' if isinstance(value, float) else str(value)


def parse_args(argv=None):
    """The flags, parsed once; the preset fills the options not given (None). What could only fail later is
    refused here, before any work: a batch larger than CIFAR-10's training images, more threads than CPUs,
    seeds past 2**32 - 1."""
    parser = make_parser()
    parser.set_defaults(resume=None)  # nothing to resume (no checkpoints), but cli.parse_args's checks of the folder
    args = cli.parse_args(parser, SCRIPT, argv)
    for dest, value in PRESETS[args.preset].items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.valid_size >= data.CIFAR_TRAIN_SIZE:
        raise cli.UserError(f"--valid-size {args.valid_size} leaves no CIFAR-10 training images")
    num_train = data.CIFAR_TRAIN_SIZE - (args.valid_size if args.holdout else 0)
    cli.check_batch_size(args.batch_size, min(args.limit or num_train, num_train),
                         'left by --limit' if args.limit and args.limit < num_train else
                         'that --holdout leaves of CIFAR-10' if args.holdout else 'of CIFAR-10')
    if args.threads:
        cli.check_threads(args.threads)
    if args.seed + args.seeds > 2 ** 32:
        raise cli.UserError(f"--seed {args.seed} with --seeds {args.seeds} goes past the largest seed, 2**32 - 1")
    return args


def step_bytes(widths, batch_size):
    """The memory of one training step of FastNet on the CPU, roughly: twice the float32 outputs of its layers
    (what backward keeps, and their gradients; 1.9x measured at batch 128)."""
    outputs = []
    model = FastNet(widths)
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda module, inputs, output: outputs.append(output.numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return 2 * 4 * sum(outputs) * batch_size


# ----------------------------------------------------------------------------- model

def batch_norm(channels):
    """Batch norm as airbench has it: the scale fixed at 1 (the next convolution can scale), only the shift trained;
    running statistics that forget fast (momentum 0.4: a schedule of a few hundred steps changes the weights fast)."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class ConvBlock(nn.Module):
    """(N, c_in, H, W) -> (N, c_out, H // 2, W // 2); pooling before the first BN halves its cost."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = batch_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = batch_norm(c_out)
        for conv in (self.conv1, self.conv2):
            # the first c_in filters pass their input channel through: a deep net that starts close to
            # identity maps trains fast from the first step
            nn.init.dirac_(conv.weight.data[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """Normalised images (N, 3, 32, 32) -> logits (N, 10)."""

    def __init__(self, widths=(64, 128, 256), num_classes=10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2)  # weights set by init_whitening and frozen; bias trained
        self.whiten.weight.requires_grad_(False)
        self.blocks = nn.Sequential(ConvBlock(24, widths[0]), ConvBlock(widths[0], widths[1]),
                                    ConvBlock(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        with torch.no_grad():  # unit-variance weights, the logits divided by the width: small at the start, and
            self.head.weight.div_(self.head.weight.std())  # the head's learning rate the same at any width

    @torch.no_grad()
    def init_whitening(self, images, eps=5e-4):
        """The 12 eigenvectors of the covariance of the 2x2x3 patches of `images` (N, 3, H, W), each scaled
        by 1/sqrt(eigenvalue), and their negatives (GELU keeps only one sign): the first layer outputs
        decorrelated, unit-variance features, which the net would otherwise spend epochs learning."""
        patches = F.unfold(images.float(), kernel_size=2).transpose(1, 2).reshape(-1, 12).double()
        patches = patches - patches.mean(dim=0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.blocks(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / x.shape[1]


# ----------------------------------------------------------------------------- augmentation

def augment(x, generator, translate=2, mirrored=None):
    """Flips and random translations, all on tensors: x (N, C, H, W) -> (N, C, H, W), the images where
    `mirrored` (N,) is True flipped left-right, then every image cut out of its reflect-padded copy at a
    random offset of up to `translate` pixels. `generator` lives on x's device."""
    n, c, h, w = x.shape
    if mirrored is not None:
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    if translate:
        padded = F.pad(x, (translate,) * 4, mode='reflect')
        dy, dx = torch.randint(0, 2 * translate + 1, (2, n, 1), generator=generator, device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
        images = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[images, channels, rows, cols]  # one gather for the whole batch
    return x


def alternating_flips(num_images, seed, device):
    """A function epoch -> (num_images,) bool, which training images that epoch sees mirrored: a random half in
    even epochs, the other half in odd ones. Over any two epochs every image is seen both ways, where random flips
    would show a quarter of them the same way twice."""
    first = torch.rand(num_images, generator=torch.Generator().manual_seed(seed)).to(device) < 0.5
    return lambda epoch: first ^ (epoch % 2 == 1)


def shift(x, dy, dx):
    """Translates images (N, C, H, W) by (dy, dx) pixels, filling in by reflection."""
    pad = max(abs(dy), abs(dx))
    h, w = x.shape[2:]
    return F.pad(x, (pad,) * 4, mode='reflect')[:, :, pad - dy:pad - dy + h, pad - dx:pad - dx + w]


class TTAModel(nn.Module):
    """Wraps a model for evaluation: logits averaged over the image and its mirror image (level 1); at level 2
    also over both shifted by one pixel up-left and down-right, weighted as airbench weights them (as if the
    test images were augmented: unshifted half the time, each shift a quarter): 6 views."""

    def __init__(self, model, level, autocast):
        super().__init__()
        self.model, self.level, self.autocast = model, level, autocast

    def mirror_average(self, x):
        return (self.model(x).float() + self.model(x.flip(3)).float()) / 2 if self.level else self.model(x).float()

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.mirror_average(x)
            if self.level >= 2:
                shifted = (self.mirror_average(shift(x, -1, -1)) + self.mirror_average(shift(x, 1, 1))) / 2
                logits = (logits + shifted) / 2
        return logits


# ----------------------------------------------------------------------------- optimisation

def make_optimizers(model, args):
    """The optimizers of `model`'s trainable parameters: Muon for the conv filter banks (4-D), or with --optimizer
    sgd, Nesterov SGD at --lr; Nesterov SGD for the rest: the head at --head-lr, the whitening and BN biases at
    --bias-lr, all with --weight-decay. Every param group keeps its peak lr in 'peak_lr' and in 'horizon' the
    fraction of the training over which its lr falls to 0 (WHITEN_BIAS_STEPS for the whitening bias, else 1)."""
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    biases = [p for name, p in model.named_parameters() if p.ndim == 1 and p.requires_grad and name != 'whiten.bias']
    sgd_groups = [dict(params=[model.head.weight], lr=args.head_lr), dict(params=biases, lr=args.bias_lr),
                  dict(params=[model.whiten.bias], lr=args.bias_lr, horizon=WHITEN_BIAS_STEPS)]
    if args.optimizer == 'sgd':
        sgd_groups.append(dict(params=filters, lr=args.lr))
    for group in sgd_groups:  # torch's weight decay is per step and times the lr: per image at the peak lr
        group['weight_decay'] = args.weight_decay * args.batch_size / group['lr']
    optimizers = [torch.optim.SGD(sgd_groups, lr=args.head_lr, momentum=args.momentum, nesterov=args.momentum > 0)]
    if args.optimizer == 'muon':
        optimizers.append(muon.Muon(filters, lr=args.muon_lr, momentum=args.muon_momentum,
                                    ns_steps=NEWTON_SCHULZ_STEPS))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['peak_lr'] = group['lr']
            group.setdefault('horizon', 1.0)
    return optimizers


def one_cycle(progress, warmup):
    """Learning-rate multiplier at `progress` (0 at the start, 1 at the end of training): linear from 0.1
    to 1 over the first `warmup` fraction, then linear down to 0."""
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    return max(0.0, (1 - progress) / (1 - warmup))


def set_lr(optimizers, progress, warmup):
    """Every param group's learning rate becomes its peak learning rate times one_cycle at `progress`, measured
    along the group's own horizon: the whitening bias's lr reaches 0 at WHITEN_BIAS_STEPS and stays there."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['lr'] = group['peak_lr'] * one_cycle(min(1.0, progress / group['horizon']), warmup)


def cpu_computes_bf16():
    """True on CPUs with bfloat16 arithmetic (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def autocast_for(device, precision):
    """A function that returns the autocast context of --precision on `device` (a no-op for fp32)."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[precision]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def make_train_step(model, optimizers, autocast, precision, label_smoothing, processes=1):
    """One optimisation step as a function: step(x (N, 3, 32, 32), y (N,)) -> the detached mean loss. The loss
    it differentiates is summed over the global batch (SGD's learning rates are per image): DDP averages the
    gradients of the `processes`, so each one's sum counts `processes` times. The caller sets the learning
    rates; fp16 scales the loss against underflow (GradScaler)."""
    scaler = torch.amp.GradScaler(enabled=precision == 'fp16')

    def step(x, y):
        with autocast():
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y,
                                   label_smoothing=label_smoothing, reduction='sum')
        model.zero_grad(set_to_none=True)
        scaler.scale(loss * processes).backward()
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        return loss.detach() / len(y)
    return step


@torch.no_grad()
def update_ema(ema, model, step, max_decay):
    """Every EMA_EVERY steps, ema <- decay * ema + (1 - decay) * model for the float tensors (weights, BN
    statistics), with decay = min(max_decay, (1 + step) / (10 + step)) ** EMA_EVERY: lower at first, so
    that the average soon forgets the random initial weights. Integer buffers (BN's counter) are copied."""
    if step % EMA_EVERY:
        return
    decay = min(max_decay, (1 + step) / (10 + step)) ** EMA_EVERY
    for average, current in zip(ema.state_dict().values(), model.state_dict().values()):
        if average.is_floating_point():
            average.lerp_(current, 1 - decay)
        else:
            average.copy_(current)


def shuffled_batches(num_images, local_batch, ranks, seed, device):
    """Endless (epoch, index mini-batch (local_batch,)) of this process: every epoch a new permutation of the
    training set, the same on every process (drawn from `seed`), cut into disjoint shards of equal size,
    one per process; the last batch of an epoch may be smaller."""
    generator = torch.Generator().manual_seed(seed)
    shard = num_images // ranks.world
    for epoch in itertools.count():
        order = torch.randperm(num_images, generator=generator).to(device)
        mine = order[ranks.rank:shard * ranks.world:ranks.world]
        for start in range(0, shard, local_batch):
            yield epoch, mine[start:start + local_batch]


# ----------------------------------------------------------------------------- evaluation

def evaluate(evaluated, dataset, holdout):
    """Test scores of `evaluated` (metrics.evaluate's dict), and with --holdout its validation accuracy."""
    test = metrics.evaluate(evaluated, dataset['test_x'], dataset['test_y'])
    if holdout:
        test['valid_acc'] = metrics.evaluate(evaluated, dataset['valid_x'], dataset['valid_y'])['accuracy']
    return test


class History:
    """The evaluations of one run along the way: lists of step, epoch, training seconds, SGD learning rate,
    mean training loss since the previous evaluation, test loss and accuracy, and validation accuracy."""

    def __init__(self, seed, steps_per_epoch, data_name):
        self.seed, self.steps_per_epoch, self.data_name = seed, steps_per_epoch, data_name
        self.points = {key: [] for key in ('step', 'epoch', 'seconds', 'lr', 'train_loss', 'test_loss', 'test_acc',
                                           'valid_acc')}

    def add(self, step, seconds, lr, losses, test):
        """Appends one evaluation (`losses`: the step losses since the previous one) and prints it; a
        non-finite training loss stops the run."""
        train_loss = float(torch.stack(losses).float().mean()) if losses else float('nan')
        point = {'step': step, 'epoch': step / self.steps_per_epoch, 'seconds': seconds, 'lr': lr,
                 'train_loss': train_loss, 'test_loss': test['loss'], 'test_acc': test['accuracy']}
        if 'valid_acc' in test:
            point['valid_acc'] = test['valid_acc']
        for key, value in point.items():
            self.points[key].append(value)
        print(f"seed {self.seed} epoch {point['epoch']:5.2f} | {seconds:7.1f} s | train loss {train_loss:.4f} | "
              f"test loss {test['loss']:.4f} acc {test['accuracy']:.2%} ({self.data_name})")
        if losses and not math.isfinite(train_loss):
            raise Diverged(f"the training loss became {train_loss} by epoch {point['epoch']:.2f}, step {step}; "
                           f"lower --lr or --muon-lr")

    def first(self, key, target):
        """The `key` ('seconds' of training, or 'epoch') of the first evaluation with a test accuracy >= target
        (None if none)."""
        return next((s for s, a in zip(self.points[key], self.points['test_acc']) if a >= target), None)


# ----------------------------------------------------------------------------- time budget

class Clock:
    """Seconds of training only: paused during evaluations; CUDA work is waited for before every reading."""

    def __init__(self, device):
        self.device, self.total, self.started = device, 0.0, None

    def _now(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self):
        self.started = self._now()

    def stop(self):
        self.total += self._now() - self.started
        self.started = None

    def seconds(self):
        return self.total + (self._now() - self.started if self.started is not None else 0.0)

    @contextlib.contextmanager
    def paused(self):
        self.stop()
        yield
        self.start()


def warm_up(train_step, model, optimizers, evaluated, dataset, local_batch, args, device):
    """Times `args.warmup_steps` training steps on the first training batch at the first step's learning
    rates, then undoes them; they also warm up the kernels. Then times the inference of `evaluated` on 500
    test images, twice (the first pays one-time setup), for an estimate of the final evaluation's seconds.
    Returns warmup_seconds (all of it), seconds_per_step and final_eval_seconds (the estimate)."""
    saved = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers]
    x, y = dataset['train_x'][:local_batch], dataset['train_y'][:local_batch]
    generator = torch.Generator(device=device).manual_seed(0)  # the steps are undone: any seed will do
    clock, step_seconds = Clock(device), []
    clock.start()
    set_lr(optimizers, 0.0, args.warmup)
    for _ in range(args.warmup_steps):
        started = clock.seconds()
        mirrored = torch.rand(len(x), generator=generator, device=device) < 0.5
        train_step(augment(x, generator, args.translate, mirrored), y).item()
        step_seconds.append(clock.seconds() - started)
    probe = dataset['test_x'][:500]
    for _ in range(2):
        started = clock.seconds()
        metrics.predict_logits(evaluated, probe)
    eval_images = len(dataset['test_x']) + len(dataset.get('valid_x', ()))  # --holdout: the validation set too
    final_eval_seconds = (clock.seconds() - started) * eval_images / len(probe)
    clock.stop()
    model.load_state_dict(saved[0])
    for optimizer, state in zip(optimizers, saved[1]):
        optimizer.load_state_dict(state)
    return {'warmup_seconds': clock.total, 'seconds_per_step': float(np.median(step_seconds[len(step_seconds) // 2:])),
            'final_eval_seconds': final_eval_seconds}


class Schedule:
    """How far training is, from 0 at the first step to 1 when it must stop: steps done / total steps, or
    under --time-budget, (training clock + one step) / training seconds, process 0's clock deciding for all.

    On a machine shared with other work the speed changes, and a step count fixed from the warm-up would
    overrun the budget, so a budgeted schedule follows the clock; the price is that the number of steps,
    hence the result, depends on the speed (it is recorded). total_steps is then an estimate."""

    def __init__(self, args, steps_per_epoch, speed, clock, ranks):
        self.clock, self.ranks, self.seconds_per_step = clock, ranks, speed['seconds_per_step']
        self.seconds = None
        if args.time_budget:
            self.seconds = args.time_budget - speed['warmup_seconds'] - speed['final_eval_seconds']
            if self.seconds <= 0:
                raise cli.UserError(f"--time-budget {args.time_budget:g} s is used up by the warm-up "
                                    f"({speed['warmup_seconds']:.1f} s) and the final evaluation "
                                    f"(~{speed['final_eval_seconds']:.1f} s)")
            self.total_steps = max(1, int(self.seconds / self.seconds_per_step))
        else:
            self.total_steps = max(1, round(args.epochs * steps_per_epoch))

    def progress(self, step):
        if self.seconds is None:
            return step / self.total_steps
        done = torch.tensor([(self.clock.seconds() + self.seconds_per_step) / self.seconds], dtype=torch.float64)
        self.ranks.broadcast_([done])
        return min(1.0, done.item())


def make_model(args, dataset, device, ranks):
    """FastNet with its whitening from the first 5000 training images, the same on every process."""
    model = FastNet(args.widths, len(dataset['class_names']))
    model.init_whitening(dataset['train_x'][:5000].cpu())  # same images, same arithmetic on every process
    model = model.to(device, memory_format=torch.channels_last)
    ranks.broadcast_(model.state_dict().values())  # bit-identical starting weights
    return model


def state_sha256(state):
    """Fingerprint of a state_dict: equal on every process iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_fingerprints(model, ema, ranks):
    """[{model_sha256, ema_sha256}] of every process (process 0's list; None elsewhere), BN statistics
    averaged first: equal entries mean the processes ended with bit-identical weights."""
    ranks.average_(model.buffers())
    return ranks.gather_objects({'model_sha256': state_sha256(model.state_dict()),
                                 'ema_sha256': state_sha256(ema.state_dict())})


# ----------------------------------------------------------------------------- training

def trainer(args, dataset, seed, device, ranks):
    """Builds the model of `seed` and its optimizers and warms up, which sizes the schedule (a --time-budget
    that the warm-up uses up is a UserError here, before any training). Returns train(), which trains the
    model and returns its results (on process 0; None on the others)."""
    cli.seed_everything(seed)
    load_at_start = os.getloadavg()  # other work on the machine slows training: say how much there was
    train_x, train_y = dataset['train_x'], dataset['train_y']
    autocast = autocast_for(device, args.precision)
    model = make_model(args, dataset, device, ranks)
    trained = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ranks.world > 1 else model
    optimizers = make_optimizers(model, args)
    train_step = make_train_step(trained, optimizers, autocast, args.precision, args.label_smoothing, ranks.world)
    local_batch = args.batch_size // ranks.world
    steps_per_epoch = math.ceil(len(train_x) // ranks.world / local_batch)
    speed = warm_up(train_step, model, optimizers, TTAModel(model, args.tta, autocast), dataset, local_batch, args,
                    device)
    clock = Clock(device)
    schedule = Schedule(args, steps_per_epoch, speed, clock, ranks)

    def train():
        ema = copy.deepcopy(model).eval() if args.ema > 0 else model
        # the evaluations along the way see each test image once, the final one with --tta's views (as airbench)
        along_the_way, final = TTAModel(ema, 0, autocast), TTAModel(ema, args.tta, autocast)
        history = History(seed, steps_per_epoch, dataset['name'])
        batches = shuffled_batches(len(train_x), local_batch, ranks, seed, device)
        flips = alternating_flips(len(train_x), seed, device)
        augment_generator = torch.Generator(device=device).manual_seed(seed * 1000 + ranks.rank)  # differs per process
        eval_steps = max(1, round(args.eval_every * steps_per_epoch))
        if ranks.main:
            print(f"seed {seed}: warm-up {speed['warmup_seconds']:.1f} s ({speed['seconds_per_step']:.3f} s/step, "
                  f"final evaluation ~{speed['final_eval_seconds']:.1f} s); {'about ' if args.time_budget else ''}"
                  f"{schedule.total_steps} steps = {schedule.total_steps / steps_per_epoch:.2f} epochs")
        bar = None  # process 0's progress bar up to the next evaluation, which closes it before printing its line

        def position():  # of the bar: training seconds under a time budget, else steps
            return round(clock.seconds()) if args.time_budget else step

        def evaluate_now(step, losses, evaluated):
            """Scores `evaluated` on process 0 (BN statistics averaged over the processes first)."""
            nonlocal bar
            if bar is not None:
                bar.close()
                bar = None
            ranks.average_(ema.buffers())  # the weights are identical on every process already
            test = evaluate(evaluated, dataset, args.holdout) if ranks.main else None
            if ranks.main:
                history.add(step, clock.seconds(), optimizers[0].param_groups[0]['lr'], losses, test)
            losses.clear()
            ranks.barrier()
            return test

        step, losses = 0, []
        clock.start()
        while (progress := schedule.progress(step)) < 1:
            if ranks.main and bar is None:
                bar = cli.progress_bar(round(schedule.seconds) if args.time_budget else schedule.total_steps,
                                       initial=position(), unit='s' if args.time_budget else 'step',
                                       desc=f"seed {seed}")
            epoch, indices = next(batches)
            x = augment(train_x[indices], augment_generator, args.translate, mirrored=flips(epoch)[indices])
            set_lr(optimizers, progress, args.warmup)
            losses.append(train_step(x, train_y[indices]))
            step += 1
            if ema is not model:
                update_ema(ema, model, step, args.ema)
            if bar is not None:
                bar.update(position() - bar.n)
            if step % eval_steps == 0 and schedule.progress(step) < 1:
                with clock.paused():
                    evaluate_now(step, losses, along_the_way)
        clock.stop()
        final_eval = Clock(device)  # the final evaluation is part of the budget
        final_eval.start()
        test = evaluate_now(step, losses, final)
        final_eval.stop()

        fingerprints = weight_fingerprints(model, ema, ranks)
        if not ranks.main:
            return None
        return run_results(seed, history, metrics.summary(test, dataset['class_names']), speed, step, steps_per_epoch,
                           args.batch_size, final_eval.total, load_at_start, fingerprints, ema)
    return train


def run_results(seed, history, test, speed, steps, steps_per_epoch, batch_size, final_eval_seconds, load_at_start,
                fingerprints, ema):
    """The record of one trained model: speed, load, times to the TARGETS, history, test scores (metrics.summary's
    dict), weights."""
    train_seconds = history.points['seconds'][-1]
    return {'seed': seed, 'load_average_at_start': load_at_start, 'load_average_at_end': os.getloadavg(),
            'steps': steps, 'epochs': steps / steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
            'warmup_seconds': speed['warmup_seconds'], 'warmup_seconds_per_step': speed['seconds_per_step'],
            'train_seconds': train_seconds, 'final_eval_seconds': final_eval_seconds,
            'estimated_final_eval_seconds': speed['final_eval_seconds'],
            'budget_seconds': speed['warmup_seconds'] + train_seconds + final_eval_seconds,
            'images_per_second': steps * batch_size / train_seconds,
            'seconds_to_accuracy': {f'{t:.0%}': history.first('seconds', t) for t in TARGETS},
            'epochs_to_accuracy': {f'{t:.0%}': history.first('epoch', t) for t in TARGETS},
            'test': test, 'history': history.points,
            'weights_sha256_per_process': fingerprints,
            'state_dict': {name: value.cpu() for name, value in ema.state_dict().items()}}


# ----------------------------------------------------------------------------- runs and seeds

def load_data(args, device):
    prepared = data.prepare_cifar10(args.data_dir, valid_size=args.valid_size)
    train_x, train_y = prepared['train_x'], prepared['train_y']
    if not args.holdout:
        train_x = np.concatenate([train_x, prepared['valid_x']])
        train_y = np.concatenate([train_y, prepared['valid_y']])
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    tensors = {'train_x': train_x, 'train_y': train_y, 'test_x': prepared['test_x'], 'test_y': prepared['test_y']}
    if args.holdout:
        tensors.update(valid_x=prepared['valid_x'], valid_y=prepared['valid_y'])
    dataset = {key: torch.from_numpy(value).to(device) for key, value in tensors.items()}
    dataset['name'] = 'CIFAR-10' if prepared['originals'] else 'CIFAR-10 (JPEG stand-in)'
    dataset['class_names'] = prepared['class_names']
    return dataset


def summarise(runs):
    accuracy = np.array([run['test']['accuracy'] for run in runs])
    summary = {'seeds': [run['seed'] for run in runs], 'test_accuracy_mean': accuracy.mean(),
               'test_accuracy_std': accuracy.std(ddof=1) if len(runs) > 1 else 0.0,
               'train_seconds_mean': float(np.mean([run['train_seconds'] for run in runs])),
               'epochs_mean': float(np.mean([run['epochs'] for run in runs])),
               'images_per_second_mean': float(np.mean([run['images_per_second'] for run in runs]))}
    # time to a mean accuracy: the first evaluation (same steps for every seed) where the mean reaches it
    curves = [run['history'] for run in runs]
    if len({len(c['test_acc']) for c in curves}) == 1:
        mean_acc = np.mean([c['test_acc'] for c in curves], axis=0)
        for key, name in (('seconds', 'seconds_to_mean_accuracy'), ('epoch', 'epochs_to_mean_accuracy')):
            mean = np.mean([c[key] for c in curves], axis=0)
            summary[name] = {f'{t:.0%}': next((float(m) for m, a in zip(mean, mean_acc) if a >= t), None)
                             for t in TARGETS}
    return summary


def print_run(run, data_name):
    print(f"seed {run['seed']}: test accuracy {run['test']['accuracy']:.2%} ({data_name}) after "
          f"{run['train_seconds']:.1f} s of training ({run['epochs']:.2f} epochs, {run['images_per_second']:.0f} img/s; "
          f"{run['budget_seconds']:.1f} s with warm-up and final evaluation; load average "
          f"{run['load_average_at_start'][0]:.2f} -> {run['load_average_at_end'][0]:.2f}); seconds (epochs) to "
          + ', '.join(f"{target}: {reached(seconds, run['epochs_to_accuracy'][target])}"
                      for target, seconds in run['seconds_to_accuracy'].items()))


def reached(seconds, epochs):
    return '-' if seconds is None else f'{seconds:.1f} ({epochs:.2f})'


def main(argv=None):
    args = parse_args(argv)
    device = cli.torch_device(args.device)
    if args.precision == 'auto':
        args.precision = 'bf16' if device.type == 'cuda' or cpu_computes_bf16() else 'fp32'
    if args.precision == 'fp16' and device.type != 'cuda':
        raise cli.UserError("--precision fp16 needs --device cuda; on the CPU use bf16 or fp32")
    ranks = distributed.Distributed(device)
    device = ranks.device
    if args.batch_size % ranks.world:
        raise cli.UserError(f"--batch-size {args.batch_size} is not divisible by the {ranks.world} processes")
    # before any data is loaded: the images as load_data holds them at most (the training images twice while it
    # joins the validation images to them), and a training step where it is in this memory, not a GPU's
    cli.check_memory(f"CIFAR-10 with --batch-size {args.batch_size}", (2 * data.CIFAR_TRAIN_SIZE + 10_000) * 3072 * 4
                     + (step_bytes(args.widths, args.batch_size // ranks.world) if device.type == 'cpu' else 0))
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // ranks.local_world))
    load_at_start = os.getloadavg()
    dataset = load_data(args, device)
    cli.check_batch_size(args.batch_size, len(dataset['train_y']), f"in {args.data_dir}")
    if ranks.main:
        print(f"{dataset['name']}: training on {len(dataset['train_x'])} images, testing on {len(dataset['test_x'])}; "
              f"{ranks.world} process(es), {torch.get_num_threads()} thread(s) each, {device}, {args.precision}, "
              f"{args.optimizer}; load average {load_at_start[0]:.2f}")
    train = trainer(args, dataset, args.seed, device, ranks)  # before the folder: a budget the warm-up uses up leaves none
    with cli.run_folder(args, SCRIPT, argv, resumable=False) if ranks.main else contextlib.nullcontext() as run_dir:
        config = vars(args) | {'world_size': ranks.world, 'threads_per_process': torch.get_num_threads(),
                               'device': str(device)}
        results = {'script': f'{SCRIPT}.py', 'config': config, 'machine': cli.machine(), 'data': dataset['name'],
                   'load_average_at_start': load_at_start, 'runs': []}
        for seed in range(args.seed, args.seed + args.seeds):
            if seed != args.seed:
                train = trainer(args, dataset, seed, device, ranks)
            run = train()
            if ranks.main:
                checkpoint.save_torch(os.path.join(run_dir, f'model_seed{seed}.pt'), run.pop('state_dict'))
                results['runs'].append(run)
                results['test'] = results['runs'][0]['test']  # the model of --seed, as a run of that seed alone has it
                results['summary'] = summarise(results['runs'])
                results['load_average_at_end'] = os.getloadavg()
                cli.write_json(os.path.join(run_dir, 'results.json'), results)
                plot_time_to_accuracy(os.path.join(run_dir, 'time_to_accuracy.png'),
                                      {f"seed {r['seed']}": r['history'] for r in results['runs']}, TARGETS,
                                      title=f"{dataset['name']}: FastNet {'/'.join(map(str, args.widths))}, "
                                            f"{args.optimizer}, {device.type}")
                print_run(run, dataset['name'])
    if ranks.main:
        s = results['summary']
        print(f"{dataset['name']}: test accuracy {s['test_accuracy_mean']:.2%} +- {s['test_accuracy_std']:.2%} "
              f"over {len(s['seeds'])} seed(s); load average {load_at_start[0]:.2f} at start, "
              f"{results['load_average_at_end'][0]:.2f} at end; wrote {run_dir}")
    ranks.close()


if __name__ == '__main__':
    cli.run(main)
