"""MNIST and CIFAR-10: read from disk, validated, split and normalised the lab's way.

CIFAR-10  <data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (the python version)
MNIST     <data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]  (torchvision's layout)

First the lab's own code for CIFAR-10 (shuffle_data, unpickle, prepare_cifar10), then MNIST, then the
downloads. Missing files are downloaded when a network exists; otherwise a DataError says which files to
put where, and the failed attempt leaves nothing behind. Every malformed file gives a one-line DataError
naming it.

A file is a claim, checked against its own size before anything is allocated for it: an IDX header must
fit its file (a gzip stream is inflated no further than the header says), and CIFAR-10's pickles are read
by safe_pickle, which admits only the constructions the real files use. Files are accepted by their
structure (shapes, dtype, label range and counts), so a re-encoded copy such as the JPEG stand-in loads
too; load_cifar10 reports whether they are the published files (their MD5s), and load_mnist prints a
one-line note when its .gz files are not.
"""
import contextlib
import gzip
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np

import readback
import safe_pickle
from cli import UserError


class DataError(UserError):
    """A data set is missing or malformed."""


# ----------------------------------------------------------------------------- CIFAR-10, the lab's code

CIFAR_FOLDER = 'cifar-10-batches-py'
CIFAR_TRAIN_BATCHES = [f'data_batch_{i}' for i in range(1, 6)]
CIFAR_FILES = CIFAR_TRAIN_BATCHES + ['test_batch']
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR_MD5 = 'c58f30108f718f92721af3b95e74349a'
# The published files' MD5s (as torchvision checks them). Files that differ, e.g. the JPEG-decoded
# stand-in, are still accepted when their structure is right; load_cifar10 reports which it read.
CIFAR_FILE_MD5 = {
    'data_batch_1': 'c99cafc152244af753f735de768cd75f', 'data_batch_2': 'd4bba439e000b95fd0a9bffe97cbabec',
    'data_batch_3': '54ebc095f3ab1f0389bbae665268c751', 'data_batch_4': '634d18415352ddfa80567beed471001a',
    'data_batch_5': '482c414d41f54cd18b22e5b47cb7c3cb', 'test_batch': '40351d587109b95175f43aff81a1287e',
}
CIFAR_TRAIN_SIZE = 50_000
CIFAR_MAX_FILE_BYTES = 64 << 20  # a batch of 10,000 images is 31 MB; a file twice that is no CIFAR-10 file
CLASS_NAME_MAX = 40              # 'automobile' is 10: a name is a label in tables and figures, not a text
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

def shuffle_data(data_x, data_y, rng):
    """The lab's function: the examples (N, ...) and their labels (N,) in one random order, drawn from `rng`
    (a np.random.Generator, seeded: the same split every run)."""
    indices = rng.permutation(data_x.shape[0])
    return np.ascontiguousarray(data_x[indices]), np.ascontiguousarray(data_y[indices])


def unpickle(path):
    """The lab's function: loads a CIFAR-10 python-version file -> what it holds, byte strings as str and arrays
    as read-only views of the file's bytes. safe_pickle reads it, since pickle.load would run any code a file
    names; a one-line DataError names the file if it is anything but a CIFAR-10 file."""
    try:
        raw = readback.read_bytes(path, CIFAR_MAX_FILE_BYTES)  # a regular file, no bigger than any CIFAR-10 file
    except readback.ReadBackError as error:
        raise DataError(_one_line(error))
    try:
        return safe_pickle.loads(raw)
    except Exception as error:  # a truncated or foreign pickle fails in many ways
        raise DataError(f"{path}: not a CIFAR-10 file ({type(error).__name__}: {_one_line(error)})")


def prepare_cifar10(data_dir, valid_size=5000, seed=42, download=True):
    """The lab's CIFAR-10, as its snippet prepares it: the training images shuffled (shuffle_data, seeded),
    the first `valid_size` of them for validation, the per-channel mean/std of the rest applied to all
    three splits.

    Images float32 (N, 3, 32, 32) in normalised units, labels int64; 'data_mean' and 'data_std' (3,) per
    channel on the 0-255 scale of the pixels, as the lab's code computes them, for undoing the normalisation
    (plots.draw_image); also 'class_names' and 'originals' from load_cifar10.
    """
    raw = load_cifar10(data_dir, download)
    num_images = raw['train_x'].shape[0]
    if not 0 < valid_size < num_images:
        raise DataError(f"cannot hold out {valid_size} of {num_images} CIFAR-10 training images for validation")
    shuffled_x, shuffled_y = shuffle_data(raw['train_x'], raw['train_y'], np.random.default_rng(seed))
    valid_x, valid_y, train_x, train_y = (shuffled_x[:valid_size], shuffled_y[:valid_size],
                                          shuffled_x[valid_size:], shuffled_y[valid_size:])
    mean, std = _channel_mean_std(train_x)
    data_mean, data_std = 255 * mean, 255 * std

    def normalise(images):  # in place on the float copy: the training split alone is 550 MB
        x = images.astype(np.float32)
        x -= data_mean[:, None, None]
        x /= data_std[:, None, None]
        return x

    return {
        'train_x': normalise(train_x), 'train_y': train_y, 'valid_x': normalise(valid_x), 'valid_y': valid_y,
        'test_x': normalise(raw['test_x']), 'test_y': raw['test_y'], 'data_mean': data_mean, 'data_std': data_std,
        'class_names': raw['class_names'], 'originals': raw['originals'],
    }


def load_cifar10(data_dir, download=True):
    """Raw CIFAR-10 -> dict: uint8 images (N, 3, 32, 32) and int64 labels for 'train' (all five batches)
    and 'test', 'class_names' and 'originals' (True when every batch file has the published MD5).
    'test_x' is a read-only view of test_batch's bytes.
    """
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        if not download:
            raise _missing_cifar10(data_dir, missing, "download disabled")
        _download_cifar10(data_dir, missing)
    train = [_read_batch(os.path.join(folder, name)) for name in CIFAR_TRAIN_BATCHES]
    test_x, test_y = _read_batch(os.path.join(folder, 'test_batch'))
    class_names = CIFAR_CLASSES
    meta_path = os.path.join(folder, 'batches.meta')
    if os.path.isfile(meta_path):
        meta = unpickle(meta_path)
        names = meta.get('label_names') if isinstance(meta, dict) else None
        if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, str) for n in names)):
            raise DataError(f"{meta_path}: expected a dict with 'label_names', a list of 10 class names")
        bad = next((n for n in names if not (0 < len(n) <= CLASS_NAME_MAX and n.isprintable() and n.strip() == n)),
                   None)
        if bad is not None:
            raise DataError(f"{meta_path}: class name {_one_line(repr(bad), 60)} is not 1 to {CLASS_NAME_MAX} "
                            f"printable characters")
        if len(set(names)) < len(names):
            raise DataError(f"{meta_path}: two classes share a name ({', '.join(_one_line(n, 40) for n in names)})")
        class_names = names
    return {
        'train_x': np.concatenate([x for x, _ in train]), 'train_y': np.concatenate([y for _, y in train]),
        'test_x': test_x, 'test_y': test_y, 'class_names': class_names,
        'originals': all(_md5(os.path.join(folder, name)) == CIFAR_FILE_MD5[name] for name in CIFAR_FILES),
    }


def _channel_mean_std(images):
    """uint8 (N, 3, H, W) -> per-channel mean and std on the [0, 1] scale, exactly, from 256-bin histograms
    (no float copy of the images, no rounding in the sums)."""
    values = np.arange(256, dtype=np.float64)
    mean, std = np.empty(3), np.empty(3)
    for c in range(3):
        counts = np.bincount(images[:, c].ravel(), minlength=256)
        mean[c] = counts @ values / counts.sum()
        std[c] = np.sqrt(counts @ (values - mean[c]) ** 2 / counts.sum())
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def _read_batch(path):
    """One batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,), N >= 1, or a DataError naming the file."""
    batch = unpickle(path)
    if not isinstance(batch, dict) or 'data' not in batch or 'labels' not in batch:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    images, labels = batch['data'], batch['labels']
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if len(images) == 0:  # an empty set would only fail later, as a division by zero
        raise DataError(f"{path}: holds no images")
    expected = f"{path}: 'labels' must be {len(images)} ints (one per image)"
    if not isinstance(labels, list) or len(labels) != len(images):
        raise DataError(f"{expected}, got " + (f"a list of {len(labels)}" if isinstance(labels, list)
                                                 else f"a {type(labels).__name__}"))
    not_int = next((i for i, label in enumerate(labels) if type(label) is not int), None)  # bool is no label
    if not_int is not None:
        raise DataError(f"{expected}, labels[{not_int}] is a {type(labels[not_int]).__name__}")
    if min(labels) < 0 or max(labels) > 9:
        raise DataError(f"{path}: labels must be in 0..9, found {min(labels)}..{max(labels)}")
    return images.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def _md5(path):
    """A file's MD5 as hex, read 1 MiB at a time."""
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _stand_in_command(data_dir):
    """The command that writes CIFAR-10's folder from the JPEG stand-in: its make_batches.py as found under
    data_dir or $DATA_DIR, else a placeholder path."""
    for root in (data_dir, os.environ.get('DATA_DIR')):
        script = os.path.join(root or '', 'cifar-10-jpeg', 'make_batches.py')
        if root and os.path.isfile(script):
            break
    else:
        return f"python <path>/cifar-10-jpeg/make_batches.py {data_dir}"
    if root == data_dir:  # the stand-in's own folder is read-only (its README): the batches go elsewhere
        return f"python {script} data, then pass --data-dir data"
    return f"python {script} {data_dir}"


def _missing_cifar10(data_dir, missing, reason):
    """The one-line DataError for CIFAR-10 files `missing` in data_dir: where they go and both ways to get them."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    return DataError(f"CIFAR-10 files {', '.join(missing)} are missing in {folder} ({_one_line(reason)}); with a "
                     f"network they are downloaded from {CIFAR_URL} (or put the python version's data_batch_1..5, "
                     f"test_batch and batches.meta there); without one, make them from the JPEG stand-in: "
                     f"{_stand_in_command(data_dir)}; or pass --data-dir / set DATA_DIR to the folder that holds "
                     f"{CIFAR_FOLDER}/")


def _download_cifar10(data_dir, missing):
    """Downloads the official archive, checks its MD5 and extracts it with tarfile's 'data' filter. When a step
    fails, what the attempt created goes: its temporary folder, a partly extracted folder, data_dir itself."""
    with _cleaned_up_on_failure(os.path.join(data_dir, CIFAR_FOLDER)):
        os.makedirs(data_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            archive = os.path.join(tmp, 'cifar-10-python.tar.gz')
            digest = hashlib.md5()
            try:
                with urllib.request.urlopen(CIFAR_URL, timeout=30) as response, open(archive, 'wb') as f:
                    for block in iter(lambda: response.read(1 << 20), b''):
                        digest.update(block)
                        f.write(block)
            except OSError as error:  # URLError, timeouts and refused connections are all OSErrors
                raise _missing_cifar10(data_dir, missing, f"download failed: {error}")
            if digest.hexdigest() != CIFAR_MD5:
                raise DataError(f"downloaded {CIFAR_URL} has MD5 {digest.hexdigest()}, expected {CIFAR_MD5}; try again")
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(data_dir, filter='data')  # no absolute paths, no '..', no links out
            except tarfile.TarError as error:
                raise DataError(f"cannot extract {CIFAR_URL} ({type(error).__name__}: {_one_line(error)})")



# ----------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, with 1 or 3 dimensions
# The published .gz files' MD5s, as torchvision checks them (uncompressed copies have none to compare with).
MNIST_MD5 = {
    'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
}
MNIST_TRAIN_SIZE, MNIST_VALID_SIZE = 55000, 5000
# The most data an IDX header may declare: 300,000 images of 28x28, four times MNIST's 70,000. Room for
# bigger sets of digits, none for a header that asks for gigabytes.
IDX_MAX_BYTES = 300_000 * 28 * 28
# Deflate expands its input at most 1032-fold, so n bytes of gzip can never hold more than 1032 n.
DEFLATE_MAX_RATIO = 1032


def read_idx(path, ndim):
    """Reads an IDX file of unsigned bytes (plain or gzipped) -> uint8 array with the header's shape.

    The header's claim is checked before its data is read: at most IDX_MAX_BYTES, and no more than the
    file can hold (exactly its size when plain, 1032 times it when gzipped). A gzip stream is then
    inflated only up to the declared size plus one byte, the one that shows trailing data, so a gzip
    bomb stops where its header's claim ends.
    """
    header_size = 4 + 4 * ndim
    gzipped = path.endswith('.gz')
    try:
        stored_size = os.path.getsize(path)
        with (gzip.open if gzipped else open)(path, 'rb') as f:
            header = f.read(header_size)
            if len(header) < header_size:
                raise DataError(f"{path}: too short for an IDX header ({len(header)} bytes)")
            magic = int.from_bytes(header[:4], 'big')
            if magic != IDX_MAGIC[ndim]:
                raise DataError(f"{path}: not an IDX file of {ndim}-D unsigned bytes (magic {magic:#010x}, "
                                f"expected {IDX_MAGIC[ndim]:#010x})")
            shape = tuple(int.from_bytes(header[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
            size = math.prod(shape)
            claim = f"{path}: header says {shape} = {size} bytes of data"
            if size > IDX_MAX_BYTES:
                raise DataError(f"{claim}, more than an MNIST file holds ({IDX_MAX_BYTES} at most)")
            if gzipped and size > DEFLATE_MAX_RATIO * stored_size:
                raise DataError(f"{claim}, more than {stored_size} bytes of gzip can hold (corrupt?)")
            if not gzipped and size != stored_size - header_size:
                raise DataError(f"{claim}, the file holds {stored_size - header_size} (truncated or corrupt?)")
            body = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as error:  # a broken gzip stream raises any of them
        raise DataError(f"{path}: cannot read ({_one_line(error)})")
    if len(body) < size:
        raise DataError(f"{claim}, the file holds {len(body)} (truncated or corrupt?)")
    if len(body) > size:
        raise DataError(f"{claim}, the file holds more (trailing data, or a gzip bomb?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _mnist_path(raw_dir, name):
    """The plain file if present, else the .gz, else None."""
    for candidate in (name, name + '.gz'):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _download_mnist(data_dir):
    """torchvision's download into <data_dir>/MNIST/raw; when it fails, a DataError saying what to put where,
    and no folder or partial file left that the attempt created."""
    raw_dir = os.path.join(data_dir, 'MNIST', 'raw')
    try:
        with _cleaned_up_on_failure(raw_dir):
            import torchvision  # here, not at the top: the NumPy scripts need no torch once the files are there
            torchvision.datasets.MNIST(data_dir, train=True, download=True)
            torchvision.datasets.MNIST(data_dir, train=False, download=True)
    except Exception as error:
        raise DataError(f"MNIST is not in {raw_dir} and could not be downloaded "
                        f"({type(error).__name__}); put {', '.join(n + '.gz' for n in MNIST_FILES.values())} "
                        f"there, or pass --data-dir / set DATA_DIR to the folder that holds MNIST/raw/")


def load_mnist(data_dir, download=True):
    """Raw MNIST -> dict of uint8 images (N, 28, 28) and uint8 labels (N,) for 'train' and 'test', N >= 1, and
    'originals': True when every file is a published .gz (its MD5). Other files are accepted by their
    structure, with a one-line note on stdout."""
    raw_dir = os.path.join(data_dir, 'MNIST', 'raw')
    paths = {key: _mnist_path(raw_dir, name) for key, name in MNIST_FILES.items()}
    if None in paths.values():
        if not download:
            missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
            raise DataError(f"missing {', '.join(missing)} (or .gz) in {raw_dir}")
        _download_mnist(data_dir)
        paths = {key: _mnist_path(raw_dir, name) for key, name in MNIST_FILES.items()}
    out = {}
    for split in ('train', 'test'):
        images_path, labels_path = paths[f'{split}_images'], paths[f'{split}_labels']
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]} pixels, MNIST's are 28x28")
        if images.shape[0] == 0:  # an empty split would only fail later, as a division by zero
            raise DataError(f"{images_path}: holds no images")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                            f"{labels.shape[0]} labels")
        if labels.max() > 9:
            raise DataError(f"{labels_path}: label {labels.max()} is not a digit")
        out[f'{split}_x'], out[f'{split}_y'] = images, labels
    others = [os.path.basename(path) for path in paths.values()
              if MNIST_MD5.get(os.path.basename(path)) != _md5(path)]
    out['originals'] = not others
    if others:
        which = 'the MNIST files' if len(others) == len(paths) else ', '.join(others)
        print(f"note: {which} in {raw_dir} are not the published originals (MD5); accepted by their structure")
    return out


def prepare_mnist(data_dir, dtype=np.float32, valid_size=MNIST_VALID_SIZE, download=True):
    """The lab's MNIST: the last `valid_size` training images for validation, the rest for training.

    Images (N, 1, 28, 28) in `dtype`, scaled to [0, 1] minus the mean of the training part;
    labels int64 (N,). Also returns 'mean', the subtracted value, and 'originals' (load_mnist).
    """
    raw = load_mnist(data_dir, download)
    train_x = raw['train_x'][:, None].astype(dtype) / dtype(255)
    num_train = train_x.shape[0] - valid_size
    if num_train <= 0:
        raise DataError(f"MNIST training set has {train_x.shape[0]} images, too few for {valid_size} validation images")
    test_x = raw['test_x'][:, None].astype(dtype) / dtype(255)
    mean = train_x[:num_train].mean(dtype=np.float64)
    return {
        'train_x': train_x[:num_train] - dtype(mean), 'train_y': raw['train_y'][:num_train].astype(np.int64),
        'valid_x': train_x[num_train:] - dtype(mean), 'valid_y': raw['train_y'][num_train:].astype(np.int64),
        'test_x': test_x - dtype(mean), 'test_y': raw['test_y'].astype(np.int64),
        'mean': float(mean), 'originals': raw['originals'],
    }


# ----------------------------------------------------------------------------- files and downloads

def _one_line(text, limit=300):
    """An error text fit for a one-line message: whitespace runs (newlines too) made one space, at most
    `limit` characters (a name a file declares can be megabytes long)."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit] + '...'


@contextlib.contextmanager
def _cleaned_up_on_failure(folder):
    """Wraps a download into `folder`: if it fails or is interrupted, what the attempt created goes, and
    nothing that was there before. That is `folder` with the parents the attempt made for it or, when
    `folder` existed, the entries that are new in it (partial downloads)."""
    created, path = None, os.path.abspath(folder)
    while not os.path.exists(path):  # climb to the first folder that exists: the one below it is new
        created, path = path, os.path.dirname(path)
    existing = None if created else set(os.listdir(folder))
    try:
        yield
    except BaseException:
        if created:
            new_paths = [created]
        else:
            new_paths = [os.path.join(folder, name) for name in sorted(set(os.listdir(folder)) - existing)]
        for new_path in new_paths:
            if os.path.isdir(new_path) and not os.path.islink(new_path):
                shutil.rmtree(new_path, ignore_errors=True)
            elif os.path.lexists(new_path):
                os.remove(new_path)
        raise


