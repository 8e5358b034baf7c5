"""End to end: compose the real config, train on tiny data, read the MLflow store back."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mlplab.commands.train import run_experiment
from mlplab.engine import data

from .conftest import TINY_ROWS

METRICS = ("train_loss", "train_cost", "train_acc", "val_loss", "val_cost", "val_acc", "lr")


def test_run_records_params_stepped_metrics_artifacts_and_a_loadable_model(
        make_cfg, tracking_uri, tiny_cifar):
    cfg = make_cfg("model.layers=[8]", "schedule.n_s=6", "schedule.cycles=2",
                   "tracking.experiment=e2e")
    outcome = run_experiment(cfg)

    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.layers"] == "[8]"
    assert run.data.params["lam"] == "0.01"
    assert run.data.params["schedule.n_s"] == "6"
    for name in METRICS:
        steps = [m.step for m in client.get_metric_history(outcome.run_id, name)]
        # 2 cycles of 12 steps, 10 evaluation points per cycle rounds to every step
        assert steps[0] == 0 and steps[-1] == 24 and steps == sorted(steps), name
    assert run.data.metrics["test_acc"] == pytest.approx(outcome.final["test_acc"])
    assert outcome.val_acc == pytest.approx(run.data.metrics["final_val_acc"])
    assert run.data.tags["data_fingerprint"]
    assert run.data.tags["git_commit"]
    inputs = {t.value: d.dataset for d in run.inputs.dataset_inputs for t in d.tags
              if t.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "validation", "test"}  # every split, via log_inputs
    # described from the training process's arrays: the real shapes and dtype
    profile = json.loads(inputs["training"].profile)
    assert profile["features_shape"] == [TINY_ROWS, 3072]  # train on batch 1
    assert "float32" in inputs["training"].schema
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "curves.png"} <= artifacts
    assert "class_templates.png" not in artifacts  # only for the 1-layer model

    mlflow.set_tracking_uri(tracking_uri)
    model_uri = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")[0].model_uri
    model = mlflow.pyfunc.load_model(model_uri)
    url, md5 = tiny_cifar
    folder = data.cifar10_dir(url, md5, cfg.data.root)
    rows, labels = data.load_batch(folder / "test_batch")
    predictions = model.predict(data.rows_to_images(rows, (32, 32, 3)))
    assert predictions.shape == (len(labels),) and predictions.dtype == np.int64
    assert np.mean(predictions == labels) == pytest.approx(outcome.final["test_acc"])


def test_one_layer_run_logs_the_class_templates_of_W(make_cfg, tracking_uri):
    cfg = make_cfg("model.layers=[]", "schedule=constant", "schedule.epochs=2",
                   "tracking.log_model=false")
    outcome = run_experiment(cfg)
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(outcome.run_id)}
    assert "class_templates.png" in artifacts


def test_run_name_and_extra_tags_reach_the_run(make_cfg, tracking_uri):
    cfg = make_cfg("tracking.run_name=baseline", "+tags.note=first", "schedule.n_s=3",
                   "tracking.log_model=false")
    run = MlflowClient(tracking_uri).get_run(run_experiment(cfg).run_id)
    assert run.info.run_name == "baseline" and run.data.tags["note"] == "first"


def test_runs_share_the_machines_standardised_data_checked_once_per_process(
        make_cfg, monkeypatch):
    from mlplab.engine import datacache

    reads, checks = [], []
    raw, crc = data._raw_cifar10, datacache.crc32
    monkeypatch.setattr(data, "_raw_cifar10", lambda *a: reads.append(1) or raw(*a))
    monkeypatch.setattr(datacache, "crc32", lambda *a: checks.append(1) or crc(*a))
    base = ("schedule.n_s=3", "tracking.log_model=false")
    run_experiment(make_cfg(*base, "lam=0.1"))
    assert len(reads) == 1, "the first run builds the shared cache from the batches"
    checked = len(checks)
    run_experiment(make_cfg(*base, "lam=0.2"))
    assert len(reads) == 1 and len(checks) == checked, \
        "a later run maps the cache this process already checked: no reading, no CRC"
    run_experiment(make_cfg(*base, "data.n_train=30"))  # other rows: another cache
    assert len(reads) == 2


@pytest.mark.parametrize("overrides", [
    ("optimizer=momentum", "optimizer.nesterov=true"),
    ("optimizer=adam",),
    ("optimizer=adamw", "optimizer.weight_decay=0.05"),
    ("model.layers=[8,8]", "model.dropout=[0.2,0.5]", "bn=true"),
    ("augment=flip_translate", "augment.max_shift=2"),
    ("train.label_smoothing=0.1",),
    ("schedule=cosine", "schedule.epochs=2", "schedule.warmup_epochs=0.5"),
])
def test_each_toolbox_key_trains_and_is_recorded(make_cfg, tracking_uri, overrides):
    short = () if "schedule=cosine" in overrides else ("schedule.n_s=3",)
    cfg = make_cfg("model.layers=[8]", *short, "tracking.log_model=false", *overrides)
    outcome = run_experiment(cfg)
    run = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and np.isfinite(outcome.final["val_cost"])
    for override in overrides:
        key, value = override.split("=")
        if key in ("optimizer", "augment", "schedule"):  # a group's choice: its name
            assert run.data.params[f"{key}.name"] == value
        else:
            assert run.data.params[key].replace(" ", "").lower() == value.lower(), key
    assert run_experiment(cfg).final == outcome.final  # same config and seed, same numbers


def test_the_model_of_a_dropout_and_augmentation_run_predicts_raw_images_in_eval_mode(
        make_cfg, tracking_uri, tiny_cifar):
    cfg = make_cfg("model.layers=[16,16]", "bn=true", "model.dropout=0.5",
                   "augment=flip_translate", "optimizer=momentum", "schedule.n_s=6")
    outcome = run_experiment(cfg)
    mlflow.set_tracking_uri(tracking_uri)
    exp_id = MlflowClient(tracking_uri).get_run(outcome.run_id).info.experiment_id
    [logged] = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
    model = mlflow.pyfunc.load_model(logged.model_uri)
    folder = data.cifar10_dir(*tiny_cifar, cfg.data.root)
    rows, labels = data.load_batch(folder / "test_batch")
    images = data.rows_to_images(rows, (32, 32, 3))
    first, again = model.predict(images), model.predict(images)
    assert np.array_equal(first, again)  # no dropout at prediction: the same answer
    assert np.mean(first == labels) == pytest.approx(outcome.final["test_acc"])
