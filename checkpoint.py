"""Checkpoint files: written atomically (cli.atomic_write) and read without running any code.

    checkpoint.npz  (NumPy scripts)   np.load(..., allow_pickle=False): the arrays under their own names, and 'run'
    checkpoint.pt   (PyTorch scripts) torch.load(..., weights_only=True): the state_dicts under their names, and 'run'

'run' is run.Run's JSON text (where the run stands, its random state and its results). A file read back must
look like what this code writes, before anything is allocated or copied: a member compressed or claiming more
bytes than the file has, an array holding pickled objects, a pickle that would call a function, a state_dict
shaped unlike the object it is loaded into: each is a one-line UserError naming the file.
"""
import io
import math
import pickle
import re
import zipfile

import numpy as np

import cli
import readback

NPZ, PT = 'checkpoint.npz', 'checkpoint.pt'


def all_finite(state):
    """True unless a NumPy array or a torch tensor in state (a dict or list of them, or one) holds NaN or inf.
    Walks every container once however often it is referenced, without recursion: a file's shared references
    cannot make it walk more than the file holds, nor its nesting exhaust the stack."""
    seen, todo = set(), [state]
    while todo:
        item = todo.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) not in seen:
                seen.add(id(item))
                todo.extend(item.values() if isinstance(item, dict) else item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind in 'fc' and not np.isfinite(item).all():
                return False
        elif hasattr(item, 'is_floating_point'):  # a torch tensor (torch is imported only by the scripts using it)
            if item.is_floating_point() and not item.isfinite().all():
                return False
    return True


# ----------------------------------------------------------------------------- files

def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_flat(value):
    """A tensor, a number, a string, a bool or None: what an optimizer keeps per parameter."""
    return value is None or isinstance(value, (int, float, str, bool)) or hasattr(value, 'is_floating_point')


def unreadable(path, error):
    """The one-line UserError of a checkpoint that is not what this code writes."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return cli.UserError(f"{path}: not a checkpoint of this run ({reason}); start the run again with --overwrite")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def save_npz(path, arrays):
    """np.savez, atomically (stored, not compressed: load_npz relies on that)."""
    cli.atomic_write(path, lambda tmp_path: np.savez(tmp_path, **arrays))


MAX_BYTES = 256 << 20  # the lab's largest checkpoint, the MNIST net in float64 with its run, is ~7 MB


def _check_zip(path, archive, file_size):
    """Refuses, before anything is read, a zip member that is compressed (np.savez and torch.save store theirs)
    or whose sizes claim more bytes than the whole file has: a reader allocates what the zip's directory claims."""
    for member in archive.infolist():
        if member.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{member.filename} is compressed; np.savez and torch.save never write that")
        if max(member.file_size, member.compress_size) > file_size:
            raise ValueError(f"{member.filename} claims {member.file_size} bytes, the whole file has {file_size}")


def _read(path):
    """The bytes of a checkpoint file, as readback reads what a run reads back: a regular file of a bounded size
    (a FIFO or /dev/zero in its place would block or never end)."""
    try:
        return readback.read_bytes(path, MAX_BYTES)
    except readback.ReadBackError as error:
        raise unreadable(path, ValueError(str(error).removeprefix(f"{path}: "))) from None


def load_npz(path):
    """{name: array} of an .npz that np.savez wrote, never unpickling anything and never allocating more than
    the file holds; a UserError naming the file if it is unreadable, compressed or claims more than it holds."""
    raw = _read(path)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            _check_zip(path, archive, len(raw))
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
        with np.load(io.BytesIO(raw), allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as error:
        raise unreadable(path, error)


def copy_arrays(arrays, saved, source):
    """Copies saved[name] into each arrays[name] in place (the net and its regularizers keep their references)."""
    for name, array in arrays.items():
        if name not in saved:
            raise cli.UserError(f"{source}: no array {name!r} (the net needs {array.dtype} {array.shape})")
        if saved[name].shape != array.shape or saved[name].dtype.kind != 'f':
            raise cli.UserError(f"{source}: {name!r} is {saved[name].dtype} {saved[name].shape}, "
                                f"the net needs {array.dtype} {array.shape}")
        if not all_finite(saved[name]):
            raise cli.UserError(f"{source}: {name!r} holds NaN or infinite values")
    for name, array in arrays.items():
        array[...] = saved[name]


def check_same_arrays(path, arrays):
    """A UserError unless the .npz at path holds exactly `arrays` ({name: array}), bit for bit: the output file
    of a finished run, read back before the run says it is done."""
    saved = load_npz(path)
    if set(saved) != set(arrays) or any(saved[name].dtype != array.dtype or not np.array_equal(saved[name], array)
                                        for name, array in arrays.items()):
        raise cli.UserError(f"{path}: not the final weights of this finished run (its checkpoint holds others); "
                            f"start the run again with --overwrite")


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
    raw = _read(path)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            _check_zip(path, archive, len(raw))
        return torch.load(io.BytesIO(raw), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message goes on to suggest weights_only=False, which would run the code: never pass that on
        named = re.search(r'GLOBAL (\S+)', str(error))
        raise unreadable(path, ValueError("refused to load it: it holds more than tensors and plain values"
                                           + (f", it would call {named[1]}" if named else '')))
    except Exception as error:  # a truncated zip, a foreign file: all mean 'not ours'
        raise unreadable(path, error)


def load_state_dict(obj, state, path, name='state_dict'):
    """obj.load_state_dict(state) once state is shaped like obj.state_dict(): the same keys, list lengths, kinds of
    value, tensor shapes and dtypes. load_state_dict checks a model's tensor shapes, but takes an optimizer's or
    a scheduler's values as they come, so a tampered one would fail only later, with a traceback."""
    _same_structure(obj.state_dict(), state, path, repr(name))
    if not all_finite(state):  # a diverged run never saves such a state
        raise unreadable(path, ValueError(f"{name!r} holds NaN or infinite values"))
    try:
        obj.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise unreadable(path, error)


def _same_structure(expected, got, path, where):
    def differs(what):
        raise unreadable(path, ValueError(f"{where} {what}"))
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            differs(f"is a {type(got).__name__}, not a dict")
        if not expected:  # an optimizer's state before its first step, which grows one flat dict per parameter
            if not all(isinstance(value, dict) and all(_is_flat(item) for item in value.values())
                       for value in got.values()):
                differs("is not an optimizer's state: one flat dict of values per parameter")
        elif set(got) != set(expected):
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
