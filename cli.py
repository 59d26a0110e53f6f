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
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
