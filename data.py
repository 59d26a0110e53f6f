"""MNIST and CIFAR-10: read from disk, validated, split and normalised the lab's way.

MNIST     <data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]  (torchvision's layout)
CIFAR-10  <data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (the python version)

Missing files are downloaded when a network exists; otherwise a DataError says
which files to put where. Every malformed file gives a DataError naming it.
CIFAR-10's pickles are read by a restricted unpickler that builds nothing but numeric arrays,
lists, dicts, strings and ints. Files are accepted by their structure (shapes, dtype, label
range and counts), so a re-encoded copy such as the JPEG stand-in loads too; load_cifar10
reports whether they are the published files (their MD5s), and load_mnist prints a one-line note
when its .gz files are not.
"""
import codecs
import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np

from cli import UserError


class DataError(UserError):
    """A data set is missing or malformed."""


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


def read_idx(path, ndim):
    """Reads an IDX file of unsigned bytes (plain or gzipped) -> uint8 array with the header's shape."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # a broken gzip stream raises any of them
        raise DataError(f"{path}: cannot read ({error})")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], 'big')
    if magic != IDX_MAGIC[ndim]:
        raise DataError(f"{path}: not an IDX file of {ndim}-D unsigned bytes (magic {magic:#010x}, "
                        f"expected {IDX_MAGIC[ndim]:#010x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    if len(raw) - header_size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes of data, "
                        f"the file holds {len(raw) - header_size} (truncated or corrupt?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _mnist_path(raw_dir, name):
    """The plain file if present, else the .gz, else None."""
    for candidate in (name, name + '.gz'):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _download_mnist(data_dir):
    try:
        import torchvision
        os.makedirs(data_dir, exist_ok=True)
        torchvision.datasets.MNIST(data_dir, train=True, download=True)
        torchvision.datasets.MNIST(data_dir, train=False, download=True)
    except Exception as error:
        raise DataError(f"MNIST is not in {os.path.join(data_dir, 'MNIST', 'raw')} and could not be downloaded "
                        f"({type(error).__name__}); put {', '.join(n + '.gz' for n in MNIST_FILES.values())} "
                        f"there, or pass --data-dir / set DATA_DIR to the folder that holds MNIST/raw/")


def load_mnist(data_dir, download=True):
    """Raw MNIST -> dict of uint8 images (N, 28, 28) and uint8 labels (N,) for 'train' and 'test', and
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
        images = read_idx(paths[f'{split}_images'], 3)
        labels = read_idx(paths[f'{split}_labels'], 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{paths[f'{split}_images']} holds {images.shape[0]} images but "
                            f"{paths[f'{split}_labels']} holds {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{paths[f'{split}_labels']}: label {labels.max()} is not a digit")
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


# ----------------------------------------------------------------------------- CIFAR-10

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
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def _numeric_dtype(*args):
    """np.dtype, refusing object dtypes: an object array would let the file build arbitrary contents."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing an array of dtype {dtype}")
    return dtype


def _latin1_encode(text, encoding):
    """How Python 3 pickles bytes at protocol 2: _codecs.encode(str, 'latin1'); no other codec."""
    if encoding != 'latin1':
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, 'latin1')


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's files hold: dicts, lists, strings, ints and numeric NumPy arrays.

    A plain pickle.load calls any callable a file names (os.system included); this one resolves
    only the four names an array of numbers needs and refuses everything else.
    """

    def find_class(self, module, name):
        if (module, name) in {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')}:
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, without importing numpy.core
        if (module, name) == ('numpy', 'ndarray'):
            return np.ndarray
        if (module, name) == ('numpy', 'dtype'):
            return _numeric_dtype
        if (module, name) == ('_codecs', 'encode'):  # re-pickled batches (Python 3)
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def unpickle(path):
    """Loads a CIFAR-10 python-version file with the restricted unpickler; byte strings come back as str."""
    try:
        with open(path, 'rb') as f:
            # encoding='bytes' hands the pixel string to NumPy untouched (latin1 would decode and re-encode 30 MB)
            return _decode_strings(_RestrictedUnpickler(f, encoding='bytes').load())
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})")
    except Exception as error:  # a truncated or foreign pickle fails in many ways
        raise DataError(f"{path}: not a CIFAR-10 file ({type(error).__name__}: {error})")


def _decode_strings(obj):
    """Python-2 strings in dict keys and lists -> str."""
    if isinstance(obj, dict):
        return {_decode_strings(key): _decode_strings(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode_strings(item) for item in obj]
    return obj.decode('latin1') if isinstance(obj, bytes) else obj


def _read_batch(path):
    """One batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,), or a DataError naming the file."""
    batch = unpickle(path)
    if not isinstance(batch, dict) or 'data' not in batch or 'labels' not in batch:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    images, labels = batch['data'], np.asarray(batch['labels'])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in 'iu':
        raise DataError(f"{path}: 'labels' must be {images.shape[0]} ints (one per image), got "
                        f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _md5(path):
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _missing_cifar10(folder, missing, reason):
    return DataError(f"CIFAR-10 files {', '.join(missing)} are missing in {folder} ({reason}); put the python "
                     f"version's data_batch_1..5, test_batch and batches.meta there (from {CIFAR_URL}), "
                     f"or pass --data-dir / set DATA_DIR to the folder that holds {CIFAR_FOLDER}/")


def _download_cifar10(data_dir, missing):
    """Downloads the official archive, checks its MD5 and extracts it with tarfile's 'data' filter."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
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
            raise _missing_cifar10(folder, missing, f"download failed: {error}")
        if digest.hexdigest() != CIFAR_MD5:
            raise DataError(f"downloaded {CIFAR_URL} has MD5 {digest.hexdigest()}, expected {CIFAR_MD5}; try again")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(data_dir, filter='data')  # no absolute paths, no '..', no links out
        except tarfile.TarError as error:
            raise DataError(f"cannot extract {CIFAR_URL} ({type(error).__name__}: {error})")


def load_cifar10(data_dir, download=True):
    """Raw CIFAR-10 -> dict: uint8 images (N, 3, 32, 32) and int64 labels for 'train' (all five batches)
    and 'test', 'class_names' and 'originals' (True when every batch file has the published MD5).
    """
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        if not download:
            raise _missing_cifar10(folder, missing, "download disabled")
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


def prepare_cifar10(data_dir, valid_size=5000, seed=42, download=True):
    """The lab's CIFAR-10: `valid_size` random training images (seeded) for validation,
    per-channel mean/std of the remaining training images applied to all three splits.

    Images float32 (N, 3, 32, 32) in normalised units, labels int64; 'mean' and 'std' (3,) are
    per channel on the [0, 1] scale, for undoing the normalisation (denormalise); also
    'class_names' and 'originals' from load_cifar10.
    """
    raw = load_cifar10(data_dir, download)
    num_images = raw['train_x'].shape[0]
    if not 0 < valid_size < num_images:
        raise DataError(f"cannot hold out {valid_size} of {num_images} CIFAR-10 training images for validation")
    order = np.random.default_rng(seed).permutation(num_images)
    valid_idx, train_idx = order[:valid_size], order[valid_size:]
    mean, std = _channel_mean_std(raw['train_x'][train_idx])

    def normalise(images):  # in place on the float copy: the training split alone is 550 MB
        x = images.astype(np.float32)
        x -= 255 * mean[:, None, None]
        x /= 255 * std[:, None, None]
        return x

    return {
        'train_x': normalise(raw['train_x'][train_idx]), 'train_y': raw['train_y'][train_idx],
        'valid_x': normalise(raw['train_x'][valid_idx]), 'valid_y': raw['train_y'][valid_idx],
        'test_x': normalise(raw['test_x']), 'test_y': raw['test_y'],
        'mean': mean, 'std': std, 'class_names': raw['class_names'], 'originals': raw['originals'],
    }


def denormalise(images, mean, std):
    """Normalised (N, 3, H, W) float -> uint8 RGB (N, H, W, 3) for display."""
    rgb = images.transpose(0, 2, 3, 1) * std + mean
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
