"""A password in a URL is masked in everything written, and still works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from mlplab.app import passwords, store
from mlplab.app.passwords import mask_password
from mlplab.commands.common import CONF_DIR
from tests.conftest import REPO

SECRET = "s3cr:et"
URI = f"postgresql://mlplab:{SECRET}@db.example:5432/mlflow"
MASKED = "postgresql://mlplab:***@db.example:5432/mlflow"


@pytest.mark.parametrize("text, masked", [
    (URI, MASKED),
    (f"tracking.uri={URI} hydra.sweeper.storage=postgresql+psycopg://u:{SECRET}@h/optuna",
     f"tracking.uri={MASKED} hydra.sweeper.storage=postgresql+psycopg://u:***@h/optuna"),
    ("cannot open http://u:pw@127.0.0.1:5000/api", "cannot open http://u:***@127.0.0.1:5000/api"),
    ("postgresql://mlplab@h:5432/db", "postgresql://mlplab@h:5432/db"),  # no password
    ("http://127.0.0.1:5000/x@y sqlite:////a/b.db", "http://127.0.0.1:5000/x@y sqlite:////a/b.db"),
])
def test_mask_password_hides_the_password_of_every_url_in_a_text(text, masked):
    assert mask_password(text) == masked


def test_a_hidden_config_is_masked_throughout_and_its_uris_still_resolve(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")  # undone after the test
    storage = f"postgresql://mlplab:{SECRET}@db.example/optuna"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+search=lambda_c2f", f"tracking.uri={URI}",
                                           f"hydra.sweeper.storage={storage}"],
                      return_hydra_config=True)
    passwords.hide_passwords(cfg)
    assert SECRET not in str(cfg)  # task and Hydra config, the override strings too
    assert cfg.tracking.uri == MASKED and f"tracking.uri={MASKED}" in cfg.hydra.overrides.task
    assert store.resolve_uri(cfg.tracking.uri) == URI  # the sweeper, in this process
    assert passwords.unmask(cfg.hydra.sweeper.storage) == storage
    monkeypatch.setattr(passwords, "_real", {})  # a job in another process:
    assert store.resolve_uri(MASKED) == URI  # the URI it inherited in the environment


def test_a_single_run_writes_no_password_in_its_output_folder(tmp_path, cli_env):
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "model.layers=[8]", "train.batch_size=10",
         "schedule.n_s=6", "train.progress=false", "tracking.enabled=false",
         f"tracking.uri={URI}"], cwd=tmp_path, env=cli_env, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr
    written = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert SECRET not in done.stdout + done.stderr
