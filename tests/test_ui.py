"""What a user sees in the MLflow UI, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

from tests.conftest import REPO, free_port, skip_or_fail

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, in a sandbox with no internet: no sandbox, no background connections.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1600,900"]
TINY = ["model.layers=[8]", "train.batch_size=10", "schedule.n_s=6", "train.progress=false"]



@pytest.fixture(autouse=True)
def _chromium():
    if CHROMIUM is None:
        skip_or_fail("no Chromium on this machine (Debian: apt-get install chromium)")


@contextmanager
def mlflow_ui(tmp_path):
    """`mlflow ui` on the store in tmp_path, on 127.0.0.1; yields its address."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow ui did not start")
                time.sleep(0.5)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _page_text(url: str, profile) -> str:
    """The page's DOM after its scripts ran, as Chromium renders it."""
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    return done.stdout


def test_the_runs_list_names_each_run_by_its_config(tmp_path, cli_env):
    for args in (["lam=0.02"], ["model.layers=[8,8]", "bn=true", "train.seed=1"]):
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, *args],
                              cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    link = done.stdout.split("runs      ")[1].split()[0]  # the summary's link
    with mlflow_ui(tmp_path) as address:
        page = _page_text(link.replace("http://127.0.0.1:5000", address),
                          tmp_path / "chromium")
    assert "3072-8-10 lam=0.02 seed=0" in page
    assert "3072-8-8-10 BN lam=0.01 seed=1" in page
    assert "train.py" in page  # the Source column: the command that ran

