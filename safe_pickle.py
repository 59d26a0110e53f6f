"""A restricted unpickler for CIFAR-10's python-version files: it admits only the constructions the real files
use, makes every array itself from bytes the file holds, and builds no more than a small multiple of the
file's size. A plain pickle.load calls whatever a file names (os.system included), so data.unpickle uses
this instead:

    obj = safe_pickle.loads(raw)     # bytes of a pickle -> dicts, lists, str, int, None and read-only arrays

Anything else raises pickle.UnpicklingError (or EOFError for a truncated file) before it is built.
"""
import io
import math
import pickle
import pickletools

import numpy as np


# The pickle opcodes of CIFAR-10's files (Python 2's cPickle, protocol 2) and of Python 3's re-pickles of
# them (protocols 2 to 5). The rest (floats, sets, object creation, extension codes, persistent ids,
# out-of-band buffers, protocol 0's text forms) is in no CIFAR-10 file and is refused.
_ADMITTED_OPCODES = (
    'PROTO FRAME STOP MARK EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 APPEND APPENDS SETITEM '
    'SETITEMS BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BUILD NONE NEWTRUE '
    'NEWFALSE BININT BININT1 BININT2 LONG1 SHORT_BINSTRING BINSTRING SHORT_BINBYTES BINBYTES BINBYTES8 '
    'SHORT_BINUNICODE BINUNICODE BINUNICODE8 BYTEARRAY8').split()
# pickletools' codes for an argument that is a length and then that many bytes -> the length's size in bytes
_LENGTH_SIZE = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
# opcode byte -> (name, size of a fixed-size argument, size of a length before a counted one); GLOBAL's two
# lines are neither, and _check_opcodes reads them itself.
_OPCODE_LAYOUT = {
    ord(op.code): (op.name, op.arg.n if op.arg and op.arg.n > 0 else 0, _LENGTH_SIZE.get(op.arg and op.arg.n, 0))
    for op in pickletools.opcodes if op.name in _ADMITTED_OPCODES}
# One opcode builds at most a small object (a list, a tuple, a stand-in: under 256 bytes); allowing one
# per 256 bytes of file keeps them all within the file's size. The real batches have one per 1,000 to 3,000.
_FILE_BYTES_PER_OPCODE, _OPCODES_ANY_FILE_MAY_HAVE = 256, 1000
# How deep a CIFAR-10 file nests: a dict of lists of strings or ints (one level more, so that a list of
# lists can be named by _read_batch). Deeper would only be a way to exhaust the stack.
_MAX_NESTING = 3
# The plain number types a pickled array may have, in either byte order; 'data' must be the first.
_NUMBER_TYPES = {'u1', 'i1', 'u2', 'i2', 'u4', 'i4', 'u8', 'i8', 'f2', 'f4', 'f8'}


def _check_opcodes(raw):
    """Walks the opcodes of the pickle `raw`, building nothing, and raises unless each claim fits the file.

    Only _ADMITTED_OPCODES; every counted argument (a string's length, a frame's size) must lie within the
    bytes left; a memo index must be at most the number of opcodes so far (CPython sizes its memo by the
    largest index: five bytes could ask for 16 GiB); and there may be no more opcodes than the file's size
    allows (_FILE_BYTES_PER_OPCODE). EOFError when the pickle ends before its STOP.
    """
    max_opcodes = _OPCODES_ANY_FILE_MAY_HAVE + len(raw) // _FILE_BYTES_PER_OPCODE
    pos = 0
    for count in range(max_opcodes):
        if pos >= len(raw):
            raise EOFError("the pickle ends before its STOP opcode")
        layout = _OPCODE_LAYOUT.get(raw[pos])
        if layout is None:
            known = pickletools.code2op.get(chr(raw[pos]))
            raise pickle.UnpicklingError(f"refusing pickle opcode {known.name if known else hex(raw[pos])}")
        name, fixed_size, length_size = layout
        pos += 1 + fixed_size
        if length_size:
            length = int.from_bytes(raw[pos:pos + length_size], 'little')
            pos += length_size + length
            if pos > len(raw):
                raise pickle.UnpicklingError(f"{name} declares {length} bytes, more than the file has left")
        elif name in ('BINPUT', 'LONG_BINPUT', 'FRAME'):
            value = int.from_bytes(raw[pos - fixed_size:pos], 'little')
            if name == 'FRAME' and pos + value > len(raw):
                raise pickle.UnpicklingError(f"FRAME declares {value} bytes, more than the file has left")
            if name != 'FRAME' and value > count:
                raise pickle.UnpicklingError(f"memo index {value} after {count} opcodes")
        elif name == 'GLOBAL':  # a module and a name, a line each
            for _ in range(2):
                pos = raw.find(b'\n', pos) + 1
                if pos == 0:
                    raise EOFError("the pickle ends inside a GLOBAL")
        elif name == 'STOP':
            if pos < len(raw):  # CIFAR-10's files end at their STOP
                raise pickle.UnpicklingError(f"{len(raw) - pos} bytes after the pickle's end")
            return
    raise pickle.UnpicklingError(f"more than {max_opcodes} opcodes, more than a file of {len(raw)} bytes holds")


def _text(value):
    """A short string from the pickle as str: Python 2's str arrives as bytes (encoding='bytes')."""
    return value.decode('latin1') if isinstance(value, bytes) else value


def _ndarray(*args):
    """numpy.ndarray as a pickle names it: admitted as _reconstruct's first argument, refused when called, for
    numpy.ndarray(shape, dtype) hands back uninitialised memory, and with a buffer and strides it makes a
    view of any size over a few bytes."""
    raise pickle.UnpicklingError("refusing to call numpy.ndarray")


class _PickledDtype:
    """numpy.dtype as a pickle calls it: (type code, align, copy), then __setstate__(state). Admitted only as
    numpy writes them for a plain number type; the np.dtype is made here, never by numpy's __setstate__."""

    def __init__(self, code, align, copy):
        code = _text(code)
        if not (isinstance(code, str) and len(code) <= 16):
            raise pickle.UnpicklingError(f"refusing a dtype given as a {type(code).__name__}")
        dtype = np.dtype(code)  # parses a short type string, as NumPy's .npy loader does with untrusted headers
        if dtype.str[1:] not in _NUMBER_TYPES or (align, copy) != (False, True):
            raise pickle.UnpicklingError(f"refusing an array of dtype {dtype}")
        self.dtype = dtype

    def __setstate__(self, state):
        """numpy's state of a plain number type: (3, byte order, None, None, None, -1, -1, 0). Any other would
        change the checked type afterwards: fields past the item size, another item size, object flags."""
        byte_order = _text(state[1]) if isinstance(state, tuple) and len(state) == 8 else None
        if byte_order not in ('<', '>', '|') or state[:1] + state[2:] != (3, None, None, None, -1, -1, 0):
            raise pickle.UnpicklingError(f"refusing a state that changes dtype {self.dtype}")
        self.dtype = self.dtype.newbyteorder(byte_order)


def _array_from_bytes(raw, dtype, shape):
    """raw bytes -> a read-only C-ordered array of `shape` and `dtype` (a _PickledDtype) viewing them: no
    copy, and nothing that the file does not hold, since raw must be exactly the array's size."""
    if not isinstance(dtype, _PickledDtype):
        raise pickle.UnpicklingError(f"refusing an array whose dtype is a {type(dtype).__name__}")
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refusing an array whose data is a {type(raw).__name__}, not bytes")
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError("refusing an array shape that is not a tuple of sizes")
    needed = math.prod(shape) * dtype.dtype.itemsize
    if needed != len(raw):
        raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {dtype.dtype} needs {needed} bytes, "
                                     f"the file gives {len(raw)}")
    return np.frombuffer(raw, dtype.dtype).reshape(shape)


class _PickledArray:
    """Stands in for an ndarray while a pickle is read. numpy pickles one as _reconstruct(ndarray, (0,), b'b')
    followed by __setstate__((1, shape, dtype, False, raw bytes)), or, at protocol 5, as
    _frombuffer(bytearray, dtype, shape, 'C'). Both forms are admitted exactly so, and the array is made by
    _array_from_bytes: numpy's own __setstate__ never sees the file."""

    def __init__(self):
        self.array = None

    @classmethod
    def reconstruct(cls, ndarray, shape, typecode):
        """numpy.core.multiarray._reconstruct: an empty stand-in, to be filled by __setstate__."""
        if ndarray is not _ndarray or shape != (0,) or typecode != b'b':
            raise pickle.UnpicklingError("refusing _reconstruct with arguments other than (ndarray, (0,), b'b')")
        return cls()

    @classmethod
    def from_buffer(cls, buffer, dtype, shape, order):
        """numpy.core.numeric._frombuffer (protocol 5): a stand-in holding its array already."""
        if order != 'C':
            raise pickle.UnpicklingError("refusing an array that is not C-ordered")
        stand_in = cls()
        stand_in.array = _array_from_bytes(buffer, dtype, shape)
        return stand_in

    def __setstate__(self, state):
        """numpy's state of an array, (1, shape, dtype, False, raw bytes): the array, made once."""
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError("refusing an array state that numpy does not write")
        _, shape, dtype, fortran_order, raw = state
        if fortran_order:
            raise pickle.UnpicklingError("refusing an array that is not C-ordered")
        self.array = _array_from_bytes(raw, dtype, shape)


def _empty_bytes(*args):
    """__builtin__.bytes, how Python 3 pickles b'' at protocol 2: bytes(). With an argument it could
    allocate any size (bytes(10**10)), so none is admitted."""
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b''


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names CIFAR-10's files use, each to a stand-in above that checks its arguments, and
    refuses every other name: a plain pickle.load calls whatever a file names (os.system included)."""

    STAND_INS = {
        ('numpy.core.multiarray', '_reconstruct'): _PickledArray.reconstruct,
        ('numpy._core.multiarray', '_reconstruct'): _PickledArray.reconstruct,  # NumPy 2's name
        ('numpy.core.numeric', '_frombuffer'): _PickledArray.from_buffer,
        ('numpy._core.numeric', '_frombuffer'): _PickledArray.from_buffer,
        ('numpy', 'ndarray'): _ndarray,
        ('numpy', 'dtype'): _PickledDtype,
        ('__builtin__', 'bytes'): _empty_bytes,
        ('builtins', 'bytes'): _empty_bytes,
    }

    def __init__(self, raw):
        # BufferedReader: its peek() lets the unpickler read ahead (from a bare BytesIO it calls read() for
        # every opcode). encoding='bytes' hands Python 2's pixel string over untouched (latin1 would decode
        # and re-encode 30 MB).
        super().__init__(io.BufferedReader(io.BytesIO(raw)), encoding='bytes')
        self.bytes_to_encode = len(raw)

    def find_class(self, module, name):
        if (module, name) == ('_codecs', 'encode'):  # re-pickled batches (Python 3, protocol 2)
            return self._latin1_encode
        if (module, name) in self.STAND_INS:
            return self.STAND_INS[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def _latin1_encode(self, text, encoding):
        """_codecs.encode(str, 'latin1'), how Python 3 pickles bytes at protocol 2; no other codec, and in all
        no more bytes than the file has (a string in the memo could otherwise be encoded again and again)."""
        if encoding != 'latin1' or not isinstance(text, str):
            raise pickle.UnpicklingError("refusing _codecs.encode other than encode(str, 'latin1')")
        self.bytes_to_encode -= len(text)
        if self.bytes_to_encode < 0:
            raise pickle.UnpicklingError("its strings encode to more bytes than the file has")
        return text.encode('latin1')


def _plain(loaded):
    """The unpickled object with stand-ins made arrays and bytes made str (Python 2's strings), checked to be
    what CIFAR-10's files hold: dicts, lists, strings, ints, None and arrays, nested at most _MAX_NESTING
    deep. An object the memo repeats is converted once and shared, so the result is no bigger than what
    was loaded."""
    converted = {}  # id -> (converted object, its height: 0 for a leaf, else 1 + its highest item's)

    def convert(obj, depth):
        """obj, met `depth` containers deep -> (converted object, its height)."""
        if depth > _MAX_NESTING:  # checked before converting, so a list that holds itself stops here
            raise pickle.UnpicklingError(f"nested more than {_MAX_NESTING} deep, deeper than CIFAR-10's files")
        if obj is None or isinstance(obj, (str, int)):
            return obj, 0
        if id(obj) not in converted:
            if isinstance(obj, dict):
                pairs = [(convert(key, depth + 1), convert(value, depth + 1)) for key, value in obj.items()]
                converted[id(obj)] = ({key: value for (key, _), (value, _) in pairs},
                                      1 + max((max(k, v) for (_, k), (_, v) in pairs), default=0))
            elif isinstance(obj, list):
                items = [convert(item, depth + 1) for item in obj]
                converted[id(obj)] = [item for item, _ in items], 1 + max((h for _, h in items), default=0)
            elif isinstance(obj, _PickledArray) and obj.array is not None:
                converted[id(obj)] = obj.array, 0
            elif isinstance(obj, bytes):
                converted[id(obj)] = obj.decode('latin1'), 0
            else:
                what = 'an array without its data' if isinstance(obj, _PickledArray) else f"a {type(obj).__name__}"
                raise pickle.UnpicklingError(f"refusing {what} in the file")
        result, height = converted[id(obj)]
        if depth + height > _MAX_NESTING:  # a shared object met deeper than where it was converted
            raise pickle.UnpicklingError(f"nested more than {_MAX_NESTING} deep, deeper than CIFAR-10's files")
        return result, height

    return convert(loaded, 0)[0]


def loads(raw):
    """The object the pickle `raw` holds, byte strings as str and arrays as read-only views of raw's bytes;
    pickle.UnpicklingError or EOFError when the pickle is anything but what CIFAR-10's files hold."""
    _check_opcodes(raw)
    return _plain(_RestrictedUnpickler(raw).load())
