"""Command-line plumbing shared by every script: arguments, one-line errors, seeds, run folders, JSON,
atomic writes, progress bars, and stopping (Ctrl-C, SIGTERM) with a hint on how to resume."""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import tempfile

import numpy as np
from tqdm import tqdm


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


def seed_value(text):
    """A seed that NumPy and PyTorch both accept: an integer 0 <= seed < 2**32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**32 - 1, got {value}")
    return value


def run_name(text):
    """A name for one folder: no path separators, not '.' or '..', at most 100 printable characters."""
    if not text or len(text) > 100 or not text.isprintable() or text in ('.', '..') \
            or any(sep in text for sep in ('/', os.sep)):
        shown = text if len(text) <= 40 else text[:40] + '...'
        raise argparse.ArgumentTypeError(f"{shown!r} is not a folder name of 1 to 100 printable characters without '/'")
    return text


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


def add_common_args(parser, resume=False):
    """--data-dir, --save-dir, --run-name, --overwrite and --seed, the same in every script; --resume too for
    scripts that write checkpoints and read their flags with parse_args."""
    parser.add_argument('--data-dir', default=os.environ.get('DATA_DIR', 'data'),
                        help='folder holding the data sets (default: $DATA_DIR, else ./data)')
    parser.add_argument('--save-dir', default='runs', help='each run writes into <save-dir>/<run-name>/ (default: runs)')
    parser.add_argument('--run-name', type=run_name, default=None,
                        help="name of this run's folder (default: <script>-<date>-<time>)")
    parser.add_argument('--overwrite', action='store_true', help='reuse an existing run folder of the same name')
    parser.add_argument('--seed', type=seed_value, default=42, help='random seed (default: 42)')
    if resume:
        parser.add_argument('--resume', metavar='RUN_DIR', default=None,
                            help='continue a stopped run from its last checkpoint, with the flags it was started '
                                 'with (saved in RUN_DIR/config.json)')


CONFIG = 'config.json'  # in every run folder: the script and its command line, what --resume reads


def parse_args(parser, script, argv=None):
    """parser.parse_args(argv); with --resume RUN_DIR, the flags that run was started with instead.

    Flags given next to --resume must agree with the saved ones (--data-dir may differ: data can move).
    Also refuses, before any work, a --save-dir that is not a folder and a --run-name whose folder exists
    (without --overwrite).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume is None:
        _check_save_dir(args.save_dir)
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


def _check_save_dir(save_dir):
    """A UserError unless save_dir is a folder or can be made one (no file on its path), checked before any
    work: a run should not load its data only to fail when it makes its folder."""
    existing = os.path.abspath(save_dir)
    while not os.path.exists(existing):  # the nearest part of the path that is there already
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--save-dir {save_dir}: {existing} is a file, not a folder")


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
    try:
        write_json(os.path.join(run_dir, CONFIG), {'script': f'{script}.py',
                                                   'argv': sys.argv[1:] if argv is None else list(argv),
                                                   'args': vars(args)})
    except BaseException:  # a full disk: a folder without config.json would only block its name
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)  # only if empty: a folder reused with --overwrite keeps what it holds
        raise
    return run_dir


def make_run_dir(save_dir, name, script, overwrite=False):
    """Creates <save_dir>/<name> and returns it. The folder is claimed with one os.mkdir, so of two runs
    started at once with the same name exactly one gets it; a default name (None) takes a free suffix."""
    os.makedirs(save_dir, exist_ok=True)
    base = name or f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(1, 100):
        run_dir = os.path.join(save_dir, base if attempt == 1 else f'{base}-{attempt}')
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            if overwrite and os.path.isdir(run_dir):
                return run_dir
            if name is not None:
                raise UserError(f"run folder {run_dir} exists; pick another --run-name or pass --overwrite")
    raise UserError(f"no free run folder name {base}-N in {save_dir}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    if 'torch' in sys.modules:
        sys.modules['torch'].manual_seed(seed)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; mkstemp's files are private (0600)


def atomic_write(path, write):
    """Calls write(tmp_path) for a new temporary file beside `path` (with its extension), flushes it to the
    disk and renames it to `path`: a crash, a kill or a full disk leaves the old file or the new one under
    that name, never half of one. The temporary name is unique, so two processes never share it."""
    folder, name = os.path.split(path)
    handle, tmp_path = tempfile.mkstemp(dir=folder or '.', prefix=f'.{name}.', suffix=os.path.splitext(name)[1])
    os.close(handle)
    try:
        os.chmod(tmp_path, FILE_MODE)
        write(tmp_path)
        with open(tmp_path, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise
    if os.name == 'posix':  # the rename itself reaches the disk with the folder's entry
        descriptor = os.open(folder or '.', os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_text(path, text):
    """Writes a text file atomically."""
    def write(tmp_path):
        with open(tmp_path, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def json_text(obj, indent=None):
    """obj as JSON text; NaN and infinities become null (JSON has neither), so the text is always valid JSON."""
    return json.dumps(_finite(obj), indent=indent, default=json_default, allow_nan=False)


def write_json(path, obj):
    """Writes JSON atomically; NaN and infinities become null, so the file is always valid JSON."""
    write_text(path, json_text(obj, indent=2) + '\n')


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return _finite(obj.tolist())
    return obj


def json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def progress_bar(total, **options):
    """A tqdm bar on stderr, shown only when stderr is a terminal: a log file gets whole lines, never bars."""
    return tqdm(total=total, leave=False, disable=None, dynamic_ncols=True, **options)


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
    """Turns Ctrl-C / SIGTERM inside the block into Interrupted, and a failed write (a full disk) into a
    UserError, each saying how to resume the run in run_dir."""
    hint = f"the last checkpoint is in {run_dir}; continue with: python {script}.py --resume {run_dir}"
    try:
        yield
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; {hint}", signum) from None
    except OSError as error:
        raise UserError(f"{error}; {hint}") from None


def run(main):
    """Calls main(); a UserError becomes one line on stderr and exit code 2; Ctrl-C and SIGTERM one line
    (with resume_hint, how to resume) and exit code 128 + the signal's number."""
    signal.signal(signal.SIGINT, _on_signal)  # also where the shell started us ignoring it
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        main()
    except OSError as error:  # a full disk, a folder we may not write: one line too
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
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
    """--device cpu|cuda|auto -> torch.device; cuda without a GPU is a UserError, auto falls back to the CPU."""
    import torch
    if choice == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(choice)
