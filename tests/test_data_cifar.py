"""CIFAR-10 loading: the restricted unpickler, validation of every file, the lab's split and normalisation."""
import os
import pickle
import urllib.error

import numpy as np
import pytest
import skimage.io

import data
import plots
from conftest import make_synthetic_cifar, serve_archive, tar_archive, truncate


def _batch_path(root, name='data_batch_3'):
    return os.path.join(root, 'cifar-10-batches-py', name)


class _Evil:
    """Pickles to 'call os.system(command)' when loaded."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running_it(synthetic_cifar, tmp_path):
    marker = tmp_path / 'pwned'
    with open(_batch_path(synthetic_cifar), 'wb') as f:
        pickle.dump({'data': _Evil(f'touch {marker}'), 'labels': [0]}, f, protocol=2)
    with pytest.raises(data.DataError, match='data_batch_3.*refusing to load (posix|os|nt).system'):
        data.load_cifar10(synthetic_cifar, download=False)
    assert not marker.exists()


def test_object_arrays_and_foreign_codecs_are_refused(synthetic_cifar):
    with open(_batch_path(synthetic_cifar), 'wb') as f:
        pickle.dump({'data': np.array([1, 'x'], dtype=object), 'labels': [0]}, f, protocol=2)
    with pytest.raises(data.DataError, match='data_batch_3.*refusing an array of dtype object'):
        data.load_cifar10(synthetic_cifar, download=False)


def test_python3_protocol2_batches_are_read(synthetic_cifar):
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, 'latin1'): what re-pickled batches hold
    images = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    with open(_batch_path(synthetic_cifar), 'wb') as f:
        pickle.dump({'data': images, 'labels': [4, 7], 'batch_label': b'bytes'}, f, protocol=2)
    raw = data.load_cifar10(synthetic_cifar, download=False)
    assert raw['train_x'].shape == (4 * 40 + 2, 3, 32, 32)
    np.testing.assert_array_equal(raw['train_x'][80:82].reshape(2, -1), images)
    np.testing.assert_array_equal(raw['train_y'][80:82], [4, 7])


def test_synthetic_files_load_with_their_shapes_and_names(synthetic_cifar):
    raw = data.load_cifar10(synthetic_cifar, download=False)
    assert raw['train_x'].shape == (200, 3, 32, 32) and raw['train_x'].dtype == np.uint8
    assert raw['test_x'].shape == (40, 3, 32, 32) and raw['train_y'].dtype == np.int64
    assert raw['class_names'][0] == 'airplane' and len(raw['class_names']) == 10
    assert raw['originals'] is False  # MD5s differ from the published files


def test_truncated_file_is_a_data_error_naming_it(synthetic_cifar):
    path = _batch_path(synthetic_cifar)
    truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(data.DataError, match='data_batch_3: not a CIFAR-10 file'):
        data.load_cifar10(synthetic_cifar, download=False)


@pytest.mark.parametrize('images, labels, message', [
    (np.zeros((3, 3072), np.float32), [0, 1, 2], r"'data' must be a \(N, 3072\) uint8 array, got float32 \(3, 3072\)"),
    (np.zeros((3, 1024), np.uint8), [0, 1, 2], r"'data' must be a \(N, 3072\) uint8 array, got uint8 \(3, 1024\)"),
    (np.zeros((3, 3072), np.uint8), [0, 1], r"'labels' must be 3 ints"),
    (np.zeros((3, 3072), np.uint8), [0, 10, 2], r"labels must be in 0..9, found 0..10"),
    (np.zeros((3, 3072), np.uint8), [0, -1, 2], r"labels must be in 0..9, found -1..2"),
])
def test_malformed_batches_are_data_errors_naming_the_file(synthetic_cifar, images, labels, message):
    with open(_batch_path(synthetic_cifar, 'test_batch'), 'wb') as f:
        pickle.dump({b'data': images, b'labels': labels}, f, protocol=2)
    with pytest.raises(data.DataError, match='test_batch: ' + message):
        data.load_cifar10(synthetic_cifar, download=False)


def test_wrong_container_and_bad_meta_are_data_errors(synthetic_cifar):
    with open(_batch_path(synthetic_cifar), 'wb') as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    with pytest.raises(data.DataError, match="data_batch_3: expected a dict with 'data' and 'labels'"):
        data.load_cifar10(synthetic_cifar, download=False)
    make_synthetic_cifar(synthetic_cifar)
    with open(_batch_path(synthetic_cifar, 'batches.meta'), 'wb') as f:
        pickle.dump({b'label_names': [b'cat', b'dog']}, f, protocol=2)
    with pytest.raises(data.DataError, match="batches.meta: expected .* 10 class names"):
        data.load_cifar10(synthetic_cifar, download=False)


def test_missing_files_without_download_say_where_to_put_which(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.load_cifar10(str(tmp_path), download=False)
    message = str(error.value)
    assert os.path.join(str(tmp_path), 'cifar-10-batches-py') in message
    assert 'data_batch_1' in message and 'test_batch' in message and 'batches.meta' in message and '\n' not in message


def test_failed_download_gives_one_message_saying_where_to_put_which(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(data.urllib.request, 'urlopen', offline)
    with pytest.raises(data.DataError, match=r"data_batch_1.*missing in .*cifar-10-batches-py \(download failed"):
        data.load_cifar10(str(tmp_path / 'new'))


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    source = make_synthetic_cifar(str(tmp_path / 'source'))
    folder = os.path.join(source, 'cifar-10-batches-py')
    members = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            members.append((f'cifar-10-batches-py/{name}', f.read()))
    archive = tar_archive(members)
    serve_archive(monkeypatch, archive)
    raw = data.load_cifar10(str(tmp_path / 'downloaded'))
    assert raw['train_x'].shape == (200, 3, 32, 32)

    monkeypatch.setattr(data, 'CIFAR_MD5', '0' * 32)
    with pytest.raises(data.DataError, match='has MD5 .* expected 0000'):
        data.load_cifar10(str(tmp_path / 'corrupt'))


def test_download_refuses_archive_members_outside_the_folder(tmp_path, monkeypatch):
    serve_archive(monkeypatch, tar_archive([('../escaped', b'x')]))
    with pytest.raises(data.DataError, match='cannot extract'):
        data.load_cifar10(str(tmp_path / 'inside'))
    assert not (tmp_path / 'escaped').exists()


def test_split_sizes_and_normalisation(tmp_path):
    root = make_synthetic_cifar(str(tmp_path / 'data'), per_batch=100)
    prepared = data.prepare_cifar10(root, valid_size=50, seed=3, download=False)
    assert prepared['train_x'].shape == (450, 3, 32, 32) and prepared['valid_x'].shape == (50, 3, 32, 32)
    assert prepared['test_x'].shape == (100, 3, 32, 32)
    assert all(prepared[f'{s}_x'].dtype == np.float32 and prepared[f'{s}_y'].dtype == np.int64
               for s in ('train', 'valid', 'test'))
    np.testing.assert_allclose(prepared['train_x'].mean(axis=(0, 2, 3), dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(prepared['train_x'].std(axis=(0, 2, 3), dtype=np.float64), 1, atol=1e-5)

    # the same statistics, computed the lab's way (its data_mean and data_std, NHWC on the 0-255 scale) from
    # the raw training part, normalise all three splits
    raw = data.load_cifar10(root, download=False)
    order = np.random.default_rng(3).permutation(500)
    train = raw['train_x'][order[50:]].transpose(0, 2, 3, 1).astype(np.float64)
    data_mean, data_std = train.mean((0, 1, 2)), train.std((0, 1, 2))
    np.testing.assert_allclose(prepared['data_mean'], data_mean, rtol=1e-6)
    np.testing.assert_allclose(prepared['data_std'], data_std, rtol=1e-6)
    mean, std = data_mean[:, None, None], data_std[:, None, None]
    np.testing.assert_allclose(prepared['valid_x'], (raw['train_x'][order[:50]] - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(prepared['valid_y'], raw['train_y'][order[:50]])
    np.testing.assert_allclose(prepared['test_x'], (raw['test_x'] - mean) / std, atol=1e-5)

    # de-normalising with the lab's draw_image(img, data_mean, data_std) gives back the original pixels
    for image, original in zip(prepared['test_x'][:5], raw['test_x'][:5]):
        np.testing.assert_array_equal(plots.draw_image(image, data_mean, data_std), original.transpose(1, 2, 0))
    plots.draw_image(prepared['test_x'][0], data_mean, data_std, str(tmp_path / 'image.png'))
    np.testing.assert_array_equal(skimage.io.imread(tmp_path / 'image.png'), raw['test_x'][0].transpose(1, 2, 0))
    # the seed picks the validation images
    other = data.prepare_cifar10(root, valid_size=50, seed=4, download=False)
    assert not np.array_equal(other['valid_y'], prepared['valid_y']) or \
        not np.array_equal(other['valid_x'], prepared['valid_x'])


def test_validation_size_must_leave_training_images(synthetic_cifar):
    with pytest.raises(data.DataError, match='cannot hold out 200 of 200'):
        data.prepare_cifar10(synthetic_cifar, valid_size=200, download=False)


@pytest.mark.integration
def test_real_stand_in_counts_and_statistics(cifar_dir):
    prepared = data.prepare_cifar10(cifar_dir, download=False)
    assert len(prepared['train_x']) == 45000 and len(prepared['valid_x']) == 5000 and len(prepared['test_x']) == 10000
    assert prepared['originals'] is False  # the JPEG stand-in, accepted by its structure
    assert prepared['class_names'] == data.CIFAR_CLASSES
    counts = np.bincount(np.concatenate([prepared['train_y'], prepared['valid_y']]), minlength=10)
    np.testing.assert_array_equal(counts, 5000)
    np.testing.assert_array_equal(np.bincount(prepared['test_y'], minlength=10), 1000)
    np.testing.assert_allclose(prepared['data_mean'] / 255, [0.4913, 0.4821, 0.4465], atol=1.5e-3)  # of the 45,000
    np.testing.assert_allclose(prepared['data_std'] / 255, [0.2452, 0.2428, 0.2606], atol=1.5e-3)
    np.testing.assert_allclose(prepared['train_x'][:5000].mean(axis=(0, 2, 3)), 0, atol=0.05)
