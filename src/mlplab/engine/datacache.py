"""Named arrays built once per machine and shared, read-only, between processes.

A cache folder holds one `.npy` file per array and `manifest.json`: the format
version, the caller's `meta` (what the arrays were made from) and, for each array,
its file, shape, dtype, size on disk and a CRC-32 of its data. Arrays are opened with
`np.load(mmap_mode="r")`: processes on one machine map the same page-cache pages, so
the data sits in memory once, and none of them can write to it. Every load checks the
folder against its manifest first; a damaged or stale folder is named in a warning,
deleted and rebuilt, never used.

A build writes into a temporary folder beside the target, the manifest last, and
renames it into place, under a file lock beside it: processes starting at once on a
fresh machine build once, the others wait and map what it made.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock

FORMAT_VERSION = 1  # of the folder layout and manifest; another version is stale
MANIFEST = "manifest.json"
READ_ONLY = 0o444  # nobody writes to pages that other processes map
CRC_BLOCK = 1 << 24  # bytes per zlib.crc32 call: a memmap is read in 16 MiB views, not copied

logger = logging.getLogger(__name__)
# folder -> its files' stat (_stamp) when this process last checked every CRC: later
# loads in the process (a sweep's next trial) redo the CRCs only if a file changed
_checked: dict[Path, tuple] = {}


class Damaged(Exception):
    """A cache folder is missing, incomplete, altered or made from something else."""


def crc32(a: np.ndarray, block: int = CRC_BLOCK) -> int:
    """CRC-32 of a C-contiguous array's data bytes, a block at a time (no copy)."""
    flat = a.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, block):
        crc = zlib.crc32(flat[start:start + block], crc)
    return crc


def load_or_build(folder: Path, meta: dict, names: Sequence[str],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.memmap]:
    """The arrays `names` kept in `folder`, mapped read-only (`writeable` False).

    `meta` (JSON-able) says what the arrays are made from; a folder made from other
    `meta` is stale. When the folder is missing, damaged or stale, `build()` makes
    {name: array} afresh and the folder is rewritten from it first.
    """
    try:
        return open_checked(folder, meta, names)
    except Damaged:
        pass  # absent, or being replaced, or damaged: decided under the lock
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        if folder.exists():
            try:
                return open_checked(folder, meta, names)  # another process built it
            except Damaged as err:
                logger.warning("shared data cache %s is unusable, rebuilding it: %s",
                               folder, err)
                _remove(folder)
        logger.info("building the shared data cache %s", folder)
        _write(folder, meta, names, build())
        return open_checked(folder, meta, names)


def open_checked(folder: Path, meta: dict, names: Sequence[str]) -> dict[str, np.memmap]:
    """Map each array of `folder` read-only once it matches the manifest, and the
    manifest this format, `meta` and `names`; else raise Damaged saying what is wrong.
    The CRC-32s are checked once per process, again only if a file was changed since."""
    manifest = _read_manifest(folder)
    if manifest.get("format") != FORMAT_VERSION:
        raise Damaged(f"{MANIFEST} has format {manifest.get('format')!r}, "
                      f"this code reads {FORMAT_VERSION}")
    if manifest.get("meta") != json.loads(json.dumps(meta)):
        raise Damaged(f"{MANIFEST} is for {manifest.get('meta')!r}, not {meta!r}")
    entries = manifest.get("arrays")
    if not isinstance(entries, dict) or sorted(entries) != sorted(names):
        raise Damaged(f"{MANIFEST} lists arrays {entries!r}, expected {sorted(names)}")
    stamp = _stamp(folder, names)
    arrays = {name: _open_array(folder, name, entries[name], _checked.get(folder) != stamp)
              for name in names}
    _checked[folder] = stamp
    return arrays


def _stamp(folder: Path, names: Sequence[str]) -> tuple | None:
    """Device, inode, size, and modification and change times of every file: a write
    or a replacement shows (the change time even when a tool restores the mtime)."""
    try:
        infos = [(folder / f).stat() for f in (MANIFEST, *(f"{n}.npy" for n in names))]
    except FileNotFoundError:
        return None  # _open_array names the missing file
    return tuple((i.st_dev, i.st_ino, i.st_size, i.st_mtime_ns, i.st_ctime_ns) for i in infos)


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise Damaged(f"no {MANIFEST}") from None
    except (OSError, ValueError) as err:
        raise Damaged(f"{MANIFEST} does not parse: {err}") from None
    if not isinstance(manifest, dict):
        raise Damaged(f"{MANIFEST} is not a JSON object")
    return manifest


def _open_array(folder: Path, name: str, entry, check_crc: bool = True) -> np.memmap:
    """np.load(mmap_mode="r") of one array after its size, shape, dtype and (if asked)
    CRC-32 are found to be the manifest's."""
    file = f"{name}.npy"
    try:
        if entry["file"] != file:
            raise Damaged(f"{MANIFEST} names {entry['file']!r} for {name}, expected {file!r}")
        size = (folder / file).stat().st_size
        if size != entry["file_bytes"]:
            raise Damaged(f"{file} has {size} bytes, {MANIFEST} says {entry['file_bytes']}")
        a = np.load(folder / file, mmap_mode="r", allow_pickle=False)
        if list(a.shape) != entry["shape"] or a.dtype.str != entry["dtype"]:
            raise Damaged(f"{file} is {a.dtype.str} {list(a.shape)}, {MANIFEST} says "
                          f"{entry['dtype']} {entry['shape']}")
        if check_crc and crc32(a) != entry["crc32"]:
            raise Damaged(f"{file}: the CRC-32 of its data is not the one in {MANIFEST}")
    except FileNotFoundError:
        raise Damaged(f"{file} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Damaged(f"{file} or its {MANIFEST} entry is unreadable: {err!r}") from None
    return a


def _write(folder: Path, meta: dict, names: Sequence[str], arrays: dict[str, np.ndarray]):
    """Write `arrays` as `folder` in one rename; the caller holds the folder's lock."""
    if sorted(arrays) != sorted(names):
        raise ValueError(f"build() made arrays {sorted(arrays)}, expected {sorted(names)}")
    tmp = folder.with_name(f".{folder.name}.building")
    if tmp.exists():
        _remove(tmp)  # left by a builder that was killed: only the lock holder writes here
    tmp.mkdir()
    try:
        entries = {}
        for name in names:
            a = np.ascontiguousarray(arrays[name])
            path = tmp / f"{name}.npy"
            np.save(path, a, allow_pickle=False)
            path.chmod(READ_ONLY)
            entries[name] = {"file": path.name, "shape": list(a.shape), "dtype": a.dtype.str,
                             "file_bytes": path.stat().st_size, "crc32": crc32(a)}
        manifest = {"format": FORMAT_VERSION, "meta": meta, "arrays": entries}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it whole
        (tmp / MANIFEST).chmod(READ_ONLY)
        tmp.rename(folder)
    except BaseException:
        _remove(tmp)
        raise


def _remove(folder: Path) -> None:
    """Delete a cache folder; its files are made writable first, as some systems
    (Windows) refuse to delete read-only files."""
    for path in folder.iterdir():
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(folder)
