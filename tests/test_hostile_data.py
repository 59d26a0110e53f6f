"""Hostile data files: small files in the real formats (IDX, gzip, CIFAR-10's pickles) that claim more than they
hold, ask the unpickler for arrays it must not build, or are well formed but wrong. Each must end as one
DataError, one line naming the file, raised by the loader before anything big is allocated or anything runs.

The memory bombs (and the dtype tricks that could crash a loader) are loaded in a child process under an
address-space limit (LOADER_LIMIT_MB), which must exit with the DataError line and code 2, as the scripts do,
quickly, not with a MemoryError or a kill. Downloads are simulated: no test uses the network.
"""
import codecs
import functools
import gzip
import os
import pickle
import subprocess
import sys
import time
import types
import urllib.error

import numpy as np
import pytest

import data
from conftest import ROOT, make_synthetic_cifar, make_synthetic_mnist, serve_archive, tar_archive, write_idx

LOADER_LIMIT_MB = 512  # numpy and cli take ~150 MB of address space; the largest IDX file allowed, 235 MB
CHILD_SECONDS = 30  # a refused bomb takes well under a second past Python's start; generous for a busy machine

# Runs data.<loader>(data_dir, download=False) under RLIMIT_AS, set before numpy is imported; a UserError is
# printed as one line with exit code 2, as cli.run does for the scripts.
CHILD = """
import resource, sys
loader, data_dir, limit_mb, root = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_AS, (int(limit_mb) << 20, int(limit_mb) << 20))
sys.path.insert(0, root)
import cli, data
if loader == 'allocate':  # the control: the limit holds with numpy imported
    try:
        bytearray(int(data_dir) << 20)
    except MemoryError:
        sys.exit(3)
    sys.exit(0)
try:
    getattr(data, loader)(data_dir, download=False)
except cli.UserError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
print('loaded')
"""


def run_limited(loader, data_dir, limit_mb=LOADER_LIMIT_MB):
    """data.<loader>(data_dir) in a child process under an address-space limit -> (CompletedProcess, seconds)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    start = time.monotonic()
    result = subprocess.run([sys.executable, '-c', CHILD, loader, str(data_dir), str(limit_mb), ROOT],
                            capture_output=True, text=True, env=env, timeout=300)
    return result, time.monotonic() - start


def assert_child_data_error(result, seconds, path, *phrases):
    """The child printed one DataError line naming `path` (and `phrases`) and exited with code 2, quickly."""
    message = result.stderr.strip()
    assert result.returncode == 2, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert '\n' not in message and path in message, message
    assert 'MemoryError' not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert seconds < CHILD_SECONDS, f"took {seconds:.1f} s"


def assert_data_error(call, path, *phrases):
    """call() raises one DataError, a single line naming `path` and containing each of `phrases`."""
    with pytest.raises(data.DataError) as error:
        call()
    message = str(error.value)
    assert '\n' not in message and path in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def cifar_path(root, name='data_batch_3'):
    return os.path.join(root, data.CIFAR_FOLDER, name)


def write_bytes(path, content):
    with open(path, 'wb') as f:
        f.write(content)


class Reduce:
    """Pickles as func(*args), then __setstate__(state) when a state is given: whatever a file may ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def pickled_batch(images, labels, protocol=2):
    """A batch dict with bytes keys, as Python 3 re-pickles one: {b'data': images, b'labels': labels, ...}."""
    return pickle.dumps({b'batch_label': b'hostile', b'data': images, b'labels': labels}, protocol=protocol)


# ----------------------------------------------------------------------------- pickles, opcode by opcode
# Python 2's cPickle at protocol 2, as the original CIFAR-10 files are written: str as SHORT_BINSTRING or
# BINSTRING, small tuples as TUPLE1..3, numpy's dtype called with (code, 0, 1). Only what the tests need.

PROTO2, STOP = b'\x80\x02', b'.'


def op_string(value):
    return (b'U' + bytes([len(value)]) if len(value) < 256 else b'T' + len(value).to_bytes(4, 'little')) + value


def op_int(value):
    if 0 <= value < 256:
        return b'K' + bytes([value])
    if 0 <= value < 65536:
        return b'M' + value.to_bytes(2, 'little')
    return b'J' + value.to_bytes(4, 'little', signed=True)


def op_global(module, name):
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def op_tuple(*items):
    if 0 < len(items) <= 3:
        return b''.join(items) + (b'\x85', b'\x86', b'\x87')[len(items) - 1]  # TUPLE1..3
    return b'(' + b''.join(items) + b't'


def op_list(items):
    return b']' + (b'(' + b''.join(items) + b'e' if items else b'')


def op_dict(pairs):
    return b'}(' + b''.join(key + value for key, value in pairs) + b'u'


def op_dtype():
    """numpy.dtype('u1', 0, 1), then BUILD with its state, as Python 2's numpy pickled uint8."""
    state = op_tuple(op_int(3), op_string(b'|'), b'N', b'N', b'N', op_int(-1), op_int(-1), op_int(0))
    return op_global('numpy', 'dtype') + op_tuple(op_string(b'u1'), op_int(0), op_int(1)) + b'R' + state + b'b'


def op_array(shape, raw_ops):
    """numpy's protocol-2 form of a uint8 array: _reconstruct(ndarray, (0,), 'b'), then BUILD with the state
    (1, shape, dtype, False, raw bytes), the bytes pushed by `raw_ops`."""
    stand_in = op_global('numpy.core.multiarray', '_reconstruct') + op_tuple(
        op_global('numpy', 'ndarray'), op_tuple(op_int(0)), op_string(b'b')) + b'R'
    return stand_in + op_tuple(op_int(1), op_tuple(*map(op_int, shape)), op_dtype(), b'\x89', raw_ops) + b'b'


def python2_batch(data_ops, labels_ops):
    """A whole batch file as Python 2 wrote CIFAR-10's: {'batch_label': ..., 'labels': [...], 'data': array}."""
    return PROTO2 + op_dict([(op_string(b'batch_label'), op_string(b'training batch 3 of 5')),
                             (op_string(b'labels'), labels_ops), (op_string(b'data'), data_ops)]) + STOP


def images_and_labels(count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), [int(y) for y in rng.integers(0, 10, count)]


# ----------------------------------------------------------------------------- the control cases

def test_the_limit_holds_with_numpy_imported_and_real_format_files_load_under_it(tmp_path):
    result, _ = run_limited('allocate', 1024)
    assert result.returncode == 3, result.stderr  # a 1 GiB allocation fails: the limit is in force
    mnist = make_synthetic_mnist(str(tmp_path / 'mnist'))
    cifar = make_synthetic_cifar(str(tmp_path / 'cifar'))
    for loader, root in (('load_mnist', mnist), ('load_cifar10', cifar)):
        result, _ = run_limited(loader, root)
        assert result.returncode == 0 and 'loaded' in result.stdout, result.stderr


def test_synthetic_files_in_the_real_formats_load(synthetic_mnist, synthetic_cifar):
    mnist = data.load_mnist(synthetic_mnist, download=False)
    assert mnist['train_x'].shape == (200, 28, 28) and mnist['test_x'].shape == (50, 28, 28)
    cifar = data.load_cifar10(synthetic_cifar, download=False)
    assert cifar['train_x'].shape == (200, 3, 32, 32) and cifar['test_y'].shape == (40,)
    assert cifar['class_names'] == data.CIFAR_CLASSES


def test_python2_batch_written_opcode_by_opcode_loads_exactly(synthetic_cifar):
    images, labels = images_and_labels(3)
    write_bytes(cifar_path(synthetic_cifar), python2_batch(op_array((3, 3072), op_string(images.tobytes())),
                                                           op_list([op_int(y) for y in labels])))
    batch = data.unpickle(cifar_path(synthetic_cifar))
    assert batch['batch_label'] == 'training batch 3 of 5' and batch['labels'] == labels
    np.testing.assert_array_equal(batch['data'], images)
    # the array is plain: C-ordered uint8, a view of exactly the bytes the file holds for it
    assert batch['data'].flags.c_contiguous and batch['data'].dtype == np.uint8
    owner = batch['data']
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, bytes) and len(owner) == images.nbytes
    raw = data.load_cifar10(synthetic_cifar, download=False)
    np.testing.assert_array_equal(raw['train_x'][80:83].reshape(3, -1), images)
    np.testing.assert_array_equal(raw['train_y'][80:83], labels)


# ----------------------------------------------------------------------------- 1. memory bombs from tiny files

@functools.lru_cache(maxsize=None)
def zeros_gzip_member(megabytes=64):
    """One gzip member of `megabytes` MiB of zeros (about 64 KiB); members concatenate to a bigger stream."""
    return gzip.compress(bytes(megabytes << 20), compresslevel=9)


def gzip_bomb(header, gigabytes=1):
    """An IDX file: its header, then `gigabytes` GiB of zeros, in about 1 MiB of gzip."""
    return gzip.compress(header) + zeros_gzip_member() * (gigabytes * 16)


def idx_header(*shape):
    return bytes([0, 0, 8, len(shape)]) + b''.join(n.to_bytes(4, 'big') for n in shape)


@pytest.mark.parametrize('name, header, phrase', [
    ('train-images-idx3-ubyte.gz', idx_header(300, 28, 28), 'the file holds more'),
    ('t10k-labels-idx1-ubyte.gz', idx_header(50), 'the file holds more'),
    ('train-images-idx3-ubyte.gz', idx_header(1_000_000_000, 28, 28), 'more than an MNIST file holds'),
    ('train-images-idx3-ubyte.gz', idx_header(300_000, 28, 28), 'the file holds more'),  # the most allowed
], ids=['images-300', 'labels-50', 'header-1e9-images', 'header-at-the-limit'])
def test_gzip_bomb_stops_inflating_where_its_header_claim_ends(tmp_path, name, header, phrase):
    root = make_synthetic_mnist(str(tmp_path))
    path = os.path.join(root, 'MNIST', 'raw', name)
    write_bytes(path, gzip_bomb(header))
    assert os.path.getsize(path) < 2 << 20  # 1 GiB once inflated
    result, seconds = run_limited('load_mnist', root)
    assert_child_data_error(result, seconds, path, phrase)


def _cifar_bombs():
    """name -> (file content, a phrase of the DataError). Each asks for gigabytes from a loader that builds
    what the file says (the 400 arrays: from one that copies each array instead of viewing the file's bytes)."""
    labels = [0, 1, 2]
    one_row = b'\x00' * 3072
    big_text = 'a' * (4 << 20)  # 4 MiB, in the memo once, encoded or viewed again and again below
    encode_again = b'h\x00h\x01h\x02\x86R'  # _codecs.encode(memo[1], memo[2])
    view_again = op_array((1024, 4096), b'h\x00')  # an array of memo[0]
    return {
        # a zero-stride view over one row, declaring a million images (and as many labels): 3 GB once copied
        'zero-stride view': (pickled_batch(
            Reduce(np.ndarray, ((1_000_000, 3072), np.dtype('u1'), one_row, 0, (0, 1))),
            Reduce(np.ndarray, ((1_000_000,), np.dtype('i8'), b'\x00' * 8, 0, (0,)))), 'numpy.ndarray'),
        'uninitialised million images': (pickled_batch(
            Reduce(np.ndarray, ((1_000_000, 3072), np.dtype('u1'))), labels), 'refusing to call numpy.ndarray'),
        # CPython sizes its memo by the largest index: LONG_BINPUT 2**30 asks for 16 GiB of zeroed pointers
        'memo index 2**30': (PROTO2 + b'N' + b'r' + (2 ** 30).to_bytes(4, 'little') + STOP, 'memo index'),
        'BINBYTES8 of 1 TiB': (PROTO2 + b'\x8e' + (2 ** 40).to_bytes(8, 'little') + b'abc' + STOP, 'declares'),
        'one string encoded 2000 times': (
            PROTO2 + op_global('_codecs', 'encode') + b'q\x00' + b'X' + len(big_text).to_bytes(4, 'little') +
            big_text.encode() + b'q\x01' + b'X\x06\x00\x00\x00latin1q\x02' + b']q\x03(' +
            encode_again * 2000 + b'e' + STOP, 'encode to more bytes than the file has'),
        'one buffer made 400 arrays': (
            PROTO2 + op_dict([(op_string(b'batch_label'), op_string(big_text.encode()) + b'q\x00'),
                              (op_string(b'data'), op_list([view_again] * 400)),
                              (op_string(b'labels'), op_list([op_int(0)]))]) + STOP, "'data' must be"),
        'a flood of empty lists': (PROTO2 + b']' * (6 << 20) + STOP, 'opcodes'),
    }


CIFAR_BOMBS = _cifar_bombs()


@pytest.mark.parametrize('bomb', list(CIFAR_BOMBS))
def test_cifar_bomb_is_refused_before_it_allocates(synthetic_cifar, bomb):
    content, phrase = CIFAR_BOMBS[bomb]
    path = cifar_path(synthetic_cifar, 'data_batch_1')
    write_bytes(path, content)
    assert len(content) < 8 << 20
    result, seconds = run_limited('load_cifar10', synthetic_cifar)
    assert_child_data_error(result, seconds, path, phrase)


def test_an_idx_header_must_fit_its_file_before_anything_is_read(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=False)
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte')
    write_bytes(path, idx_header(300_000, 28, 28) + bytes(100))  # plain: the size must match exactly
    assert_data_error(lambda: data.load_mnist(root, download=False), path, 'the file holds 100 (truncated')
    root = make_synthetic_mnist(str(tmp_path / 'gz'))
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte.gz')
    write_bytes(path, gzip.compress(idx_header(300_000, 28, 28) + bytes(100)))  # ~60 bytes can't hold 235 MB
    assert_data_error(lambda: data.load_mnist(root, download=False), path, 'bytes of gzip can hold')


# ----------------------------------------------------------------------------- 2. arrays the unpickler must not build

RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, whatever its module is called


def _uint8_dtype(state=(3, '|', None, None, None, -1, -1, 0)):
    """numpy.dtype('u1') as Python 3 pickles it, with `state` for its __setstate__ (numpy's own by default)."""
    return Reduce(np.dtype, ('u1', False, True), state)


def _reconstructed(state, args=(np.ndarray, (0,), b'b')):
    """_reconstruct(*args), then __setstate__(state) unless None: numpy's protocol-2 form of an array."""
    return Reduce(RECONSTRUCT, args, state)

# Refused in the child: numpy's own __setstate__ with these states makes object or out-of-bounds dtypes, which
# a loader that let it run could crash on.
DTYPE_STATES = {
    'object flags': ((3, '|', None, None, None, -1, -1, 63), 'changes dtype'),
    'field past the item size': ((3, '|', None, ('a',), {'a': (np.dtype('u8'), 100)}, 1, 1, 16), 'changes dtype'),
    'item size 8': ((3, '|', None, None, None, 8, 1, 0), 'changes dtype'),
    'byte order x': ((3, 'x', None, None, None, -1, -1, 0), 'changes dtype'),
    'not a tuple': ([3, '|', None, None, None, -1, -1, 0], 'changes dtype'),
}


@pytest.mark.parametrize('state', list(DTYPE_STATES))
def test_a_dtype_cannot_be_changed_after_it_was_checked(synthetic_cifar, state):
    dtype_state, phrase = DTYPE_STATES[state]
    array = _reconstructed((1, (3, 3072), _uint8_dtype(dtype_state), False, bytes(3 * 3072)))
    path = cifar_path(synthetic_cifar)
    write_bytes(path, pickled_batch(array, [0, 1, 2]))
    result, seconds = run_limited('load_cifar10', synthetic_cifar)
    assert_child_data_error(result, seconds, path, phrase)


UNBUILDABLE = {  # name -> ('data' to pickle, a phrase of the DataError)
    # numpy.ndarray(shape, dtype) hands back uninitialised memory: stale heap bytes as pixels
    'uninitialised data': (Reduce(np.ndarray, ((3, 3072), np.dtype('u1'))), 'refusing to call numpy.ndarray'),
    'view with strides': (Reduce(np.ndarray, ((3, 3072), np.dtype('u1'), bytes(3072), 0, (0, 1))),
                          'refusing to call numpy.ndarray'),
    'data shorter than its shape': (_reconstructed((1, (3, 3072), _uint8_dtype(), False, bytes(3072))),
                                    'needs 9216 bytes, the file gives 3072'),
    'data longer than its shape': (_reconstructed((1, (3, 3072), _uint8_dtype(), False, bytes(10000))),
                                   'needs 9216 bytes, the file gives 10000'),
    'Fortran order': (_reconstructed((1, (3, 3072), _uint8_dtype(), True, bytes(9216))), 'not C-ordered'),
    'data as a list': (_reconstructed((1, (3, 3072), _uint8_dtype(), False, [0] * 10)), 'data is a list'),
    'data as str': (_reconstructed((1, (3, 3072), _uint8_dtype(), False, '\x00' * 9216)), 'data is a str'),
    'shape of strings': (_reconstructed((1, ('3', 3072), _uint8_dtype(), False, bytes(9216))), 'shape'),
    'negative shape': (_reconstructed((1, (-3, -3072), _uint8_dtype(), False, bytes(9216))), 'shape'),
    'state version 0': (_reconstructed((0, (3, 3072), _uint8_dtype(), False, bytes(9216))), 'array state'),
    'legacy 4-tuple state': (_reconstructed(((3, 3072), _uint8_dtype(), False, bytes(9216))), 'array state'),
    'dtype given as a str': (_reconstructed((1, (3, 3072), 'u1', False, bytes(9216))), 'dtype is a str'),
    'reconstruct of shape (5,)': (_reconstructed(None, (np.ndarray, (5,), b'b')), '_reconstruct'),
    'reconstruct of a list': (_reconstructed(None, (list, (0,), b'b')), 'refusing to load'),
    'array never filled': (_reconstructed(None), 'an array without its data'),
    'object dtype': (Reduce(np.dtype, ('O8', False, True)), 'refusing an array of dtype object'),
    'void dtype': (Reduce(np.dtype, ('V8', False, True)), 'refusing an array of dtype |V8'),
    'subarray dtype': (Reduce(np.dtype, ('(1000000,)u1', False, True)), 'refusing an array of dtype'),
    'datetime dtype': (Reduce(np.dtype, ('M8[s]', False, True)), 'refusing an array of dtype datetime64[s]'),
    'aligned dtype': (Reduce(np.dtype, ('u1', True, True)), 'refusing an array of dtype uint8'),
    'bytes(10**10)': (Reduce(bytes, (10 ** 10,)), 'refusing bytes() with arguments'),
    'a codec other than latin1': (Reduce(codecs.encode, ('x', 'rot13')), 'refusing _codecs.encode'),
    'eval': (Reduce(eval, ('1 + 1',)), 'refusing to load __builtin__.eval'),
    'numpy.load': (Reduce(np.load, ('x.npy',)), 'refusing to load numpy'),
}


@pytest.mark.parametrize('case', list(UNBUILDABLE))
def test_arrays_and_calls_the_real_files_never_hold_are_refused(synthetic_cifar, case):
    content, phrase = UNBUILDABLE[case]
    path = cifar_path(synthetic_cifar)
    write_bytes(path, pickled_batch(content, [0, 1, 2]))
    message = assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path, phrase)
    assert 'not a CIFAR-10 file' in message


def test_stale_heap_bytes_never_reach_a_message(synthetic_cifar):
    # labels as numpy.ndarray(shape, dtype): the old loader printed whatever the heap held as 'found ..'
    path = cifar_path(synthetic_cifar)
    images, _ = images_and_labels(3)
    write_bytes(path, pickled_batch(images, Reduce(np.ndarray, ((3,), np.dtype('i8')))))
    message = assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path,
                                'refusing to call numpy.ndarray')
    assert 'found' not in message


@pytest.mark.parametrize('content, phrase', [
    (PROTO2 + b'(i__main__\nEvil\n.', 'refusing pickle opcode INST'),  # protocol 0's class instantiation
    (PROTO2 + op_global('numpy', 'ndarray') + b')\x81.', 'refusing pickle opcode NEWOBJ'),
    (PROTO2 + b'\x82\x01.', 'refusing pickle opcode EXT1'),  # copyreg's extension registry
    (PROTO2 + b'Q.', 'refusing pickle opcode BINPERSID'),
    (PROTO2 + b'G' + bytes(8) + b'.', 'refusing pickle opcode BINFLOAT'),
    (b'\x80\x05\x97.', 'refusing pickle opcode NEXT_BUFFER'),  # out-of-band data
    (PROTO2 + b'\xff.', 'refusing pickle opcode 0xff'),
    (PROTO2 + b'cnumpy\nndarray', 'ends inside a GLOBAL'),
    (PROTO2 + b'N', 'ends before its STOP'),
], ids=['INST', 'NEWOBJ', 'EXT1', 'BINPERSID', 'BINFLOAT', 'NEXT_BUFFER', 'unknown', 'cut GLOBAL', 'no STOP'])
def test_opcodes_outside_cifar10s_files_are_refused(synthetic_cifar, content, phrase):
    path = cifar_path(synthetic_cifar, 'batches.meta')
    write_bytes(path, content)
    assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path, phrase)


def test_protocol5_frombuffer_must_be_c_ordered_and_exactly_backed(synthetic_cifar):
    images, labels = images_and_labels(3)
    path = cifar_path(synthetic_cifar)
    write_bytes(path, pickled_batch(np.asfortranarray(images), labels, protocol=5))
    assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path, 'not C-ordered')
    frombuffer = np.zeros(2, np.uint8).__reduce_ex__(5)[0]  # numpy's _frombuffer, as protocol 5 names it
    write_bytes(path, pickled_batch(Reduce(frombuffer, (bytearray(100), np.dtype('u1'), (3, 3072), 'C')),
                                    labels, protocol=5))
    assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path,
                      'needs 9216 bytes, the file gives 100')


# ----------------------------------------------------------------------------- 3. well formed, but wrong

def write_mnist_arrays(root, train_images, train_labels, test_images, test_labels):
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for name, array in zip(data.MNIST_FILES.values(), (train_images, train_labels, test_images, test_labels)):
        write_idx(os.path.join(raw, name + '.gz'), array)
    return raw


@pytest.mark.parametrize('train_shape, test_shape, bad_file, phrase', [
    ((20, 27, 28), (5, 28, 28), 'train-images-idx3-ubyte.gz', 'images are 27x28 pixels'),
    ((20, 28, 28), (5, 28, 27), 't10k-images-idx3-ubyte.gz', 'images are 28x27 pixels'),
    ((20, 784, 1), (5, 28, 28), 'train-images-idx3-ubyte.gz', 'images are 784x1 pixels'),
    ((0, 28, 28), (5, 28, 28), 'train-images-idx3-ubyte.gz', 'holds no images'),
    ((20, 28, 28), (0, 28, 28), 't10k-images-idx3-ubyte.gz', 'holds no images'),
], ids=['27x28', '28x27', '784x1', 'empty-train', 'empty-test'])
def test_mnist_images_must_be_28x28_and_each_split_non_empty(tmp_path, train_shape, test_shape, bad_file, phrase):
    raw = write_mnist_arrays(str(tmp_path), np.zeros(train_shape, np.uint8), np.zeros(train_shape[0], np.uint8),
                             np.zeros(test_shape, np.uint8), np.zeros(test_shape[0], np.uint8))
    assert_data_error(lambda: data.load_mnist(str(tmp_path), download=False), os.path.join(raw, bad_file), phrase)


def _nested(depth):
    """A protocol-2 batch whose labels are lists nested `depth` deep, written as the opcodes ]]]...aaa."""
    images, _ = images_and_labels(1)
    return PROTO2 + op_dict([(op_string(b'data'), op_array((1, 3072), op_string(images.tobytes()))),
                             (op_string(b'labels'), b']' * depth + b'a' * (depth - 1))]) + STOP


def _lists_shared_deeper():
    """Lists each one level deep in the dict, but holding each other through the memo: labels = [[[[0]]]]."""
    images, _ = images_and_labels(1)
    return PROTO2 + op_dict([(op_string(b'data'), op_array((1, 3072), op_string(images.tobytes()))),
                             (op_string(b'a'), b']q\x00K\x00a'), (op_string(b'b'), b']q\x01h\x00a'),
                             (op_string(b'c'), b']q\x02h\x01a'), (op_string(b'labels'), b']h\x02a')]) + STOP


def _self_containing_list():
    images, _ = images_and_labels(1)
    return PROTO2 + op_dict([(op_string(b'data'), op_array((1, 3072), op_string(images.tobytes()))),
                             (op_string(b'labels'), b']q\x00h\x00a')]) + STOP


CIFAR_WRONG = {  # name -> (file content, a phrase of the DataError)
    'labels a list of lists': (pickled_batch(images_and_labels(3)[0], [[0], [1], [2]]), 'labels[0] is a list'),
    'ragged labels': (pickled_batch(images_and_labels(3)[0], [0, [1, 2], 2]), 'labels[1] is a list'),
    'too few labels': (pickled_batch(images_and_labels(3)[0], [0, 1]), "'labels' must be 3 ints"),
    'too many labels': (pickled_batch(images_and_labels(3)[0], [0, 1, 2, 3]), 'got a list of 4'),
    'labels as str': (pickled_batch(images_and_labels(3)[0], ['0', '1', '2']), 'labels[0] is a str'),
    'labels as bytes': (pickled_batch(images_and_labels(3)[0], b'\x00\x01\x02'), 'got a str'),
    'labels as bools': (pickled_batch(images_and_labels(3)[0], [0, True, 2]), 'labels[1] is a bool'),
    'labels None': (pickled_batch(images_and_labels(3)[0], None), 'got a NoneType'),
    'labels a dict': (pickled_batch(images_and_labels(3)[0], {0: 1}), 'got a dict'),
    'labels a tuple': (pickled_batch(images_and_labels(3)[0], (0, 1, 2)), 'refusing a tuple'),
    'labels as floats': (pickled_batch(images_and_labels(3)[0], [0.0, 1.0, 2.0]), 'BINFLOAT'),
    'huge int label': (pickled_batch(images_and_labels(3)[0], [0, 2 ** 2000, 2]), 'labels must be in 0..9'),
    'huge negative label': (pickled_batch(images_and_labels(3)[0], [0, -2 ** 2000, 2]), 'labels must be in 0..9'),
    'labels 400 deep': (_nested(400), 'nested more than 3 deep'),
    'labels 100,000 deep': (_nested(100_000), 'opcodes'),
    'labels containing themselves': (_self_containing_list(), 'nested more than 3 deep'),
    'labels nesting through the memo': (_lists_shared_deeper(), 'nested more than 3 deep'),
    'data (3, 3071)': (pickled_batch(np.zeros((3, 3071), np.uint8), [0, 1, 2]), 'got uint8 (3, 3071)'),
    'data 1-D': (pickled_batch(np.zeros(9216, np.uint8), [0, 1, 2]), 'got uint8 (9216,)'),
    'data 3-D': (pickled_batch(np.zeros((3, 3, 1024), np.uint8), [0, 1, 2]), 'got uint8 (3, 3, 1024)'),
    'data int64': (pickled_batch(np.zeros((3, 3072), np.int64), [0, 1, 2]), 'got int64 (3, 3072)'),
    'data as bytes': (pickled_batch(bytes(9216), [0, 1, 2]), 'got str'),
    'no images': (pickled_batch(np.zeros((0, 3072), np.uint8), []), 'holds no images'),
    'no labels key': (pickle.dumps({b'data': np.zeros((3, 3072), np.uint8)}, protocol=2), "expected a dict"),
}


@pytest.mark.parametrize('case', list(CIFAR_WRONG))
def test_malformed_cifar_batches_are_named_by_the_loader(synthetic_cifar, case):
    content, phrase = CIFAR_WRONG[case]
    path = cifar_path(synthetic_cifar, 'test_batch')
    write_bytes(path, content)
    assert_data_error(lambda: data.load_cifar10(synthetic_cifar, download=False), path, phrase)
    assert_data_error(lambda: data.prepare_cifar10(synthetic_cifar, valid_size=10, download=False), path, phrase)


# ----------------------------------------------------------------------------- 4. Python 3 re-pickles, b'' included

@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_python3_repickled_batches_with_empty_bytes_load(synthetic_cifar, protocol):
    images, labels = images_and_labels(4, seed=protocol)
    path = cifar_path(synthetic_cifar, 'data_batch_2')
    with open(path, 'wb') as f:  # b'' is bytes() at protocol 2, an empty SHORT_BINBYTES from protocol 3 on
        pickle.dump({b'batch_label': b'', b'data': images, b'labels': labels,
                     b'filenames': [b'', b'cat.png', b'', b'dog.png']}, f, protocol=protocol)
    batch = data.unpickle(path)
    assert batch['batch_label'] == '' and batch['filenames'] == ['', 'cat.png', '', 'dog.png']
    np.testing.assert_array_equal(batch['data'], images)
    raw = data.load_cifar10(synthetic_cifar, download=False)
    np.testing.assert_array_equal(raw['train_x'][40:44].reshape(4, -1), images)
    np.testing.assert_array_equal(raw['train_y'][40:44], labels)
    with open(cifar_path(synthetic_cifar, 'batches.meta'), 'wb') as f:
        pickle.dump({b'label_names': [name.encode() for name in data.CIFAR_CLASSES], b'num_vis': 3072}, f,
                    protocol=protocol)
    assert data.load_cifar10(synthetic_cifar, download=False)['class_names'] == data.CIFAR_CLASSES


# ----------------------------------------------------------------------------- 5. offline first run

def listing(root):
    """Every path under root (relative), for comparing a folder before and after."""
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, folders, files in os.walk(root) for name in folders + files)


def fake_torchvision(monkeypatch, calls):
    """A torchvision whose MNIST download does what the real one does offline: it makes <root>/MNIST/raw,
    leaves a partial file there, and raises."""
    def mnist(root, train, download):
        calls.append(root)
        raw = os.path.join(root, 'MNIST', 'raw')
        os.makedirs(raw, exist_ok=True)
        write_bytes(os.path.join(raw, 'train-images-idx3-ubyte.gz'), b'\x1f\x8b partial')
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\nno network")
    module = types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=mnist))
    monkeypatch.setitem(sys.modules, 'torchvision', module)


def test_failed_mnist_download_leaves_no_new_folder(tmp_path, monkeypatch):
    calls = []
    fake_torchvision(monkeypatch, calls)
    data_dir = str(tmp_path / 'data')
    assert_data_error(lambda: data.load_mnist(data_dir), os.path.join(data_dir, 'MNIST', 'raw'),
                      'could not be downloaded (RuntimeError)')
    assert calls and not os.path.exists(data_dir)
    # data_dir existed, with something else in it: that stays, nothing is added
    os.makedirs(os.path.join(data_dir, 'runs'))
    write_bytes(os.path.join(data_dir, 'runs', 'results.json'), b'{}')
    assert_data_error(lambda: data.load_mnist(data_dir), data_dir, 'could not be downloaded')
    assert listing(data_dir) == ['runs', os.path.join('runs', 'results.json')]


def test_failed_mnist_download_keeps_the_files_that_were_there(tmp_path, monkeypatch):
    fake_torchvision(monkeypatch, [])
    raw = os.path.join(str(tmp_path), 'MNIST', 'raw')
    os.makedirs(raw)
    for name in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
        write_idx(os.path.join(raw, name), np.zeros((5, 28, 28) if 'images' in name else 5, np.uint8))
    before = listing(str(tmp_path))
    assert_data_error(lambda: data.load_mnist(str(tmp_path)), raw, 'could not be downloaded')
    assert listing(str(tmp_path)) == before  # the partial train-images file is gone, the others are not


def test_failed_mnist_download_with_the_real_torchvision_offline(tmp_path, monkeypatch):
    pytest.importorskip('torchvision')

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    data_dir = str(tmp_path / 'data')
    assert_data_error(lambda: data.load_mnist(data_dir), os.path.join(data_dir, 'MNIST', 'raw'),
                      'could not be downloaded')
    assert not os.path.exists(data_dir)


def _offline(monkeypatch, error=urllib.error.URLError('no network')):
    def urlopen(*args, **kwargs):
        raise error
    monkeypatch.setattr(data.urllib.request, 'urlopen', urlopen)


def test_failed_cifar_download_leaves_no_new_folder(tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.delenv('DATA_DIR', raising=False)  # no stand-in to name: the message gives a placeholder path
    data_dir = str(tmp_path / 'new' / 'data')
    message = assert_data_error(lambda: data.load_cifar10(data_dir), data_dir, 'download failed')
    assert not os.path.exists(tmp_path / 'new')
    assert f'python <path>/cifar-10-jpeg/make_batches.py {data_dir}' in message and data.CIFAR_URL in message
    # an existing data_dir keeps exactly what it had: no temporary folder, no half-made batch folder
    os.makedirs(os.path.join(data_dir, data.CIFAR_FOLDER))
    write_bytes(os.path.join(data_dir, data.CIFAR_FOLDER, 'data_batch_1'), b'mine')
    write_bytes(os.path.join(data_dir, 'notes.txt'), b'mine')
    before = listing(data_dir)
    assert_data_error(lambda: data.load_cifar10(data_dir), data_dir, 'download failed')
    assert listing(data_dir) == before


def test_interrupted_cifar_download_leaves_no_new_folder(tmp_path, monkeypatch):
    _offline(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        data.load_cifar10(str(tmp_path / 'data'))
    assert not os.path.exists(tmp_path / 'data')


def test_cifar_download_that_fails_its_md5_or_extraction_leaves_nothing(tmp_path, monkeypatch):
    archive = tar_archive([(f'{data.CIFAR_FOLDER}/data_batch_1', b'x' * 100), ('../escaped', b'x')])
    serve_archive(monkeypatch, archive, md5='0' * 32)
    assert_data_error(lambda: data.load_cifar10(str(tmp_path / 'md5')), data.CIFAR_URL, 'expected 0000')
    assert not os.path.exists(tmp_path / 'md5')
    serve_archive(monkeypatch, archive)  # the first member is extracted, the second refused
    os.makedirs(tmp_path / 'partial')
    assert_data_error(lambda: data.load_cifar10(str(tmp_path / 'partial')), data.CIFAR_URL, 'cannot extract')
    assert listing(str(tmp_path / 'partial')) == [] and not os.path.exists(tmp_path / 'escaped')


def _stand_in(root):
    script = os.path.join(root, 'cifar-10-jpeg', 'make_batches.py')
    os.makedirs(os.path.dirname(script))
    write_bytes(script, b'')
    return script


def test_missing_cifar_names_the_stand_ins_script_under_data_dir_env(tmp_path, monkeypatch):
    script = _stand_in(str(tmp_path / 'shared'))
    monkeypatch.setenv('DATA_DIR', str(tmp_path / 'shared'))
    data_dir = str(tmp_path / 'mine')
    message = assert_data_error(lambda: data.load_cifar10(data_dir, download=False), data_dir, 'download disabled')
    assert f'python {script} {data_dir};' in message and data.CIFAR_URL in message


def test_missing_cifar_in_the_stand_ins_own_folder_sends_the_batches_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv('DATA_DIR', raising=False)
    script = _stand_in(str(tmp_path))
    message = assert_data_error(lambda: data.load_cifar10(str(tmp_path), download=False), str(tmp_path))
    assert f'python {script} data, then pass --data-dir data' in message


# ----------------------------------------------------------------------------- 6. the real files, as before

@pytest.mark.integration
def test_real_files_load_and_are_reported_as_before(mnist_dir, cifar_dir):
    mnist = data.load_mnist(mnist_dir, download=False)
    assert mnist['originals'] is True and mnist['train_x'].shape == (60000, 28, 28)
    cifar = data.load_cifar10(cifar_dir, download=False)
    assert cifar['originals'] is False  # the JPEG stand-in
    assert cifar['train_x'].shape == (50000, 3, 32, 32) and cifar['test_x'].shape == (10000, 3, 32, 32)
    batch = data.unpickle(os.path.join(cifar_dir, data.CIFAR_FOLDER, 'data_batch_1'))
    assert batch['batch_label'] == 'training batch 1 of 5' and len(batch['labels']) == 10000
    np.testing.assert_array_equal(cifar['train_x'][:10000].reshape(10000, -1), batch['data'])
