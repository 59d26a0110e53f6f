"""MNIST and CIFAR-10: read from disk, validated, split and normalised the lab's way.

MNIST     <data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]  (torchvision's layout)
CIFAR-10  <data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (the python version)

Missing files are downloaded when a network exists; otherwise a DataError says
which files to put where. Every malformed file gives a DataError naming it.
"""
import codecs
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request

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
MNIST_TRAIN_SIZE, MNIST_VALID_SIZE = 55000, 5000


def read_idx(path, ndim):
    """Reads an IDX file of unsigned bytes (plain or gzipped) -> uint8 array with the header's shape."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as error:
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
    """Raw MNIST -> dict of uint8 images (N, 28, 28) and uint8 labels (N,) for 'train' and 'test'."""
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
    return out


def prepare_mnist(data_dir, dtype=np.float32, valid_size=MNIST_VALID_SIZE, download=True):
    """The lab's MNIST: the last `valid_size` training images for validation, the rest for training.

    Images (N, 1, 28, 28) in `dtype`, scaled to [0, 1] minus the mean of the training part;
    labels int64 (N,). Also returns 'mean', the subtracted value.
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
        'mean': float(mean),
    }


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_FOLDER = 'cifar-10-batches-py'
CIFAR_TRAIN_BATCHES = [f'data_batch_{i}' for i in range(1, 6)]
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's batch files hold: dicts, lists, strings, bytes, ints and NumPy arrays.

    A plain pickle.load runs any callable a file names; this refuses everything but ndarray reconstruction.
    """
    ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('_codecs', 'encode'),  # how Python 3 writes bytes at protocol 2 (re-pickled batches)
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == '_reconstruct':
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, without importing numpy.core
        if module == '_codecs':
            return codecs.encode
        return getattr(np, name)


def unpickle(path):
    """Loads a CIFAR-10 python-version file with the restricted unpickler; byte strings come back as str."""
    try:
        with open(path, 'rb') as f:
            # encoding='bytes' hands the pixel string to NumPy untouched (latin1 would decode and re-encode 30 MB)
            return _decode_strings(_RestrictedUnpickler(f, encoding='bytes').load())
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})")
    except Exception as error:  # a truncated or foreign pickle fails in many ways
        raise DataError(f"{path}: not a CIFAR-10 batch file ({type(error).__name__}: {error})")


def _decode_strings(obj):
    """Python-2 strings in dict keys and lists -> str."""
    if isinstance(obj, dict):
        return {_decode_strings(key): _decode_strings(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode_strings(item) for item in obj]
    return obj.decode('latin1') if isinstance(obj, bytes) else obj


def _read_batch(path):
    batch = unpickle(path)
    if not isinstance(batch, dict) or 'data' not in batch or 'labels' not in batch:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    images, labels = batch['data'], np.asarray(batch['labels'])
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in 'iu' or \
            (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: 'labels' must be {images.shape[0]} ints in 0..9")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar10(data_dir):
    """Downloads the official archive, checks its MD5 and extracts it with tarfile's 'data' filter."""
    os.makedirs(data_dir, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            archive = os.path.join(tmp, 'cifar-10-python.tar.gz')
            with urllib.request.urlopen(CIFAR_URL, timeout=30) as response, open(archive, 'wb') as f:
                shutil.copyfileobj(response, f)
            with open(archive, 'rb') as f:
                md5 = hashlib.md5(f.read()).hexdigest()
            if md5 != CIFAR_MD5:
                raise DataError(f"downloaded {CIFAR_URL} has MD5 {md5}, expected {CIFAR_MD5}; try again")
            with tarfile.open(archive) as tar:
                tar.extractall(data_dir, filter='data')  # no absolute paths, no '..', no links out
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"CIFAR-10 is not in {os.path.join(data_dir, CIFAR_FOLDER)} and could not be downloaded "
                        f"({type(error).__name__}); put {', '.join(CIFAR_TRAIN_BATCHES)}, test_batch and "
                        f"batches.meta there (the python version of CIFAR-10), or pass --data-dir / set DATA_DIR")


def load_cifar10(data_dir, download=True):
    """Raw CIFAR-10 -> uint8 images (N, 3, 32, 32), int64 labels and the class names."""
    folder = os.path.join(data_dir, CIFAR_FOLDER)
    names = CIFAR_TRAIN_BATCHES + ['test_batch']
    if not all(os.path.isfile(os.path.join(folder, name)) for name in names):
        if not download:
            raise DataError(f"missing CIFAR-10 batch files in {folder}")
        _download_cifar10(data_dir)
    train = [_read_batch(os.path.join(folder, name)) for name in CIFAR_TRAIN_BATCHES]
    test_x, test_y = _read_batch(os.path.join(folder, 'test_batch'))
    class_names = CIFAR_CLASSES
    meta_path = os.path.join(folder, 'batches.meta')
    if os.path.isfile(meta_path):
        meta = unpickle(meta_path)
        if isinstance(meta, dict) and isinstance(meta.get('label_names'), list) and len(meta['label_names']) == 10:
            class_names = [str(name) for name in meta['label_names']]
    return {
        'train_x': np.concatenate([x for x, _ in train]), 'train_y': np.concatenate([y for _, y in train]),
        'test_x': test_x, 'test_y': test_y, 'class_names': class_names,
    }


def prepare_cifar10(data_dir, valid_size=5000, seed=42, download=True):
    """The lab's CIFAR-10: `valid_size` random training images (seeded) for validation,
    per-channel mean/std of the remaining training images applied to all three splits.

    Images float32 (N, 3, 32, 32) in normalised units, labels int64; 'mean' and 'std' are
    per channel on the [0, 1] scale, for undoing the normalisation.
    """
    raw = load_cifar10(data_dir, download)
    num_images = raw['train_x'].shape[0]
    if not 0 < valid_size < num_images:
        raise DataError(f"cannot hold out {valid_size} of {num_images} CIFAR-10 training images for validation")
    order = np.random.default_rng(seed).permutation(num_images)
    valid_idx, train_idx = order[:valid_size], order[valid_size:]
    train_x = raw['train_x'][train_idx].astype(np.float32) / 255
    mean = train_x.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
    std = train_x.std(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)

    def normalise(images):
        return (images.astype(np.float32) / 255 - mean[:, None, None]) / std[:, None, None]

    return {
        'train_x': (train_x - mean[:, None, None]) / std[:, None, None], 'train_y': raw['train_y'][train_idx],
        'valid_x': normalise(raw['train_x'][valid_idx]), 'valid_y': raw['train_y'][valid_idx],
        'test_x': normalise(raw['test_x']), 'test_y': raw['test_y'],
        'mean': mean, 'std': std, 'class_names': raw['class_names'],
    }


def denormalise(images, mean, std):
    """Normalised (N, 3, H, W) float -> uint8 RGB (N, H, W, 3) for display."""
    rgb = images.transpose(0, 2, 3, 1) * std + mean
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
