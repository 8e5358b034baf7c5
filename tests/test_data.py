"""The CIFAR-10 loader: official layout, checksums, cache, splits, download, and the
shared cache of standardised splits."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlplab.engine import data, datacache
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


# --- the shared cache of standardised splits -------------------------------------

FOLD_OPTIONS = {"split": "all", "n_val": 30, "val_fold": 1}


def _load(tiny_cifar, root, shared_cache=True, **options) -> data.Dataset:
    url, md5 = tiny_cifar
    return data.load_dataset(url=url, md5=md5, root=root, shared_cache=shared_cache,
                             **options)


def _cache_folder(tiny_cifar, root, **options) -> Path:
    full = {"split": "batch1", "n_val": 5000, "val_fold": 0, "n_train": None,
            "dtype": "float32"} | options
    return Path(root) / tiny_cifar[1] / data.STANDARDISED_DIR / data.cache_key(**full)


def _assert_bit_identical(a: data.Dataset, b: data.Dataset) -> None:
    for name in data.ARRAY_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name
    assert a.fingerprint == b.fingerprint


def _manifest_identity(folder: Path) -> tuple[int, int]:
    st = (folder / datacache.MANIFEST).stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize("options", [FOLD_OPTIONS, {"split": "batch1"}],
                         ids=["all-fold1", "batch1"])
def test_shared_cache_arrays_equal_the_in_memory_ones_bit_for_bit(tiny_cifar, tmp_path,
                                                                  options):
    cached = _load(tiny_cifar, tmp_path, **options)
    assert isinstance(cached.X_train, np.memmap)
    _assert_bit_identical(cached, _load(tiny_cifar, tmp_path, shared_cache=False, **options))


def test_a_second_load_maps_the_existing_cache_read_only_without_the_batches(
        tiny_cifar, tmp_path, monkeypatch, caplog):
    first = _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    folder = _cache_folder(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    made = _manifest_identity(folder)

    def no_batches(*args):
        raise AssertionError("the batches were read again")

    monkeypatch.setattr(data, "_raw_cifar10", no_batches)
    with caplog.at_level(logging.WARNING):
        again = _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    assert not caplog.records
    assert _manifest_identity(folder) == made  # not rebuilt
    _assert_bit_identical(first, again)
    for name in data.ARRAY_NAMES:
        a = getattr(again, name)
        assert isinstance(a, np.memmap) and not a.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o444)}


def test_different_options_get_different_cache_folders(tiny_cifar, tmp_path):
    a = _load(tiny_cifar, tmp_path, split="all", n_val=30)
    b = _load(tiny_cifar, tmp_path, split="all", n_val=20)
    assert len(a.y_val) == 30 and len(b.y_val) == 20 and a.fingerprint != b.fingerprint
    for n_val in (30, 20):
        assert (_cache_folder(tiny_cifar, tmp_path, split="all", n_val=n_val)
                / datacache.MANIFEST).exists()
    assert data.cache_key(split="all", n_val=5000, val_fold=0, n_train=None,
                          dtype="float32") == "all-nval5000-fold0-ntrainall-float32"


def _writable(path: Path) -> Path:
    path.chmod(0o644)
    return path


def _flip_a_data_byte(folder: Path):
    with open(_writable(folder / "X_train.npy"), "r+b") as f:
        f.seek(-5, os.SEEK_END)  # the data: the header is at the start
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate(folder: Path):
    path = _writable(folder / "y_val.npy")
    path.write_bytes(path.read_bytes()[:-8])


def _delete(folder: Path):
    (folder / "std.npy").unlink()


def _other_format(folder: Path):
    path = _writable(folder / datacache.MANIFEST)
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"format": datacache.FORMAT_VERSION + 1}))


def _garble_manifest(folder: Path):
    _writable(folder / datacache.MANIFEST).write_text('{"format": 1, "arr')


@pytest.mark.parametrize("damage, says", [
    (_flip_a_data_byte, "X_train.npy: the CRC-32"),
    (_truncate, "y_val.npy has .* bytes"),
    (_delete, "std.npy is missing"),
    (_other_format, "has format 2"),
    (_garble_manifest, "does not parse"),
], ids=["flipped-byte", "truncated", "missing", "stale-format", "unparsable-manifest"])
def test_a_damaged_cache_is_rebuilt_never_used(tiny_cifar, tmp_path, caplog, damage, says):
    _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    folder = _cache_folder(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="mlplab.engine.datacache"):
        rebuilt = _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert "rebuilding" in warning.getMessage()
    assert re.search(says, warning.getMessage())
    _assert_bit_identical(rebuilt, _load(tiny_cifar, tmp_path, shared_cache=False,
                                         **FOLD_OPTIONS))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlplab.engine.datacache"):
        _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    assert not caplog.records  # whole again


LOAD_WHEN_TOLD = """
import sys, time, zlib
from pathlib import Path
from mlplab.engine import data, datacache
url, md5, root, go = sys.argv[1:]
while not Path(go).exists():  # a start line: both processes find no cache at once
    time.sleep(0.001)
ds = data.load_dataset(split="all", n_val=30, val_fold=1, url=url, md5=md5, root=root,
                       shared_cache=True)
manifest = Path(ds.X_train.filename).parent / datacache.MANIFEST
print(ds.fingerprint, zlib.crc32(ds.X_train.tobytes()), manifest.stat().st_ino,
      manifest.stat().st_mtime_ns)
"""


def test_two_processes_building_at_once_end_with_one_valid_cache(tiny_cifar, tmp_path,
                                                                 caplog):
    url, md5 = tiny_cifar
    data.cifar10_dir(url, md5, tmp_path)  # extracted already: the race is the cache's
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_WHEN_TOLD, url, md5,
                               str(tmp_path), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    [line] = {out for out, _ in outputs}  # the same arrays, the same manifest file

    folder = _cache_folder(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name,
                                                               folder.name + ".lock"]
    with caplog.at_level(logging.WARNING, logger="mlplab.engine.datacache"):
        ds = _load(tiny_cifar, tmp_path, **FOLD_OPTIONS)
    assert not caplog.records  # the cache they left is whole
    ino, mtime = _manifest_identity(folder)
    expected = _load(tiny_cifar, tmp_path, shared_cache=False, **FOLD_OPTIONS)
    assert line.split() == [expected.fingerprint, str(zlib.crc32(expected.X_train.tobytes())),
                            str(ino), str(mtime)]
    _assert_bit_identical(ds, expected)


def test_digits_ignore_shared_cache_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLAB_DATA", str(tmp_path / "data"))
    ds = data.load_dataset("digits", n_val=300, shared_cache=True)
    assert not isinstance(ds.X_train, np.memmap) and not (tmp_path / "data").exists()
    _assert_bit_identical(ds, data.load_dataset("digits", n_val=300))


def test_crc32_in_blocks_equals_zlib_over_the_whole_bytes():
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    assert datacache.crc32(a, block=7) == datacache.crc32(a) == zlib.crc32(a.tobytes())


def test_a_cache_made_from_other_meta_is_stale_and_rebuilt(tmp_path, caplog):
    builds = []

    def build(value):
        builds.append(value)
        return {"a": np.full(3, value, np.int64)}

    folder = tmp_path / "key"
    first = datacache.load_or_build(folder, {"v": 1}, ["a"], lambda: build(1))
    assert datacache.load_or_build(folder, {"v": 1}, ["a"], lambda: build(9))["a"][0] == 1
    with caplog.at_level(logging.WARNING, logger="mlplab.engine.datacache"):
        second = datacache.load_or_build(folder, {"v": 2}, ["a"], lambda: build(2))
    assert builds == [1, 2] and "is for {'v': 1}" in caplog.text
    assert list(first["a"]) == [1, 1, 1] and list(second["a"]) == [2, 2, 2]


def test_debris_of_a_killed_builder_is_cleared_before_building(tmp_path):
    folder = tmp_path / "key"
    debris = tmp_path / ".key.building"
    debris.mkdir()
    (debris / "a.npy").write_bytes(b"half")
    (debris / "a.npy").chmod(datacache.READ_ONLY)
    arrays = datacache.load_or_build(folder, {}, ["a"], lambda: {"a": np.ones(2)})
    assert list(arrays["a"]) == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.lock"]
