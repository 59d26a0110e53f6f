"""Command-line plumbing shared by every script: arguments, one-line errors, seeds, run folders, JSON,
atomic writes, and stopping (Ctrl-C, SIGTERM) with a hint on how to resume."""
import argparse
import contextlib
import datetime
import json
import os
import random
import signal
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


def _float(text, accept, requirement):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not (accept(value) and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_float(text):
    return _float(text, lambda value: value > 0, 'a positive number')


def non_negative_float(text):
    return _float(text, lambda value: value >= 0, 'a number >= 0')


def add_common_args(parser, seed=42, resume=False):
    """--data-dir, --save-dir, --run-name, --overwrite and --seed, the same in every script; --resume too for
    scripts that write checkpoints and read their flags with parse_args."""
    parser.add_argument('--data-dir', default=os.environ.get('DATA_DIR', 'data'),
                        help='folder holding the data sets (default: $DATA_DIR, else ./data)')
    parser.add_argument('--save-dir', default='runs', help='each run writes into <save-dir>/<run-name>/ (default: runs)')
    parser.add_argument('--run-name', default=None, help='name of this run\'s folder (default: <script>-<date>-<time>)')
    parser.add_argument('--overwrite', action='store_true', help='reuse an existing run folder of the same name')
    parser.add_argument('--seed', type=int, default=seed, help=f'random seed (default: {seed})')
    if resume:
        parser.add_argument('--resume', metavar='RUN_DIR', default=None,
                            help='continue a stopped run from its last checkpoint, with the flags it was started '
                                 'with (saved in RUN_DIR/config.json)')


CONFIG = 'config.json'  # in every run folder: the script and its command line, what --resume reads


def parse_args(parser, script, argv=None):
    """parser.parse_args(argv); with --resume RUN_DIR, the flags that run was started with instead.

    Flags given next to --resume must agree with the saved ones (--data-dir may differ: data can move).
    Also refuses, before any work, a --run-name whose folder exists (without --overwrite).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume is None:
        if args.run_name is not None and os.path.exists(os.path.join(args.save_dir, args.run_name)) \
                and not args.overwrite:
            raise UserError(f"run folder {os.path.join(args.save_dir, args.run_name)} exists; pick another "
                            f"--run-name, pass --overwrite, or continue it with --resume")
        return args
    run_dir = args.resume
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: no such run folder")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--resume {run_dir}: no {CONFIG} in it, so it is not a run folder of these scripts")
    except (OSError, ValueError) as error:
        raise UserError(f"--resume {run_dir}: cannot read {config_path} ({error})")
    if not (isinstance(config, dict) and isinstance(config.get('argv'), list)
            and all(isinstance(arg, str) for arg in config['argv'])):
        raise UserError(f"--resume {run_dir}: {config_path} has no command line ('argv')")
    if config.get('script') != f'{script}.py':
        raise UserError(f"--resume {run_dir}: that is a run of {config.get('script')}, not of {script}.py")
    saved = parser.parse_args(config['argv'])
    given = _explicit_flags(parser, argv)
    for dest, value in given.items():
        if dest not in ('resume', 'data_dir') and value != getattr(saved, dest):
            flag = next(action.option_strings[0] for action in parser._actions if action.dest == dest)
            raise UserError(f"--resume {run_dir}: {flag} {_show(value)} differs from the run's "
                            f"{_show(getattr(saved, dest))} (in {config_path}); leave {flag} out to resume, "
                            f"or start a new run")
    saved.resume = run_dir
    saved.data_dir = given.get('data_dir', saved.data_dir)
    return saved


def _explicit_flags(parser, argv):
    """{dest: value} of the flags argv gives, leaving out the defaults."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in defaults.items():
            action.default = default


def _show(value):
    if isinstance(value, dict):  # an lr policy
        return ','.join(f'{key}:{item:g}' for key, item in value.items())
    return 'on' if value is True else 'off' if value is False else str(value)


def open_run_dir(args, script, argv=None):
    """The run's folder: --resume's, or a new one (make_run_dir) with config.json, from which --resume restarts."""
    if args.resume is not None:
        return args.resume
    run_dir = make_run_dir(args.save_dir, args.run_name, script, args.overwrite)
    write_json(os.path.join(run_dir, CONFIG), {'script': f'{script}.py',
                                               'argv': sys.argv[1:] if argv is None else list(argv),
                                               'args': vars(args)})
    return run_dir


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


def atomic_write(path, write, mode='wb', **open_args):
    """Calls write(file) on `path`.tmp, flushes it to the disk and renames it to `path`: a crash, a kill
    or a full disk leaves the old file or the new one under that name, never half of one."""
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, mode, **open_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise
    if os.name == 'posix':  # the rename itself reaches the disk with the folder's entry
        folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json(path, obj):
    """Writes JSON atomically: a reader never sees half a file."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_json_default) + '\n'), mode='w')


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a shutdown, `kill`), raised like Ctrl-C's KeyboardInterrupt so that both stop a run alike."""


def _interruption(signum):
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


# Inside a training loop a signal must not land between two parameter updates of one SGD step, or the
# weights it would save belong to no step at all. So there the first SIGINT/SIGTERM is only noted, and
# the loop asks for it between steps (stop_requested), saves its state and stops (stop).
_deferring = 0          # how many stop_between_steps() blocks are open
_pending_signal = None  # the signal noted there and not yet acted upon


def _on_signal(signum, frame):
    global _pending_signal
    if _deferring and _pending_signal is None:
        _pending_signal = signum  # no print here: the handler may run inside a write to stderr
        return
    _pending_signal = None
    raise _interruption(signum)


@contextlib.contextmanager
def stop_between_steps():
    """A training loop's block in which the first Ctrl-C / SIGTERM waits for the loop: the loop checks
    stop_requested() before each step, saves a checkpoint of where it stands and calls stop(). A second
    signal stops at once (the last checkpoint saved is then what resumes). A signal still waiting when
    the block ends stops the program there. Only scripts started through run() defer signals."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _pending_signal is not None:
        stop()


def stop_requested():
    return _pending_signal is not None


def stop():
    """Raises the interruption (KeyboardInterrupt, or Terminated) of the signal that stop_requested() saw."""
    global _pending_signal
    signum, _pending_signal = _pending_signal, None
    raise _interruption(signum)


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says how to resume it."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def resume_hint(script, run_dir):
    """Turns Ctrl-C / SIGTERM inside the block into Interrupted, saying how to resume the run in run_dir."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; the last checkpoint is in {run_dir}; "
                          f"continue with: python {script}.py --resume {run_dir}", signum) from None


def run(main):
    """Calls main(); a UserError becomes one line on stderr and exit code 2; Ctrl-C and SIGTERM one line
    (with resume_hint, how to resume) and exit code 128 + the signal's number."""
    signal.signal(signal.SIGINT, _on_signal)  # also where the shell started us ignoring it
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as interrupt:
        newline = '\n' if sys.stderr.isatty() else ''  # below the progress bar, and the ^C the terminal echoed
        print(f"{newline}interrupted: {interrupt}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    except KeyboardInterrupt as interrupt:  # before the run folder exists: nothing to resume
        print("interrupted", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT))


def torch_device(choice):
    """--device cpu|cuda|auto -> torch.device; cuda without a GPU is a UserError, auto falls back and says so."""
    import torch
    if choice == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'cpu'
        if choice == 'cpu':
            print("device auto: no CUDA GPU found, training on the CPU")
    return torch.device(choice)


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
    parser.add_argument('--valid-size', type=positive_int, default=5000,
                        help='the last N training images are held out for validation (default: 5000)')
    if weight_decay is not None:
        parser.add_argument('--weight-decay', type=non_negative_float, default=weight_decay,
                            help=f'L2 lambda on the conv1, conv2 and fc3 weights (default: {weight_decay})')
        parser.add_argument('--sweep', type=non_negative_float, nargs='*', default=None,
                            help=f'train one model per lambda and compare them (no values: the lab\'s {LAB_SWEEP})')
