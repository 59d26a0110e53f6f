"""Shared fixtures: the repository on sys.path, tiny synthetic data sets in the real file formats,
and the real data sets for tests marked `integration`."""
import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.environ.get('DATA_DIR', os.path.join(ROOT, '..', 'shared', 'data'))


def torch_lab_net(net=None):
    """The lab's MNIST net in torch.nn (float64), one module per layer of train.make_net in the same order,
    the independent oracle of the NumPy layers; with a NumPy `net`, its weights copied in.
    Returns (model, {name of a NumPy layer with parameters: its torch module})."""
    import torch
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, padding=2), torch.nn.MaxPool2d(2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5, padding=2), torch.nn.MaxPool2d(2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(1568, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).double()
    modules = [module for module in model if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    if net is None:
        return model, dict(zip(('conv1', 'conv2', 'fc3', 'logits'), modules))
    ours = [layer for layer in net if layer.has_params]
    with torch.no_grad():
        for layer, module in zip(ours, modules):
            module.weight.copy_(torch.from_numpy(layer.weights.reshape(module.weight.shape)))
            module.bias.copy_(torch.from_numpy(layer.bias))
    return model, dict(zip([layer.name for layer in ours], modules))


def write_idx(path, array, compress=None):
    """Writes a uint8 array as an IDX file (gzipped when the path ends in .gz)."""
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def truncate(path, keep):
    """Cuts a file to its first `keep` bytes (negative: drops the last -keep), as an interrupted download would."""
    size = os.path.getsize(path)
    os.truncate(path, keep if keep >= 0 else size + keep)


def write_cifar_batch(path, images, labels):
    """A batch file as CIFAR-10's python version has it: a pickled dict, 'data' (N, 3072) uint8, 'labels' list."""
    with open(path, 'wb') as f:
        pickle.dump({b'batch_label': b'synthetic', b'data': images.reshape(len(images), -1).astype(np.uint8),
                     b'labels': [int(y) for y in labels]}, f, protocol=2)


def tar_archive(members):
    """A .tar.gz in memory holding (name, bytes) members, as the CIFAR-10 download would deliver."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def serve_archive(monkeypatch, archive_bytes, md5=None):
    """Makes data.py's CIFAR-10 download receive archive_bytes (with that MD5, or `md5`) instead of the network."""
    import hashlib
    import io
    import data
    monkeypatch.setattr(data.urllib.request, 'urlopen', lambda url, timeout: io.BytesIO(archive_bytes))
    monkeypatch.setattr(data, 'CIFAR_MD5', md5 or hashlib.md5(archive_bytes).hexdigest())


def make_synthetic_mnist(root, num_train=200, num_test=50, gz=True, seed=0):
    """Digits drawn as class-dependent bright bars on noise, so a net can learn them quickly."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    suffix = '.gz' if gz else ''
    for prefix, count in (('train', num_train), ('t10k', num_test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
        write_idx(os.path.join(raw, f'{prefix}-images-idx3-ubyte{suffix}'), images)
        write_idx(os.path.join(raw, f'{prefix}-labels-idx1-ubyte{suffix}'), labels)
    return root


CIFAR_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def make_synthetic_cifar(root, per_batch=40, seed=0, class_names=CIFAR_NAMES):
    """Five training batches and a test batch of `per_batch` images; class = the brightest channel/region."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 80, (per_batch, 3, 32, 32)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, label % 3, 3 * label:3 * label + 3, :] = 255
        write_cifar_batch(os.path.join(folder, name), images, labels)
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({b'label_names': [name.encode('latin1') for name in class_names],
                     b'num_cases_per_batch': per_batch}, f, protocol=2)
    return root


@pytest.fixture
def synthetic_mnist(tmp_path):
    return make_synthetic_mnist(str(tmp_path / 'data'))


@pytest.fixture
def synthetic_cifar(tmp_path):
    return make_synthetic_cifar(str(tmp_path / 'data'))


def _require_shared(path):
    if not os.path.exists(path):
        if os.environ.get('CI'):
            pytest.fail(f"CI needs the real data at {path}")
        pytest.skip(f"real data not found at {path}")


@pytest.fixture(scope='session')
def mnist_dir():
    """The real MNIST (../shared/data or $DATA_DIR)."""
    _require_shared(os.path.join(SHARED_DATA, 'MNIST', 'raw'))
    return SHARED_DATA


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    """The CIFAR-10 JPEG stand-in, written once per session by make_batches.py into a temporary folder."""
    script = os.path.join(SHARED_DATA, 'cifar-10-jpeg', 'make_batches.py')
    _require_shared(script)
    out = tmp_path_factory.mktemp('cifar')
    subprocess.run([sys.executable, script, str(out)], check=True, capture_output=True)
    return str(out)
