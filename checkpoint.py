"""Checkpoints: a training run that can stop at any step and go on from its folder, bit for bit.

A training loop asks a Run for its epochs and its mini-batches, and hands it each epoch's scores:

    run = checkpoint.Run(run_dir, seed, resume, arrays=nn.parameters(net))   # NumPy: checkpoint.npz
    batches = run.batches(len(train_x), batch_size)     # or DataLoader(..., sampler=batches, batch_size=None)
    for epoch in run.epochs(num_epochs):
        for batch in batches:
            ...                                         # one SGD step on train_x[batch]
            run.check_loss(loss)                        # a NaN or infinite loss stops the run, before the update
        run.end_epoch(train_loss=..., valid_acc=...)    # prints, writes results.json and the checkpoint

The Run does the rest:
  - each epoch's batch order is a permutation drawn from its own generator (seeded), the last partial
    batch left out;
  - it writes the checkpoint before the first epoch and after every epoch: the weights (or the PyTorch
    state_dicts), where the run stands (epochs done, steps done of the next epoch), the generator's
    state at the start of that epoch, and the results so far;
  - Ctrl-C or SIGTERM during training waits for the step in progress, then the run saves where it
    stands and stops (a signal between two weight updates would save weights of no step at all);
  - with resume=True it reads the checkpoint back: the weights, the results, and the interrupted
    epoch's batch order, from which the steps done are left out. The run then ends with the same
    weights as one that was never stopped.

Files, all written atomically (cli.atomic_write) and read without running any code:
    checkpoint.npz  np.load(..., allow_pickle=False): the arrays under their own names, and 'run'
    checkpoint.pt   torch.load(..., weights_only=True): the state_dicts under their names, and 'run'
'run' is JSON text: epochs_done, batches_done, step, epoch_seconds, rng (the generator's state) and results.
A run that diverges never overwrites its last good checkpoint (check_loss, end_epoch and the stop between
steps see to that), and a checkpoint read back must look exactly like what this code writes (names, shapes,
dtypes, types, finite values, counts that fit together): anything else, a tampered or a foreign file, stops
the run with one line naming the file before anything in its folder changes.
"""
import io
import json
import math
import os
import pickle
import re
import time
import zipfile

import numpy as np

import cli

NPZ, PT = 'checkpoint.npz', 'checkpoint.pt'


class Diverged(cli.UserError):
    """The loss became NaN or infinite: the run stops before that reaches the weights on disk."""


class Run:
    """Where a training run stands, and the mechanics of stopping and going on; see the module docstring.

    arrays:      {name: array} of a NumPy net (nn.parameters), restored in place; or
    state_dicts: {name: object with state_dict() and load_state_dict()} (model, optimizer, scheduler).
    results:     the results dict a new run starts with; 'epochs' (a list of end_epoch's records) is added.
    """

    def __init__(self, run_dir, seed, resume=False, arrays=None, state_dicts=None, results=None, shuffle=True):
        self.dir, self.shuffle = run_dir, shuffle
        self.arrays, self.state_dicts = arrays, state_dicts
        self.path = os.path.join(run_dir, NPZ if state_dicts is None else PT)
        self.rng = np.random.default_rng(seed)
        self.epochs_done, self.batches_done, self.step, self.epoch_seconds = 0, 0, 0, 0.0
        self.results = {**(results or {}), 'epochs': []}
        self.resumed = resume and os.path.exists(self.path)
        if self.resumed:
            self._restore()
            print(self._where('resuming'))
        self.epoch = self.epochs_done  # the epoch in progress, from epochs(); before it, the last one done

    @property
    def finished(self):
        """True once finish() was called: a resumed sweep reads such a run back instead of training it."""
        return 'finished' in self.results

    def epochs(self, count):
        """Yields the epoch numbers 1..count that are still to do; signals wait for a step to end meanwhile."""
        if self.epochs_done > count:  # --epochs cannot change on --resume: the checkpoint was tampered with
            raise _unreadable(self.path, ValueError(f"{self.epochs_done} epochs done of a run of {count}"))
        self.epochs_total = count
        # NumPy's overflow warnings on the way to a NaN say less than check_loss and end_epoch do.
        with cli.stop_between_steps(), np.errstate(over='ignore', invalid='ignore'):
            if not self.resumed:
                self._save()
            for self.epoch in range(self.epochs_done + 1, count + 1):
                self.epoch_start = time.perf_counter() - self.epoch_seconds
                yield self.epoch

    def batches(self, num_items, batch_size):
        """The mini-batches of each epoch, as int64 index arrays (batch_size,), re-iterable every epoch."""
        return _Batches(self, num_items, batch_size)

    def check_loss(self, loss):
        """Stops the run with Diverged if the batch loss is NaN or infinite; shows it in the progress bar."""
        loss = loss.item() if hasattr(loss, 'item') else float(loss)  # a tensor, a NumPy or a Python number
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at epoch {self.epoch}, step {self.step}; lower the learning "
                           f"rate. The last checkpoint, after epoch {self.epochs_done}, is in {self.dir}")
        self._progress.set_postfix(loss=f'{loss:.4f}', refresh=False)

    def end_epoch(self, **record):
        """Records the epoch's scores (train_loss, train_acc, valid_loss, valid_acc, lr, ...), prints them
        and saves results.json and the checkpoint. A NaN or infinite score stops the run first, so results.json
        and the checkpoint keep the last good epoch. Call it before the epoch writes anything else."""
        for key, value in record.items():
            if not math.isfinite(value):
                raise Diverged(f"the {key.replace('_', ' ')} became {value} after epoch {self.epoch}; lower the "
                               f"learning rate. The last checkpoint, after epoch {self.epochs_done}, is in {self.dir}")
        record = {'epoch': self.epoch, **record, 'seconds': self.train_seconds,
                  'images_per_second': self.images / self.train_seconds}
        self.results['epochs'].append(record)
        self.epochs_done, self.batches_done, self.epoch_seconds = self.epoch, 0, 0.0
        print(format_epoch(record, self.epochs_total))
        cli.write_json(os.path.join(self.dir, 'results.json'), self.results)
        self._save()

    def finish(self, **final):
        """Adds the final scores (test accuracy, ...) to the results and saves them: the run is done."""
        epochs = self.results['epochs']
        self.results.update(final, finished=True, seconds_per_epoch=float(np.mean([r['seconds'] for r in epochs])),
                            images_per_second=float(np.mean([r['images_per_second'] for r in epochs])))
        cli.write_json(os.path.join(self.dir, 'results.json'), self.results)
        self._save()

    # ------------------------------------------------------------------------- saving and restoring

    def _where(self, verb):
        return f"{verb} {self.dir} after epoch {self.epochs_done}" + (
            f" and {self.batches_done} steps of epoch {self.epochs_done + 1}" if self.batches_done else '')

    def _state(self):
        """What the checkpoint holds besides 'run': the arrays, or each object's state_dict()."""
        if self.state_dicts is None:
            return self.arrays
        return {name: obj.state_dict() for name, obj in self.state_dicts.items()}

    def _save(self, epoch_rng=None):
        """Writes the checkpoint; epoch_rng: the generator's state at the start of the next epoch (default: now)."""
        fields = cli.json_text({'epochs_done': self.epochs_done, 'batches_done': self.batches_done, 'step': self.step,
                                'epoch_seconds': self.epoch_seconds, 'rng': epoch_rng or self.rng.bit_generator.state,
                                'results': self.results})  # a NaN test loss, say, becomes null
        if self.state_dicts is None:
            save_npz(self.path, {**self._state(), 'run': np.array(fields)})
        else:
            save_torch(self.path, {**self._state(), 'run': fields})

    def _restore(self):
        saved = load_npz(self.path) if self.state_dicts is None else load_torch(self.path)
        fields = _run_fields(self.path, saved.get('run'))
        if not _all_finite(saved):  # a diverged run never saves such weights
            raise _unreadable(self.path, ValueError("NaN or infinite weights"))
        if self.state_dicts is None:
            copy_arrays(self.arrays, saved, self.path)
        else:
            for name, obj in self.state_dicts.items():
                if name not in saved:
                    raise _unreadable(self.path, ValueError(f"no {name!r}"))
                load_state_dict(obj, saved[name], self.path, name)
        try:
            self.rng.bit_generator.state = fields['rng']
        except (KeyError, ValueError, TypeError, OverflowError) as error:  # another generator's, or tampered
            raise _unreadable(self.path, ValueError(f"'rng' is not a generator state ({error})"))
        for key in ('epochs_done', 'batches_done', 'step', 'epoch_seconds', 'results'):
            setattr(self, key, fields[key])


class _Batches:
    """Run.batches: iterating it runs one epoch of the run; a DataLoader takes it as its sampler."""

    def __init__(self, run, num_items, batch_size):
        if num_items < batch_size:
            raise cli.UserError(f"batch size {batch_size} is larger than the {num_items} training examples")
        self.run, self.num_items, self.batch_size = run, num_items, batch_size
        # a checkpoint saves where the run stands in three counts; the same flags fix how they fit together
        if not (run.batches_done < len(self) and run.step == run.epochs_done * len(self) + run.batches_done):
            raise _unreadable(run.path, ValueError(
                f"step {run.step} is not step {run.batches_done} of epoch {run.epochs_done + 1} of "
                f"{len(self)} steps each"))

    def __len__(self):
        return self.num_items // self.batch_size

    def __iter__(self):
        run, size = self.run, self.batch_size
        epoch_rng = run.rng.bit_generator.state  # a resumed run restored it: the same order as before
        order = run.rng.permutation(self.num_items) if run.shuffle else np.arange(self.num_items)
        run._progress = progress = cli.progress_bar(len(self), initial=run.batches_done,
                                                    desc=f"epoch {run.epoch}/{run.epochs_total}")
        for i in range(run.batches_done, len(self)):
            if cli.stop_requested():  # between two steps: save where the run stands, then stop
                progress.close()
                # check_loss saw the last step's loss, not the weights its update made: if they overflowed, the
                # last good checkpoint stays, and --resume will meet the divergence again and report it
                if _all_finite(run._state()):
                    run.batches_done, run.epoch_seconds = i, time.perf_counter() - run.epoch_start
                    run._save(epoch_rng)
                    print(run._where('saved'))
                cli.stop()
            run.step += 1
            yield order[i * size:(i + 1) * size]
            progress.update()
        progress.close()
        run.train_seconds, run.images = time.perf_counter() - run.epoch_start, len(self) * size


def format_epoch(record, epochs):
    """One line of an epoch's scores: loss and accuracy (and macro precision/recall, if recorded) per split."""
    parts = []
    for split in ('train', 'valid'):
        if f'{split}_loss' in record:
            part = f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_acc']:.2%}"
            if f'{split}_precision' in record:
                part += f" P {record[f'{split}_precision']:.2%} R {record[f'{split}_recall']:.2%}"
            parts.append(part)
    if record.get('reg_loss'):
        parts.append(f"L2 term {record['reg_loss']:.4f}")
    if 'lr' in record:
        parts.append(f"lr {record['lr']:g}")
    parts.append(f"{record['seconds']:.1f} s ({record['images_per_second']:.0f} img/s)")
    return f"epoch {record['epoch']}/{epochs}: " + ', '.join(parts)


def _run_fields(path, text):
    """The 'run' JSON of a checkpoint, checked field by field: a tampered file is a UserError, not a traceback."""
    try:
        fields = json.loads(str(text))
        for key, kind in (('epochs_done', int), ('batches_done', int), ('step', int), ('epoch_seconds', float),
                          ('rng', dict), ('results', dict)):
            if not isinstance(fields[key], kind) or isinstance(fields[key], bool):
                raise TypeError(f"'{key}' is not a {kind.__name__}")
        if min(fields['epochs_done'], fields['batches_done'], fields['step'], fields['epoch_seconds']) < 0:
            raise ValueError("a negative count")
        epochs = fields['results'].get('epochs')
        if not (isinstance(epochs, list) and len(epochs) == fields['epochs_done']):
            raise TypeError(f"'results' has no list of the {fields['epochs_done']} epochs done")
        for record in epochs:  # what end_epoch records: finite numbers, read back by plots and summaries
            if not (isinstance(record, dict) and all(_is_number(value) and math.isfinite(value)
                                                     for value in record.values())):
                raise TypeError(f"an epoch's record is not a dict of numbers: {str(record)[:60]}")
    except KeyError as error:
        raise _unreadable(path, ValueError(f"no {error}"))
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise _unreadable(path, error)
    return fields


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all_finite(state):
    """True unless a NumPy array or a torch tensor in state (a dict or list of them, or one) holds NaN or inf."""
    if isinstance(state, dict):
        return all(_all_finite(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(value) for value in state)
    if isinstance(state, np.ndarray):
        return state.dtype.kind not in 'fc' or bool(np.isfinite(state).all())
    if hasattr(state, 'is_floating_point'):  # a torch tensor (torch is imported only by the scripts that use it)
        return not state.is_floating_point() or bool(state.isfinite().all())
    return True


# ----------------------------------------------------------------------------- files

def _unreadable(path, error):
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return cli.UserError(f"{path}: not a checkpoint of this run ({reason}); start the run again with --overwrite")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def save_npz(path, arrays):
    """np.savez, atomically (stored, not compressed: load_npz relies on that)."""
    cli.atomic_write(path, lambda tmp_path: np.savez(tmp_path, **arrays))


def _check_zip(path, archive):
    """Refuses, before anything is read, a zip member that is compressed (np.savez and torch.save store theirs)
    or whose sizes claim more bytes than the whole file has: a reader allocates what the zip's directory claims."""
    file_size = os.path.getsize(path)
    for member in archive.infolist():
        if member.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{member.filename} is compressed; np.savez and torch.save never write that")
        if max(member.file_size, member.compress_size) > file_size:
            raise ValueError(f"{member.filename} claims {member.file_size} bytes, the whole file has {file_size}")


def load_npz(path):
    """{name: array} of an .npz that np.savez wrote, never unpickling anything and never allocating more than
    the file holds; a UserError naming the file if it is unreadable, compressed or claims more than it holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_zip(path, archive)
            for member in archive.infolist():
                with archive.open(member) as f:
                    read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(f))
                    if read_header is None:
                        raise ValueError(f"{member.filename} is not in a .npy format np.savez writes")
                    shape, _, dtype = read_header(f)
                    if dtype.hasobject:
                        raise ValueError(f"{member.filename} holds pickled Python objects, refused")
                    if math.prod(shape) * dtype.itemsize > member.file_size:
                        raise ValueError(f"{member.filename} claims {shape} {dtype}, more than its "
                                         f"{member.file_size} bytes")
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as error:
        raise _unreadable(path, error)


def copy_arrays(arrays, saved, source):
    """Copies saved[name] into each arrays[name] in place (the net and its regularizers keep their references)."""
    for name, array in arrays.items():
        if name not in saved:
            raise cli.UserError(f"{source}: no array {name!r} (the net needs {array.dtype} {array.shape})")
        if saved[name].shape != array.shape or saved[name].dtype.kind != 'f':
            raise cli.UserError(f"{source}: {name!r} is {saved[name].dtype} {saved[name].shape}, "
                                f"the net needs {array.dtype} {array.shape}")
        if not _all_finite(saved[name]):
            raise cli.UserError(f"{source}: {name!r} holds NaN or infinite values")
    for name, array in arrays.items():
        array[...] = saved[name]


def save_torch(path, state):
    """torch.save, atomically. It serialises into memory first: torch.save's own file writer reports a full
    disk as a RuntimeError ('unexpected pos'), Python's write reports it as the OSError it is."""
    import torch
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            f.write(buffer.getbuffer())
    cli.atomic_write(path, write)


def load_torch(path):
    """A .pt file on the CPU; weights_only=True builds nothing but tensors and plain values, so it runs no code."""
    import torch
    try:
        with zipfile.ZipFile(path) as archive:
            _check_zip(path, archive)
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message goes on to suggest weights_only=False, which would run the code: never pass that on
        named = re.search(r'GLOBAL (\S+)', str(error))
        raise _unreadable(path, ValueError("refused to load it: it holds more than tensors and plain values"
                                           + (f", it would call {named[1]}" if named else '')))
    except Exception as error:  # a truncated zip, a foreign file: all mean 'not ours'
        raise _unreadable(path, error)


def load_state_dict(obj, state, path, name='state_dict'):
    """obj.load_state_dict(state) once state is shaped like obj.state_dict(): the same keys, list lengths, kinds of
    value, tensor shapes and dtypes. load_state_dict checks a model's tensor shapes, but takes an optimizer's or
    a scheduler's values as they come, so a tampered one would fail only later, with a traceback."""
    _same_structure(obj.state_dict(), state, path, repr(name))
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise _unreadable(path, error)


def _same_structure(expected, got, path, where):
    def differs(what):
        raise _unreadable(path, ValueError(f"{where} {what}"))
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            differs(f"is a {type(got).__name__}, not a dict")
        if expected and set(got) != set(expected):  # an empty one (an optimizer's state before any step) grows
            missing, extra = sorted(map(str, set(expected) - set(got))), sorted(map(str, set(got) - set(expected)))
            differs(f"lacks {missing}" if missing else f"has keys of its own: {extra}")
        for key in expected:
            _same_structure(expected[key], got[key], path, f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            differs(f"is not a list of {len(expected)}")
        for i, (want, value) in enumerate(zip(expected, got)):
            _same_structure(want, value, path, f"{where}[{i}]")
    elif hasattr(expected, 'is_floating_point'):  # a tensor
        if not hasattr(got, 'is_floating_point') or (got.shape, got.dtype) != (expected.shape, expected.dtype):
            shown = f"{tuple(got.shape)} {got.dtype}" if hasattr(got, 'is_floating_point') else type(got).__name__
            differs(f"is {shown}, this run's is {tuple(expected.shape)} {expected.dtype}")
    elif _is_number(expected):
        if not _is_number(got):
            differs(f"is a {type(got).__name__}, not a number")
    elif type(got) is not type(expected):  # bool, str, None
        differs(f"is a {type(got).__name__}, not a {type(expected).__name__}")
