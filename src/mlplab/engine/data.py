"""CIFAR-10 (and scikit-learn's 8x8 digits) as standardised train/val/test arrays.

The CIFAR-10 "python version" archive is fetched from `url` (https, a `file://` URL
or a plain path), its MD5 checked, and extracted once under `root/<md5>/`, so a cache
made from one archive is never taken for another. Downloads go to a `.part` file and
extraction to a temporary folder that is renamed into place only when complete: an
interrupted run leaves nothing that passes for a good cache.

With `shared_cache=True` the standardised splits are kept too, under
`root/<md5>/standardised/<options>/` (see `mlplab.engine.datacache`): built once per machine,
mapped read-only so that parallel processes share one copy in memory, checked against
their manifest on every load, and rebuilt when damaged or stale.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlplab.engine import checks, datacache

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
SPLITS = ("batch1", "all")
DATASETS = ("cifar10", "digits")
DTYPES = ("float32", "float64")  # training in float32; float64 for gradient checks
DIGITS_TEST_FRACTION = 0.2
COMPLETE_MARKER = ".complete"
STANDARDISED_DIR = "standardised"  # in root/<md5>/: the shared cache of standardised splits
# What _split_and_standardise computes; bump it when that changes: older caches are then stale.
STANDARDISED_RECIPE = 1
ARRAY_NAMES = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean", "std")


logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data cannot be had or is not what it claims to be."""


@dataclass
class Dataset:
    """Standardised splits. X_*: (n, d) float, y_*: (n,) int64 in [0, n_classes)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray  # (d,) training-split mean, applied to every split
    std: np.ndarray  # (d,) training-split std
    image_shape: tuple[int, int, int]  # (height, width, channels) of one row
    class_names: tuple[str, ...]
    name: str
    source: str  # where the raw data came from, for the tracking record

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the labels of every split and the input statistics: equal
        fingerprints mean the same samples in the same splits, standardised alike.
        Computed once: a Dataset's arrays are never written."""
        h = hashlib.sha256()
        for a in (self.y_train, self.y_val, self.y_test, self.mean, self.std):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(self.name.encode())
        return h.hexdigest()[:16]


def default_root() -> Path:
    """$MLPLAB_DATA, else the user's cache folder."""
    env = os.environ.get("MLPLAB_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlplab"


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local_path(url: str) -> Path | None:
    """The file a `file://` URL or plain path names; None for a remote URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if len(parsed.scheme) <= 1:  # no scheme, or a Windows drive letter: a path
        return Path(url).expanduser()
    return None


def _checksum_error(path: Path, actual: str, expected: str, hint: str) -> DataError:
    return DataError(f"checksum mismatch for {path}: MD5 is {actual}, data.md5 expects "
                     f"{expected}. {hint}")


def _download(url: str, dest: Path, md5: str) -> None:
    """Stream `url` to `dest` with a progress bar. The bytes land in `dest.part` and
    take the name `dest` only once their MD5 is right."""
    from tqdm.auto import tqdm

    # A file of our own: processes downloading at once (parallel trials on a fresh
    # machine) must not truncate or delete each other's bytes.
    fd, name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise DataError(
            f"could not download CIFAR-10 from {url} ({err}). Provide the archive "
            f"yourself: put {ARCHIVE_NAME} at {dest}, or set data.url=/path/to/{ARCHIVE_NAME}"
            " (and data.md5 to its MD5 if it is not the official file)."
        ) from err
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise _checksum_error(url, actual, md5, "The download is partial or corrupt and "
                              "was deleted; run again to retry.")
    part.replace(dest)


def _verified_archive(url: str, md5: str, root: Path) -> Path:
    """A local archive whose MD5 is `md5`: the file `url` names, or a cached download."""
    md5 = md5.lower()
    local = _local_path(url)
    if local is None:
        local = root / ARCHIVE_NAME
        if not local.exists():
            root.mkdir(parents=True, exist_ok=True)
            _download(url, local, md5)
            return local
    elif not local.exists():
        raise DataError(f"data.url={url!r}: no such file {local}")
    actual = file_md5(local)
    if actual != md5:
        raise _checksum_error(local, actual, md5, "The file is corrupt or partial (delete "
                              "it to download again), or it is another copy: then set "
                              "data.md5 to its checksum.")
    return local


def cifar10_dir(url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, root=None) -> Path:
    """The folder of extracted batches for the archive with this MD5, made if needed."""
    root = Path(root).expanduser() if root else default_root()
    target = root / md5.lower()
    if (target / COMPLETE_MARKER).exists():
        return target / BATCHES_DIR
    archive = _verified_archive(url, md5, root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / BATCHES_DIR / "data_batch_1").exists():
            raise DataError(f"{archive} has no {BATCHES_DIR}/data_batch_1: not CIFAR-10 python")
        (tmp / COMPLETE_MARKER).write_text(md5)
        if target.exists() and not (target / COMPLETE_MARKER).exists():
            shutil.rmtree(target)  # debris: a complete cache arrives with its marker
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same extraction first
            if not (target / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / BATCHES_DIR


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images: (n, 3072) uint8 (R, G, B planes), labels: (n,) int64."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)


def rows_to_images(rows: np.ndarray, image_shape) -> np.ndarray:
    """(n, C*H*W) channel planes, the datasets' row layout -> (n, H, W, C) images."""
    h, w, c = image_shape
    return rows.reshape(-1, c, h, w).transpose(0, 2, 3, 1)


def images_to_rows(images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) images -> (n, C*H*W) channel planes; the inverse of rows_to_images."""
    images = np.asarray(images)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def _split_rows(X, y, split: str, n_val: int, val_fold: int, batch_sizes: list[int]):
    """Train/val rows: batch 1 / batch 2, or all batches with n_val rows held out: the
    last n_val for fold 0, the n_val before them for fold 1, and so on."""
    if split == "batch1":
        b1 = batch_sizes[0]
        return (X[:b1], y[:b1]), (X[b1:b1 + batch_sizes[1]], y[b1:b1 + batch_sizes[1]])
    start, stop = len(y) - (val_fold + 1) * n_val, len(y) - val_fold * n_val
    if val_fold == 0:  # slices, no copy
        return (X[:start], y[:start]), (X[start:], y[start:])
    keep = np.r_[0:start, stop:len(y)]
    return (X[keep], y[keep]), (X[start:stop], y[start:stop])


def _raw_cifar10(url, md5, root, split):
    folder = cifar10_dir(url, md5, root)
    names = ["data_batch_1", "data_batch_2"] if split == "batch1" else [
        f"data_batch_{i}" for i in range(1, 6)]
    parts = [load_batch(folder / n) for n in names]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    X_test, y_test = load_batch(folder / "test_batch")
    return X, y, X_test, y_test, [len(p[1]) for p in parts]


def _raw_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.data * (255 / 16)).astype(np.uint8)  # same 0..255 range as CIFAR
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed: splits never move
    X, y = X[order], y[order]
    n_test = int(len(y) * DIGITS_TEST_FRACTION)
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def _column_std(X: np.ndarray, mean: np.ndarray, rows: int = 1024) -> np.ndarray:
    """Per-column std in float64, a block of rows at a time: NumPy's X.std(axis=0)
    makes full-size float64 temporaries (1.2 GB for 49,000 CIFAR rows) and took 0.6 s
    of a 10,000-row load; blocks reuse a small buffer."""
    total = np.zeros_like(mean)
    block = np.empty((min(rows, len(X)), X.shape[1]), np.float64)
    for start in range(0, len(X), rows):
        part = block[:len(X[start:start + rows])]
        np.subtract(X[start:start + rows], mean, out=part)
        np.square(part, out=part)
        total += part.sum(axis=0)
    return np.sqrt(total / len(X))


def standardise(X_train, *others, dtype=np.float32):
    """Scale every split by the training split's per-dimension mean and std.

    Returns (mean, std, X_train', *others'); constant dimensions get std 1.
    """
    mean = X_train.mean(axis=0, dtype=np.float64)
    std = _column_std(X_train, mean)
    std[std == 0] = 1.0
    mean, std = mean.astype(dtype), std.astype(dtype)
    scaled = []
    for X in (X_train, *others):
        Z = X.astype(dtype)  # in place from here on: no float64 copy of the data
        Z -= mean
        Z /= std
        scaled.append(Z)
    return (mean, std, *scaled)


def check_options(name: str, *, split: str = "batch1", n_val: int = 5000, val_fold: int = 0,
                  n_train: int | None = None, dtype="float32") -> None:
    """Check load_dataset's settings before anything is read (the bounds that depend
    on the data are checked once it is loaded)."""
    checks.one_of("name", name, DATASETS)
    checks.one_of("split", split, SPLITS)
    checks.positive_int("n_val", n_val)
    checks.non_negative_int("val_fold", val_fold)
    checks.require(val_fold == 0 or split == "all" or name == "digits", "val_fold", val_fold,
                   f"with split={split!r}, whose validation is data_batch_2: allowed 0")
    checks.require(n_train is None or (isinstance(n_train, int) and n_train > 0), "n_train",
                   n_train, "must be null (all) or an integer > 0")
    checks.one_of("dtype", str(dtype), DTYPES)


def load_dataset(name="cifar10", *, split="batch1", n_val=5000, val_fold=0, n_train=None,
                 url=CIFAR10_URL, md5=CIFAR10_MD5, root=None, dtype=np.float32,
                 shared_cache: bool = False) -> Dataset:
    """Load, split and standardise.

    split "batch1": train on data_batch_1, validate on data_batch_2.
    split "all": all five batches, the last `n_val` rows held out for validation;
    `val_fold` k holds out the k-th block of n_val rows from the end instead (k = 0:
    the last), so that different folds validate on different images.
    `n_train` keeps only the first n training rows (sanity checks, quick tests).
    Test is always `test_batch`. For "digits" both splits hold out `n_val` rows.
    `shared_cache` (CIFAR-10 only; digits are too small to need it): the standardised
    splits are kept under `root/<md5>/standardised/<options>/` and returned as
    read-only np.memmap arrays, so processes on one machine compute them once and
    share one copy in memory; the same values as without it, bit for bit. Every load
    checks the files' sizes and shapes, each process their CRC-32s once; a damaged or
    stale cache is rebuilt, never used.
    """
    check_options(name, split=split, n_val=n_val, val_fold=val_fold, n_train=n_train,
                  dtype=np.dtype(dtype).name)
    options = {"split": split, "n_val": int(n_val), "val_fold": int(val_fold),
               "n_train": n_train, "dtype": np.dtype(dtype).name}
    if name == "digits":
        X, y, X_test, y_test = _raw_digits()
        options["split"] = "all"  # digits have no batches: both splits hold out n_val rows
        arrays = _split_and_standardise(X, y, X_test, y_test, [len(y)], **options)
        return Dataset(**arrays, image_shape=(8, 8, 1),
                       class_names=tuple(str(i) for i in range(10)), name=name,
                       source="sklearn.datasets.load_digits")
    if shared_cache:
        arrays = _shared_cifar10(url, md5, root, options)
    else:
        arrays = _split_and_standardise(*_raw_cifar10(url, md5, root, split), **options)
    return Dataset(**arrays, image_shape=(32, 32, 3), class_names=CIFAR10_CLASSES,
                   name=name, source=url)


def _split_and_standardise(X, y, X_test, y_test, sizes, *, split, n_val, val_fold, n_train,
                           dtype) -> dict[str, np.ndarray]:
    """Raw rows X: (n, d) uint8, y: (n,) int64 of the training batches (`sizes` rows
    each) and the test batch -> {name: array} of ARRAY_NAMES, X_* and mean/std in
    `dtype`."""
    if split == "all" and not 0 < n_val < len(y):
        raise DataError(f"data.n_val={n_val} must be between 1 and {len(y) - 1} "
                        f"(the {len(y)} rows of the training batches)")
    if split == "all" and (val_fold + 1) * n_val > len(y):
        raise DataError(f"data.val_fold={val_fold} with data.n_val={n_val} must be between "
                        f"0 and {len(y) // n_val - 1} (the {len(y) // n_val} blocks of "
                        f"{n_val} rows in the {len(y)} of the training batches)")
    (X_tr, y_tr), (X_va, y_va) = _split_rows(X, y, split, n_val, val_fold, sizes)
    if n_train is not None:
        if not 0 < n_train <= len(y_tr):
            raise DataError(f"data.n_train={n_train} must be between 1 and {len(y_tr)}")
        X_tr, y_tr = X_tr[:n_train], y_tr[:n_train]
    mean, std, X_tr, X_va, X_te = standardise(X_tr, X_va, X_test, dtype=dtype)
    return dict(zip(ARRAY_NAMES, (X_tr, y_tr, X_va, y_va, X_te, y_test, mean, std),
                    strict=True))


def cache_key(*, split, n_val, val_fold, n_train, dtype) -> str:
    """The shared cache's folder name: every option that changes the standardised
    arrays, readable, e.g. "all-nval5000-fold0-ntrainall-float32"."""
    n_train = "all" if n_train is None else n_train
    return f"{split}-nval{n_val}-fold{val_fold}-ntrain{n_train}-{np.dtype(dtype).name}"


def _shared_cifar10(url, md5, root, options: dict) -> dict[str, np.memmap]:
    """The standardised CIFAR-10 splits from the machine's shared cache, built first
    if it is missing, damaged or stale."""
    # The batches are extracted first: a cache inside a half-extracted folder would be
    # deleted with it as debris.
    archive_dir = cifar10_dir(url, md5, root).parent

    def build():
        return _split_and_standardise(*_raw_cifar10(url, md5, root, options["split"]),
                                      **options)

    if options["split"] == "batch1":  # n_val and the fold change nothing there
        options = {**options, "n_val": None, "val_fold": 0}
    meta = {"archive_md5": md5.lower(), "recipe": STANDARDISED_RECIPE, "options": options}
    try:
        return datacache.load_or_build(archive_dir / STANDARDISED_DIR / cache_key(**options),
                                       meta, ARRAY_NAMES, build)
    except OSError as err:  # a data root this user may read but not write
        logger.warning("no shared data cache under %s (%s): standardising in memory",
                       archive_dir, err)
        return build()
