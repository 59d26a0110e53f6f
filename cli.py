"""Command-line plumbing shared by every script: arguments, one-line errors, seeds, run folders, JSON."""
import argparse
import datetime
import json
import os
import random
import sys

import numpy as np


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_common_args(parser, seed=42):
    """--data-dir, --save-dir, --run-name, --overwrite and --seed, the same in every script."""
    parser.add_argument('--data-dir', default=os.environ.get('DATA_DIR', 'data'),
                        help='folder holding the data sets (default: $DATA_DIR, else ./data)')
    parser.add_argument('--save-dir', default='runs', help='each run writes into <save-dir>/<run-name>/ (default: runs)')
    parser.add_argument('--run-name', default=None, help='name of this run\'s folder (default: <script>-<date>-<time>)')
    parser.add_argument('--overwrite', action='store_true', help='reuse an existing run folder of the same name')
    parser.add_argument('--seed', type=int, default=seed, help=f'random seed (default: {seed})')


def make_run_dir(save_dir, run_name, script, overwrite=False):
    """Creates <save_dir>/<run_name> and returns it; an existing folder is never reused silently."""
    if run_name is None:
        run_name = f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = os.path.join(save_dir, run_name)
    if os.path.exists(run_dir) and not overwrite:
        raise UserError(f"run folder {run_dir} exists; pick another --run-name or pass --overwrite")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    if 'torch' in sys.modules:
        sys.modules['torch'].manual_seed(seed)


def write_json(path, obj):
    """Writes JSON atomically: a reader never sees half a file."""
    tmp_path = path + '.tmp'
    with open(tmp_path, 'w') as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write('\n')
    os.replace(tmp_path, path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def run(main):
    """Calls main(); a UserError (or ValueError from bad data) becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- MNIST training flags (tasks 1-3)

LAB_LR_POLICY = '1:0.1,3:0.01,5:0.001,7:0.0001'
LAB_SWEEP = [1e-3, 1e-2, 1e-1]


def parse_lr_policy(text):
    """'1:0.1,3:0.01' -> {1: 0.1, 3: 0.01}: each learning rate holds from its epoch until the next entry."""
    policy = {}
    try:
        for item in text.split(','):
            epoch, lr = item.split(':')
            policy[int(epoch)] = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form 'epoch:lr,epoch:lr,...', e.g. {LAB_LR_POLICY}")
    if 1 not in policy:
        raise argparse.ArgumentTypeError(f"{text!r} must give a learning rate for epoch 1")
    if min(policy) < 1 or not all(lr > 0 and np.isfinite(lr) for lr in policy.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: epochs must be >= 1 and learning rates positive")
    return dict(sorted(policy.items()))


def lr_at(policy, epoch):
    """The learning rate of `epoch` (1-based) under a policy from parse_lr_policy."""
    return policy[max(start for start in policy if start <= epoch)]


def add_mnist_training_args(parser, dtype='float32', weight_decay=None):
    """The lab's MNIST training configuration, shared by train.py, train_l2reg.py and train_pytorch.py."""
    parser.add_argument('--epochs', type=positive_int, default=8, help='number of epochs (default: 8)')
    parser.add_argument('--batch-size', type=positive_int, default=50, help='mini-batch size (default: 50)')
    parser.add_argument('--lr-policy', type=parse_lr_policy, default=parse_lr_policy(LAB_LR_POLICY),
                        help=f"SGD learning rate per epoch as 'epoch:lr,...' (default: {LAB_LR_POLICY})")
    parser.add_argument('--dtype', choices=['float32', 'float64'], default=dtype, help=f'(default: {dtype})')
    parser.add_argument('--limit', type=positive_int, default=None,
                        help='train on the first N training images only (quick runs)')
    parser.add_argument('--no-shuffle', action='store_true',
                        help='fixed data order: the same batches in every epoch and in every framework')
    if weight_decay is not None:
        parser.add_argument('--weight-decay', type=non_negative_float, default=weight_decay,
                            help=f'L2 lambda on the conv1, conv2 and fc3 weights (default: {weight_decay})')
        parser.add_argument('--sweep', type=non_negative_float, nargs='*', default=None,
                            help=f'train one model per lambda and compare them (no values: the lab\'s {LAB_SWEEP})')
