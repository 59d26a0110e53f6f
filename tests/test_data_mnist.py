"""data.py's MNIST part: IDX files read back exactly, the lab's split and normalisation, and a DataError
naming the file for every way a file can be missing or broken."""
import os

import numpy as np
import pytest

import data
from conftest import make_synthetic_mnist, truncate, write_idx

FILES = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']


def write_mnist(root, train_images, train_labels, test_images, test_labels, gz=True):
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    suffix = '.gz' if gz else ''
    for name, array in zip(FILES, (train_images, train_labels, test_images, test_labels)):
        write_idx(os.path.join(raw, name + suffix), array)
    return raw


def random_mnist(rng, num_train=30, num_test=7):
    return (rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, num_train, dtype=np.uint8),
            rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, num_test, dtype=np.uint8))


@pytest.mark.parametrize('gz', [True, False])
def test_idx_files_load_exactly(tmp_path, gz):
    arrays = random_mnist(np.random.default_rng(0))
    write_mnist(str(tmp_path), *arrays, gz=gz)
    raw = data.load_mnist(str(tmp_path), download=False)
    for key, expected in zip(('train_x', 'train_y', 'test_x', 'test_y'), arrays):
        np.testing.assert_array_equal(raw[key], expected)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_prepare_mnist_splits_last_images_for_validation_and_subtracts_the_training_mean(tmp_path, dtype):
    train_images, train_labels, test_images, test_labels = random_mnist(np.random.default_rng(1), 30, 7)
    write_mnist(str(tmp_path), train_images, train_labels, test_images, test_labels)
    mnist = data.prepare_mnist(str(tmp_path), dtype, valid_size=10, download=False)

    mean = train_images[:20].astype(np.float64).mean() / 255  # the training part only, not validation
    assert mnist['mean'] == pytest.approx(mean, rel=1e-6)
    expected = {'train': (train_images[:20], train_labels[:20]), 'valid': (train_images[20:], train_labels[20:]),
                'test': (test_images, test_labels)}
    for split, (images, labels) in expected.items():
        x, y = mnist[f'{split}_x'], mnist[f'{split}_y']
        assert x.dtype == dtype and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, labels)
        np.testing.assert_allclose(x[:, 0], images / 255 - mean, atol=1e-6)
    assert abs(mnist['train_x'].mean(dtype=np.float64)) < 1e-6


def test_synthetic_fixture_loads(synthetic_mnist):
    raw = data.load_mnist(synthetic_mnist, download=False)
    assert raw['train_x'].shape == (200, 28, 28) and raw['test_y'].shape == (50,)


def raw_path(root, name):
    return os.path.join(root, 'MNIST', 'raw', name)


def test_truncated_file_names_it(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=False)
    path = raw_path(root, 'train-images-idx3-ubyte')
    truncate(path, -100)
    with pytest.raises(data.DataError, match='train-images-idx3-ubyte.*truncated'):
        data.load_mnist(root, download=False)


def test_truncated_gzip_stream_names_it(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=True)
    path = raw_path(root, 't10k-labels-idx1-ubyte.gz')
    truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(data.DataError, match='t10k-labels-idx1-ubyte.gz'):
        data.load_mnist(root, download=False)


def test_wrong_magic_names_the_file(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=True)
    path = raw_path(root, 'train-labels-idx1-ubyte.gz')
    # an images file (3-D magic) where the labels (1-D) belong
    write_idx(path, np.zeros((200, 28, 28), dtype=np.uint8))
    with pytest.raises(data.DataError, match='train-labels-idx1-ubyte.gz.*magic'):
        data.load_mnist(root, download=False)


def test_not_gzip_at_all_names_the_file(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=True)
    path = raw_path(root, 'train-images-idx3-ubyte.gz')
    with open(path, 'wb') as f:
        f.write(b'<html>404 not found</html>')
    with pytest.raises(data.DataError, match='train-images-idx3-ubyte.gz'):
        data.load_mnist(root, download=False)


def test_image_and_label_counts_must_match(tmp_path):
    rng = np.random.default_rng(2)
    train_images, train_labels, test_images, test_labels = random_mnist(rng, 30, 7)
    write_mnist(str(tmp_path), train_images, train_labels[:29], test_images, test_labels)
    with pytest.raises(data.DataError, match=r'30 images.*train-labels-idx1-ubyte.gz holds 29 labels'):
        data.load_mnist(str(tmp_path), download=False)


def test_label_outside_0_to_9_is_an_error(tmp_path):
    train_images, train_labels, test_images, test_labels = random_mnist(np.random.default_rng(3))
    test_labels[0] = 10
    write_mnist(str(tmp_path), train_images, train_labels, test_images, test_labels)
    with pytest.raises(data.DataError, match='t10k-labels-idx1-ubyte.gz.*10'):
        data.load_mnist(str(tmp_path), download=False)


def test_missing_files_say_which_and_where(tmp_path):
    root = make_synthetic_mnist(str(tmp_path), gz=True)
    os.remove(raw_path(root, 't10k-images-idx3-ubyte.gz'))
    with pytest.raises(data.DataError) as error:
        data.load_mnist(root, download=False)
    message = str(error.value)
    assert 't10k-images-idx3-ubyte' in message and os.path.join(root, 'MNIST', 'raw') in message
    assert 'train-images' not in message  # only what is missing


def test_too_few_training_images_for_the_validation_split(synthetic_mnist):
    with pytest.raises(data.DataError, match='200 images'):
        data.prepare_mnist(synthetic_mnist, download=False)  # 200 < the default 5000 validation images


@pytest.mark.integration
def test_real_mnist(mnist_dir):
    raw = data.load_mnist(mnist_dir, download=False)
    assert raw['train_x'].shape == (60000, 28, 28) and raw['train_y'].shape == (60000,)
    assert raw['test_x'].shape == (10000, 28, 28) and raw['test_y'].shape == (10000,)
    mnist = data.prepare_mnist(mnist_dir, np.float32, download=False)
    assert len(mnist['train_x']) == 55000 and len(mnist['valid_x']) == 5000 and len(mnist['test_x']) == 10000
    assert mnist['mean'] == pytest.approx(0.1307, abs=1e-3)
    assert set(np.unique(mnist['train_y'])) == set(range(10))
    # the validation images are the last 5,000 of the training file
    np.testing.assert_allclose(mnist['valid_x'][-1, 0], raw['train_x'][-1] / 255 - mnist['mean'], atol=1e-6)
