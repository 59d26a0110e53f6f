"""Command-line plumbing shared by every script: flags, one-line errors, run folders, JSON and atomic
writes, progress bars, and stopping on Ctrl-C or SIGTERM with a hint on how to go on.

A training script's main() reads:

    args = cli.parse_args(make_parser(), SCRIPT, argv)     # or, with --resume, the flags the run started with
    data = load_the_data(args)                              # before the folder: a bad file leaves nothing behind
    with cli.run_folder(args, SCRIPT, argv) as run_dir:    # claimed, locked, config.json written
        train_model(args, data, run_dir)

and cli.run(main) turns a UserError into one line on stderr and exit code 2, and Ctrl-C / SIGTERM into
one line with the resume hint and exit code 128 + the signal's number.
"""
import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile

import numpy as np
from tqdm import tqdm

import readback
from errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- flags

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
    if not (accept(value) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_float(text):
    return _float(text, lambda value: value > 0, 'a positive number')


def non_negative_float(text):
    return _float(text, lambda value: value >= 0, 'a number >= 0')


def lr_policy(text):
    """'1:0.1,3:0.01' -> {1: 0.1, 3: 0.01}: each learning rate holds from its epoch until the next entry."""
    policy = {}
    try:
        for item in text.split(','):
            epoch, lr = item.split(':')
            policy[int(epoch)] = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form 'epoch:lr,epoch:lr,...', e.g. 1:0.1,3:0.01")
    if 1 not in policy:
        raise argparse.ArgumentTypeError(f"{text!r} must give a learning rate for epoch 1")
    if min(policy) < 1 or not all(lr > 0 and math.isfinite(lr) for lr in policy.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: epochs must be >= 1 and learning rates positive")
    return dict(sorted(policy.items()))


def layers_choice(text):
    """--layers: 'textbook', 'fast', or an existing .py file or folder (a student's layers.py)."""
    if text in ('textbook', 'fast') or os.path.isdir(text) or (os.path.isfile(text) and text.endswith('.py')):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not textbook, fast, or a layers.py file or folder")


# The flags that several scripts share, defined once; a script names the ones it has (add_flags) and gives
# its own defaults. A flag of one script alone is that script's own parser.add_argument.
FLAGS = {
    'data_dir': dict(default=os.environ.get('DATA_DIR', 'data'),
                     help='folder holding the data sets (default: $DATA_DIR, else ./data)'),
    'save_dir': dict(default='runs', help='each run writes into <save-dir>/<run-name>/ (default: %(default)s)'),
    'run_name': dict(type=run_name, help="name of this run's folder (default: <script>-<date>-<time>)"),
    'overwrite': dict(action='store_true', help='reuse an existing run folder of the same name'),
    'resume': dict(metavar='RUN_DIR', help='continue a stopped run from its last checkpoint, with the flags it was '
                                           'started with (saved in RUN_DIR/config.json)'),
    'seed': dict(type=seed_value, default=42, help='random seed (default: %(default)s)'),
    'device': dict(choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='auto: the GPU if there is one, else the CPU (default: %(default)s)'),
    'epochs': dict(type=positive_int, help='training epochs (default: %(default)s)'),
    'batch_size': dict(type=positive_int, help='mini-batch size (default: %(default)s)'),
    'limit': dict(type=positive_int, help='train on the first N training images only (quick runs)'),
    'valid_size': dict(type=positive_int, help='training images held out for validation (default: %(default)s)'),
    'lr_policy': dict(type=lr_policy, help="SGD learning rate per epoch as 'epoch:lr,...' (default: %(default)s)"),
    'lr': dict(type=positive_float, help='SGD learning rate of the first epoch (default: %(default)s)'),
    'gamma': dict(type=positive_float, help='ExponentialLR: the learning rate is multiplied by this after every '
                                            'epoch (default: %(default)s)'),
    'weight_decay': dict(type=non_negative_float, help='L2 lambda on the weights, not the biases (default: '
                                                       '%(default)s)'),
    'padding': dict(type=int, choices=[0, 1, 2], help='zero padding of both 5x5 convolutions; 2 keeps 32x32 maps '
                                                      '(default: %(default)s)'),
    'dtype': dict(choices=['float32', 'float64'], default='float32', help='(default: %(default)s)'),
    'no_shuffle': dict(action='store_true', help='the training images in their file order in every epoch, '
                                                 'instead of a new random order each epoch'),
    'layers': dict(type=layers_choice, default='textbook', metavar='{textbook,fast,PATH}',
                   help="textbook: layers.py, the lab's layers; fast: their twins in fast_layers.py, the same sums "
                        "in another order, 2-3x faster; or the path of a student's layers.py (or of the folder "
                        "holding it) (default: %(default)s)"),
    'draw_every': dict(type=positive_int, default=100,
                       help="draw conv1's filters every N steps, and after every epoch (default: %(default)s)"),
}
RUN_FLAGS = ('data_dir', 'save_dir', 'run_name', 'overwrite', 'resume', 'seed')  # every training script's


def add_flags(parser, *names, **defaults):
    """Adds the FLAGS named (by their dest, e.g. 'batch_size' for --batch-size), with the script's defaults."""
    for name in names:
        options = dict(FLAGS[name])
        if name in defaults:  # argparse parses a string default as if it were given: '1:0.1,3:0.01' for lr_policy
            options['default'] = defaults.pop(name)
        parser.add_argument('--' + name.replace('_', '-'), **options)
    if defaults:
        raise TypeError(f"defaults for flags not added: {sorted(defaults)}")


def explicit_flags(parser, argv):
    """{dest: value} of the flags that argv gives, leaving out the defaults."""
    saved = {action: action.default for action in parser._actions}
    try:
        for action in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved.items():
            action.default = default


def flag_name(parser, dest):
    return next(action.option_strings[0] for action in parser._actions if action.dest == dest)


def refuse_flags(parser, argv, mode, allowed):
    """A UserError naming the first flag of argv, other than `allowed`, that does nothing in `mode` (e.g.
    'with --summary-only'): no script accepts a flag that it would ignore."""
    for dest in explicit_flags(parser, argv):
        if dest not in allowed:
            raise UserError(f"{flag_name(parser, dest)} does nothing {mode}; leave it out")


def available_memory():
    """Bytes this process can still allocate: what the OS reports available, or less under an address-space
    limit (RLIMIT_AS, e.g. ulimit -v)."""
    available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/meminfo') as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError):
            with open('/proc/self/statm') as f:
                used = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
            available = min(available, limit - used)
    return available


def check_memory(what, needed):
    """A UserError naming `what` (the flags that ask for it) if it needs more memory than there is, checked
    before any work: a flag's size is weighed against the machine, not found out by a traceback midway."""
    available = available_memory()
    if needed > available:
        raise UserError(f"{what} needs about {needed / 2 ** 30:.1f} GiB of memory, and {available / 2 ** 30:.1f} "
                        f"GiB are free here")


def check_threads(threads, flag='--threads'):
    """A UserError if `threads` is more than the CPUs this process may run on: more only slow it down."""
    cores = len(os.sched_getaffinity(0))
    if threads > cores:
        raise UserError(f"{flag} {threads} is more than the {cores} CPUs this process may use")


def check_batch_size(batch_size, num_examples, where):
    """A UserError if a batch is larger than the training examples (`where`: which ones, for the message)."""
    if batch_size > num_examples:
        raise UserError(f"--batch-size {batch_size} is larger than the {num_examples} training images {where}")


# ----------------------------------------------------------------------------- --resume and run folders

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
        _check_save_dir(args.save_dir, args.run_name)
        if args.run_name is not None and os.path.exists(os.path.join(args.save_dir, args.run_name)) \
                and not args.overwrite:
            raise UserError(f"run folder {os.path.join(args.save_dir, args.run_name)} exists; pick another "
                            f"--run-name, pass --overwrite, or continue it with --resume")
        return args
    run_dir = args.resume
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: no such run folder")
    if not os.path.lexists(config_path):
        raise UserError(f"--resume {run_dir}: no {CONFIG} in it, so it is not a run folder of these scripts")
    config = readback.read_json(config_path, {'script': str, 'argv': [str]}, max_bytes=1 << 20)
    if config['script'] != f'{script}.py':
        raise UserError(f"--resume {run_dir}: that is a run of {config['script'][:60]}, not of {script}.py")
    saved = _parse_saved(parser, config['argv'], config_path)
    given = explicit_flags(parser, argv)
    for dest, value in given.items():
        if dest not in ('resume', 'data_dir') and value != getattr(saved, dest):
            flag = flag_name(parser, dest)
            raise UserError(f"--resume {run_dir}: {flag} {_show(value)} differs from the run's "
                            f"{_show(getattr(saved, dest))} (in {config_path}); leave {flag} out to resume, "
                            f"or start a new run")
    saved.resume = run_dir
    saved.data_dir = given.get('data_dir', saved.data_dir)
    return saved


def _parse_saved(parser, argv, config_path):
    """The flags config.json saved, parsed as the script parses its own: a tampered or foreign command line
    (an unknown flag, a value out of range) is one line naming the file."""
    class Refused(Exception):
        pass

    def refuse(message):
        raise Refused(message)
    original, parser.error = parser.error, refuse
    try:
        saved = parser.parse_args(argv)
    except Refused as error:
        raise readback.ReadBackError(f"{config_path}: its command line is not this script's ({error})") from None
    finally:
        parser.error = original
    if saved.resume is not None:
        raise readback.ReadBackError(f"{config_path}: its command line has a --resume")
    return saved


def _check_save_dir(save_dir, name=None):
    """A UserError unless save_dir is a folder or can be made one (no file on its path) that can hold a folder
    named `name`, checked before any work: a run should not load its data only to fail when it makes its folder."""
    existing = os.path.abspath(save_dir)
    while not os.path.exists(existing):  # the nearest part of the path that is there already
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--save-dir {save_dir}: {existing} is a file, not a folder")
    if name is not None:
        limit = os.pathconf(existing, 'PC_NAME_MAX')
        if len(os.fsencode(name)) > limit:
            raise UserError(f"--run-name is {len(os.fsencode(name))} bytes long, more than a file name may be "
                            f"here ({limit} bytes)")


def _show(value):
    if isinstance(value, dict):  # an lr policy
        return ','.join(f'{key}:{item:g}' for key, item in value.items())
    return 'on' if value is True else 'off' if value is False else str(value)


@contextlib.contextmanager
def run_folder(args, script, argv=None, resumable=True):
    """The run's folder for the block: --resume's, or a new one (make_run_dir) with config.json, from which
    --resume restarts. It is locked for the block (a second process on it is refused in one line; the OS
    lets go of the lock when the process dies, however it dies).

    resumable: from the moment the folder is claimed, the first Ctrl-C / SIGTERM only asks the run to stop
    at its next step (Run.steps saves where it stands there), and the block ends in Interrupted with the
    resume hint, also when the signal came after the last step. Otherwise a signal stops it at once.
    A failed write (a full disk) becomes a UserError with the same hint.
    """
    global _deferring
    _deferring += resumable
    run_dir, resume = None, getattr(args, 'resume', None)  # a script without checkpoints has no --resume
    try:
        run_dir = resume if resume is not None else make_run_dir(args.save_dir, args.run_name, script, args.overwrite)
        with locked(run_dir):
            remove_temporaries(run_dir)
            if resume is None:
                try:
                    write_json(os.path.join(run_dir, CONFIG), {'script': f'{script}.py', 'args': vars(args),
                                                               'argv': sys.argv[1:] if argv is None else list(argv)})
                except BaseException:  # a full disk: a folder without config.json would only block its name
                    with contextlib.suppress(OSError):
                        os.rmdir(run_dir)  # only if empty: a folder reused with --overwrite keeps what it holds
                    run_dir = None
                    raise
            yield run_dir
            if _pending_signal is not None:  # came after the last step: the work is done, but say so
                stop()
    except KeyboardInterrupt as interrupt:
        if run_dir is None:
            raise
        hint = (f"the last checkpoint is in {run_dir}; continue with: python {script}.py --resume {run_dir}"
                if resumable else f"what it wrote is in {run_dir}")
        raise Interrupted(f"stopped by {signal.Signals(_signal_of(interrupt)).name}; {hint}",
                          _signal_of(interrupt)) from None
    except OSError as error:
        if run_dir is None or not resumable:
            raise
        raise UserError(f"{error}; the last checkpoint is in {run_dir}; continue with: python {script}.py "
                        f"--resume {run_dir}") from None
    finally:
        _deferring -= resumable


@contextlib.contextmanager
def locked(run_dir):
    """An exclusive flock on the folder itself for the block (no lock file to leave behind); a UserError if
    another process holds it."""
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"run folder {run_dir} is in use by another process; wait for it to end, or pick "
                            f"another --run-name") from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


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


def machine():
    """Where a run ran, for its results: CPU model and the instruction sets that change speed and bits,
    cores, load average, Python, NumPy and torch versions, and the git commit of this code."""
    flags, model = set(), platform.processor()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name':
                    model = value.strip()
                elif key.strip() == 'flags':
                    flags = set(value.split())
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    info = {'cpu': model, 'cpu_flags': sorted(flags & {'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_bf16'}),
            'cores': len(os.sched_getaffinity(0)), 'load_average': os.getloadavg(),
            'python': platform.python_version(), 'numpy': np.__version__, 'git_commit': commit, 'git_dirty': dirty,
            'environment': {key: os.environ[key] for key in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE', 'OPENBLAS_NUM_THREADS', 'OMP_WAIT_POLICY',
                                                             'OMP_NUM_THREADS') if key in os.environ}}
    if 'torch' in sys.modules:
        torch = sys.modules['torch']
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return info


# ----------------------------------------------------------------------------- files

TEMPORARY = '.tmp-'  # atomic_write's temporary files are .<name>.tmp-<8 random characters><extension>
_TEMPORARY_NAME = re.compile(r'^\..+\.tmp-[a-z0-9_]{8}(\.\w+)?$')


def remove_temporaries(run_dir):
    """Removes the temporary files that processes killed while writing (kill -9) left in run_dir and in its
    subfolders that are no run folders of their own (a sweep's); called with the folder's lock held, so no
    live process is writing them. Returns their paths."""
    removed = []
    for parent, folders, names in os.walk(run_dir):
        folders[:] = [f for f in folders if not os.path.exists(os.path.join(parent, f, CONFIG))]
        for name in names:
            if _TEMPORARY_NAME.match(name):
                os.remove(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
    return removed


def atomic_write(path, write):
    """Calls write(tmp_path) for a new temporary file beside `path` (with its extension), flushes it to the
    disk and renames it to `path`: a crash, a kill or a full disk leaves the old file or the new one under
    that name, never half of one. The temporary name is unique, so two processes never share it."""
    folder, name = os.path.split(path)
    handle, tmp_path = tempfile.mkstemp(dir=folder or '.', prefix=f'.{name}{TEMPORARY}',
                                        suffix=os.path.splitext(name)[1])
    os.close(handle)
    try:
        os.chmod(tmp_path, _file_mode())
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


def _file_mode():
    """What open() gives a new file under the umask; mkstemp's files are private (0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_text(path, text):
    """Writes a text file atomically."""
    def write(tmp_path):
        with open(tmp_path, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def json_text(obj, indent=None):
    """obj as JSON text; NaN and infinities become null (JSON has neither), so the text is always valid JSON."""
    return json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)


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


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def markdown_text(text):
    """text as literal Markdown: every character Markdown could read as markup (a table's '|', a link's
    brackets, emphasis, HTML) escaped, whitespace runs made one space. For strings that come from data files."""
    return re.sub(r'([\\`*_{}\[\]()#+\-.!|<>~$])', r'\\\1', ' '.join(str(text).split()))


def progress_bar(total, **options):
    """A tqdm bar on stderr, shown only when stderr is a terminal: a log file gets whole lines, never bars."""
    return tqdm(total=total, leave=False, disable=None, dynamic_ncols=True, **options)


# ----------------------------------------------------------------------------- signals

class Terminated(KeyboardInterrupt):
    """SIGTERM (a shutdown, `kill`), raised like Ctrl-C's KeyboardInterrupt so that both stop a run alike."""


def _interruption(signum):
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _signal_of(interrupt):
    return signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT


# Once a run has its folder, a signal must not land between two parameter updates of one SGD step, or the
# weights it would save belong to no step at all. So there the first SIGINT/SIGTERM is only noted, and the
# run asks for it between steps (stop_requested), saves where it stands and stops (stop).
_deferring = 0          # how many resumable run_folder() blocks are open
_pending_signal = None  # the signal noted there and not yet acted upon


def _on_signal(signum, frame):
    global _pending_signal
    if _deferring and _pending_signal is None:
        _pending_signal = signum  # no print here: the handler may run inside a write to stderr
        return
    _pending_signal = None
    raise _interruption(signum)


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


def run(main):
    """Calls main(); a UserError becomes one line on stderr and exit code 2; Ctrl-C and SIGTERM one line
    (with the resume hint, once the run has a folder) and exit code 128 + the signal's number."""
    signal.signal(signal.SIGINT, _on_signal)  # also where the shell started us ignoring it
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        main()
    except (OSError, UserError) as error:  # a full disk, a folder we may not write: one line too
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as interrupt:
        newline = '\n' if sys.stderr.isatty() else ''  # below the progress bar, and the ^C the terminal echoed
        print(f"{newline}interrupted: {interrupt}", file=sys.stderr)
        sys.exit(128 + interrupt.signum)
    except KeyboardInterrupt as interrupt:  # before the run folder exists: nothing to resume
        print("interrupted", file=sys.stderr)
        sys.exit(128 + _signal_of(interrupt))


def torch_device(choice):
    """--device cpu|cuda|auto -> torch.device; cuda without a GPU is a UserError, auto falls back to the CPU."""
    import torch
    if choice == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(choice)
