"""The CIFAR-10 loader: official layout, checksums, cache, splits, download."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from mlplab import data
from tests.conftest import TINY_ROWS, write_cifar_archive


def test_batch1_split_trains_on_batch_1_and_validates_on_batch_2(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    ds = data.load_dataset(split="batch1", url=url, md5=md5, root=tmp_path)
    folder = data.cifar10_dir(url, md5, tmp_path)
    _, y1 = data.load_batch(folder / "data_batch_1")
    _, y2 = data.load_batch(folder / "data_batch_2")
    _, yt = data.load_batch(folder / "test_batch")
    np.testing.assert_array_equal(ds.y_train, y1)
    np.testing.assert_array_equal(ds.y_val, y2)
    np.testing.assert_array_equal(ds.y_test, yt)
    assert ds.X_train.shape == (TINY_ROWS, 3072) and ds.X_train.dtype == np.float32


def test_all_split_holds_out_the_last_n_val_rows_of_the_five_batches(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    ds = data.load_dataset(split="all", n_val=25, url=url, md5=md5, root=tmp_path)
    assert len(ds.y_train) == 5 * TINY_ROWS - 25 and len(ds.y_val) == 25
    folder = data.cifar10_dir(url, md5, tmp_path)
    _, y5 = data.load_batch(folder / "data_batch_5")
    np.testing.assert_array_equal(ds.y_val, y5[-25:])


def test_val_fold_holds_out_another_block_and_trains_on_every_other_row(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    folder = data.cifar10_dir(url, md5, tmp_path)  # unpacks the archive
    batches = [data.load_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    X_all, y_all = (np.concatenate(part) for part in zip(*batches, strict=True))
    n = len(y_all)
    ds = data.load_dataset(split="all", n_val=25, val_fold=2, url=url, md5=md5, root=tmp_path)
    np.testing.assert_array_equal(ds.y_val, y_all[n - 75:n - 50])
    np.testing.assert_array_equal(ds.y_train, np.r_[y_all[:n - 75], y_all[n - 50:]])
    np.testing.assert_allclose(ds.mean, np.r_[X_all[:n - 75], X_all[n - 50:]].mean(axis=0),
                               rtol=1e-5)  # standardised by its own training rows
    fold0 = data.load_dataset(split="all", n_val=25, url=url, md5=md5, root=tmp_path)
    assert fold0.fingerprint != ds.fingerprint


def test_digits_take_a_val_fold_too():
    fold0, fold1 = (data.load_dataset("digits", n_val=300, val_fold=k) for k in (0, 1))
    assert len(fold1.y_val) == 300 and not np.array_equal(fold0.y_val, fold1.y_val)


def test_the_frontmost_val_fold_validates_on_the_first_rows(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    last = 5 * TINY_ROWS // 25 - 1  # 12 blocks of 25 rows: folds 0..11
    ds = data.load_dataset(split="all", n_val=25, val_fold=last, url=url, md5=md5,
                           root=tmp_path)
    folder = data.cifar10_dir(url, md5, tmp_path)
    np.testing.assert_array_equal(ds.y_val, data.load_batch(folder / "data_batch_1")[1][:25])
    assert len(ds.y_train) == 5 * TINY_ROWS - 25


@pytest.mark.parametrize("split, n_val, fold, message", [
    ("all", 25, 5 * TINY_ROWS // 25, r"data.val_fold=12 with data.n_val=25 must be between "
                                     r"0 and 11 \(the 12 blocks"),
    ("batch1", 25, 1, r"val_fold=1.*allowed 0"),
    ("all", 25, -1, r"val_fold=-1.*>= 0"),
])
def test_a_val_fold_out_of_range_is_refused_naming_it(tiny_cifar, tmp_path, split, n_val,
                                                      fold, message):
    url, md5 = tiny_cifar
    with pytest.raises((data.DataError, ValueError), match=message):
        data.load_dataset(split=split, n_val=n_val, val_fold=fold, url=url, md5=md5,
                          root=tmp_path)


def test_inputs_are_standardised_with_the_training_split_statistics(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    ds = data.load_dataset(url=url, md5=md5, root=tmp_path)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-3)
    raw_val, _ = data.load_batch(data.cifar10_dir(url, md5, tmp_path) / "data_batch_2")
    np.testing.assert_allclose(ds.X_val, (raw_val - ds.mean) / ds.std, rtol=1e-4, atol=1e-4)


def test_file_url_and_plain_path_name_the_same_archive(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    a = data.load_dataset(url=Path(url).as_uri(), md5=md5, root=tmp_path / "a")
    b = data.load_dataset(url=url, md5=md5, root=tmp_path / "b")
    assert a.fingerprint == b.fingerprint


def test_bad_checksum_is_refused_naming_both_checksums_and_nothing_is_cached(
        tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    wrong = "0" * 32
    with pytest.raises(data.DataError, match=f"MD5 is {md5}.*expects {wrong}"):
        data.load_dataset(url=url, md5=wrong, root=tmp_path)
    assert not (tmp_path / wrong).exists()


def test_extracted_cache_is_reused_without_the_archive(tmp_path):
    archive = tmp_path / "copy.tar.gz"
    md5 = write_cifar_archive(archive)
    first = data.load_dataset(url=str(archive), md5=md5, root=tmp_path / "cache")
    archive.unlink()
    again = data.load_dataset(url=str(archive), md5=md5, root=tmp_path / "cache")
    assert first.fingerprint == again.fingerprint


def test_an_interrupted_extraction_is_not_taken_for_a_cache(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    half_done = tmp_path / md5 / data.BATCHES_DIR
    half_done.mkdir(parents=True)  # a folder with no completion marker
    ds = data.load_dataset(url=url, md5=md5, root=tmp_path)
    assert len(ds.y_train) == TINY_ROWS


def test_a_different_archive_never_reuses_another_archives_cache(tmp_path):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    md5_a, md5_b = write_cifar_archive(a, seed=1), write_cifar_archive(b, seed=2)
    ds_a = data.load_dataset(url=str(a), md5=md5_a, root=tmp_path / "cache")
    ds_b = data.load_dataset(url=str(b), md5=md5_b, root=tmp_path / "cache")
    assert ds_a.fingerprint != ds_b.fingerprint


class _Server:
    """Serve one folder over loopback HTTP for the duration of a test."""

    def __init__(self, folder: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                    directory=str(folder))
        handler.log_message = lambda *a, **k: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    server = _Server(folder)
    yield folder, server.url
    server.close()


def test_download_is_verified_then_cached_under_the_root(http_folder, tmp_path):
    folder, base = http_folder
    md5 = write_cifar_archive(folder / data.ARCHIVE_NAME)
    root = tmp_path / "cache"
    ds = data.load_dataset(url=f"{base}/{data.ARCHIVE_NAME}", md5=md5, root=root)
    assert len(ds.y_train) == TINY_ROWS
    assert data.file_md5(root / data.ARCHIVE_NAME) == md5
    assert not list(root.glob("*.part"))


def test_a_corrupt_download_is_deleted_not_cached(http_folder, tmp_path):
    folder, base = http_folder
    md5 = write_cifar_archive(folder / data.ARCHIVE_NAME)
    payload = (folder / data.ARCHIVE_NAME).read_bytes()
    (folder / data.ARCHIVE_NAME).write_bytes(payload[: len(payload) // 2])  # truncated
    root = tmp_path / "cache"
    with pytest.raises(data.DataError, match="partial or corrupt"):
        data.load_dataset(url=f"{base}/{data.ARCHIVE_NAME}", md5=md5, root=root)
    assert not (root / data.ARCHIVE_NAME).exists()
    assert not list(root.glob("*.part"))


def test_offline_without_a_copy_says_how_to_provide_the_data(tmp_path):
    with pytest.raises(data.DataError, match="data.url=/path/to/cifar-10-python.tar.gz"):
        data.load_dataset(url="http://127.0.0.1:9/cifar-10-python.tar.gz",
                          root=tmp_path)


def test_missing_local_archive_names_the_path(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_dataset(url=str(tmp_path / "nope.tar.gz"), root=tmp_path)


def test_digits_load_through_the_same_splits_without_download():
    ds = data.load_dataset("digits", n_val=300)
    assert ds.X_train.shape[1] == 64 and ds.n_classes == 10
    assert len(ds.y_val) == 300 and len(ds.y_test) == int(1797 * data.DIGITS_TEST_FRACTION)
    assert ds.image_shape == (8, 8, 1)


def test_n_train_keeps_the_first_rows_and_refuses_impossible_sizes(tiny_cifar, tmp_path):
    url, md5 = tiny_cifar
    ds = data.load_dataset(url=url, md5=md5, root=tmp_path, n_train=7)
    assert len(ds.y_train) == 7
    with pytest.raises(data.DataError, match="data.n_train=1000"):
        data.load_dataset(url=url, md5=md5, root=tmp_path, n_train=1000)
    with pytest.raises(data.DataError, match="data.n_val=300"):
        data.load_dataset(url=url, md5=md5, root=tmp_path, split="all", n_val=300)


def test_images_and_rows_convert_both_ways():
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    images = data.rows_to_images(rows, (32, 32, 3))
    assert images.shape == (2, 32, 32, 3)
    assert images[0, 0, 1, 0] == rows[0, 1]  # red plane first, row-major
    np.testing.assert_array_equal(data.images_to_rows(images), rows)


def test_concurrent_first_downloads_into_one_cache_both_succeed(http_folder, tmp_path):
    # Parallel sweep trials on a fresh machine all find the cache empty at once.
    from concurrent.futures import ThreadPoolExecutor

    folder, base = http_folder
    md5 = write_cifar_archive(folder / data.ARCHIVE_NAME)
    root = tmp_path / "cache"
    url = f"{base}/{data.ARCHIVE_NAME}"
    with ThreadPoolExecutor(4) as pool:
        sets = list(pool.map(lambda _: data.load_dataset(url=url, md5=md5, root=root),
                             range(4)))
    assert len({ds.fingerprint for ds in sets}) == 1
    assert data.file_md5(root / data.ARCHIVE_NAME) == md5
    assert not list(root.glob("*.part"))
