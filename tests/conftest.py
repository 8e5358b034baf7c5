"""Shared fixtures: a tiny CIFAR-10 archive in the official format, composed configs
that write to a throw-away MLflow store, and the shared real-data copy (or a skip)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlplab.commands.common import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("MLPLAB_SHARED", REPO.parent / "shared")) / \
    "data" / "cifar-10-python.tar.gz"
SHARED_MD5 = "1a31069a34cdabb28056001aa2cbcdef"  # of the shared copy; see its README
TINY_ROWS = 60  # rows per batch in the tiny archive
# .ci/run sets it: there a missing real part (browser, server) fails instead of skipping
REQUIRE_REAL_PARTS = os.environ.get("MLPLAB_REQUIRE_REAL_PARTS") == "1"


def skip_or_fail(reason: str):
    """Skip a test whose real part is missing here; in CI, fail it."""
    if REQUIRE_REAL_PARTS:
        pytest.fail(f"{reason} (MLPLAB_REQUIRE_REAL_PARTS=1)")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_pickle(data: np.ndarray, labels: list[int], name: str) -> bytes:
    batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
    return pickle.dumps(batch, protocol=2)


def write_cifar_archive(path: Path, rows: int = TINY_ROWS, seed: int = 0) -> str:
    """Write a CIFAR-10 'python version' archive with `rows` images per batch.

    Labels are learnable: each class has its own mean image, plus noise. Returns the
    archive's MD5.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 3072))
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=rows)
        noise = rng.normal(0, 40, size=(rows, 3072))
        data = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        members[name] = _batch_pickle(data, labels.tolist(), name)
    members["batches.meta"] = pickle.dumps(
        {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": rows},
        protocol=2)
    members["readme.html"] = b"<html>tiny test archive</html>"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> tuple[str, str]:
    """(path, md5) of a tiny archive in the official layout."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    return str(path), write_cifar_archive(path)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_cfg(tmp_path, tiny_cifar, tracking_uri):
    """Compose the real conf/ with overrides, pointed at the tiny archive, a private
    data cache and a private MLflow store, and shrunk to run in a moment."""

    def _make(*overrides: str, config_name: str = "config") -> DictConfig:
        url, md5 = tiny_cifar
        base = [f"data.url={url}", f"data.md5={md5}", f"data.root={tmp_path / 'data'}",
                f"tracking.uri={tracking_uri}", "train.progress=false",
                "train.batch_size=10"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=base + list(overrides))

    return _make


TINY_HALF_CYCLE = 20  # steps: short, yet gentle enough that the 9-layer net stays finite


@pytest.fixture
def tiny_experiment(make_cfg):
    """Compose conf/experiment/<name>.yaml as make_cfg does, shrunk to a few steps:
    one short cycle or two epochs, 20 validation rows, no model logged."""

    def _make(name: str, *overrides: str) -> DictConfig:
        cfg = make_cfg(f"experiment={name}", "data.n_val=20", "tracking.log_model=false",
                       *overrides)
        if cfg.data.n_train is not None:
            cfg.data.n_train = min(cfg.data.n_train, TINY_ROWS // 2)
        if cfg.schedule.name == "clr":
            cfg.schedule.n_s, cfg.schedule.n_s_k, cfg.schedule.cycles = TINY_HALF_CYCLE, None, 1
        else:
            cfg.schedule.epochs = 2
        return cfg

    return _make


@pytest.fixture
def cli_env(tmp_path, tiny_cifar) -> dict[str, str]:
    """Environment for running mlplab's commands in a subprocess on the tiny archive,
    with the default MLflow store (mlflow.db in the folder the command runs in)."""
    url, md5 = tiny_cifar
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"MLPLAB_CIFAR10_URL": url, "MLPLAB_CIFAR10_MD5": md5,
                  "MLPLAB_DATA": str(tmp_path / "data")}


@pytest.fixture
def start_worker(tmp_path):
    """start(overrides, name, env=None): `python train.py --multirun ...` as its own
    process from tmp_path, output in NAME.log, sweep folder NAME/ (env: the whole
    environment, default this one's); whatever still runs when the test ends is killed."""
    procs = []

    def start(overrides, name, env=None) -> tuple[subprocess.Popen, Path]:
        path = tmp_path / f"{name}.log"
        with open(path, "w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), "--multirun",
                 f"hydra.sweep.dir={tmp_path / name}", *overrides],
                cwd=tmp_path, env={**(os.environ if env is None else env),
                                   "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT))
        return procs[-1], path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def shared_cifar() -> tuple[str, str]:
    """(path, md5) of the real CIFAR-10 copy in ../shared, or skip."""
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 copy not found at {SHARED_ARCHIVE} "
                    "(set MLPLAB_SHARED to the folder holding data/)")
    return str(SHARED_ARCHIVE), SHARED_MD5
