"""conf/experiment/*.yaml: every file composes with the real config tree and trains a
few steps on the tiny archive; each published setting pins the published values."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import run_experiment
from mlplab.engine import schedules

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ASSIGNMENT3 = {"lam": 0.005, "schedule.name": "clr", "schedule.eta_min": 1e-5,
               "schedule.eta_max": 1e-1, "schedule.n_s_k": 5, "schedule.cycles": 2,
               "data.split": "all", "data.n_val": 5000, "train.batch_size": 100}
# Values the reports state, setting by setting (the files' other keys are free).
PUBLISHED = {
    "one_layer_lam0_eta0.1": {"lam": 0, "schedule.eta": 0.1},
    "one_layer_lam0_eta0.001": {"lam": 0, "schedule.eta": 0.001},
    "one_layer_lam0.1_eta0.001": {"lam": 0.1, "schedule.eta": 0.001},
    "one_layer_lam1_eta0.001": {"lam": 1, "schedule.eta": 0.001},
    "two_layer_one_cycle": {"model.layers": [50], "lam": 0.01, "schedule.n_s": 500,
                            "schedule.cycles": 1, "data.split": "batch1"},
    "two_layer_three_cycles": {"model.layers": [50], "lam": 0.01, "schedule.n_s": 800,
                               "schedule.cycles": 3, "data.split": "batch1"},
    "two_layer_searched": {"model.layers": [50], "schedule.cycles": 3, "data.split": "all",
                           "data.n_val": 1000},
    "three_layer": {**ASSIGNMENT3, "model.layers": [50, 50], "bn": False},
    "three_layer_bn": {**ASSIGNMENT3, "model.layers": [50, 50], "bn": True},
    "nine_layer": {**ASSIGNMENT3, "model.layers": [50, 30, 20, 20, 10, 10, 10, 10],
                   "bn": False},
    "nine_layer_bn": {**ASSIGNMENT3, "model.layers": [50, 30, 20, 20, 10, 10, 10, 10],
                      "bn": True},
} | {
    f"init_std{std}{suffix}": {**ASSIGNMENT3, "model.layers": [50, 50], "bn": bn,
                               "model.init": "normal", "model.init_std": float(std)}
    for std in ("1e-1", "1e-3", "1e-4") for suffix, bn in (("", False), ("_bn", True))
}
ONE_LAYER = {"model.layers": [], "schedule.name": "constant", "schedule.epochs": 40,
             "train.batch_size": 100, "data.split": "batch1"}


@pytest.fixture(scope="module")
def module_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(module_store) -> str:
    """One MLflow store for the module's runs: creating a store's tables takes seconds."""
    return module_store


def _published_cfg(make_cfg, name):
    """The experiment as a user gets it (make_cfg's size overrides undone)."""
    return make_cfg(f"experiment={name}", "train.batch_size=100")


def test_every_published_setting_has_an_experiment_file():
    assert set(PUBLISHED) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_tags_its_runs_with_its_own_name(make_cfg, name):
    # the report groups runs by this tag
    assert _published_cfg(make_cfg, name).tags.setting == name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_experiment_pins_the_published_setting(make_cfg, name):
    cfg = _published_cfg(make_cfg, name)
    expected = PUBLISHED[name] | (ONE_LAYER if name.startswith("one_layer") else {})
    for key, value in expected.items():
        actual = OmegaConf.select(cfg, key)
        actual = list(actual) if OmegaConf.is_list(actual) else actual
        assert actual == value, f"{name}: {key}={actual}, published {value}"
    assert cfg.tracking.experiment == "dd2424"  # where the report looks by default
    ref = cfg.tags.get("reference_test_acc")
    assert ref is None or 0 < float(ref) < 1


def test_assignment3_half_cycle_is_five_epochs_of_45000_images(make_cfg):
    cfg = _published_cfg(make_cfg, "three_layer")
    s = cfg.schedule
    assert schedules.half_cycle(s.n_s, s.n_s_k, 45_000, cfg.train.batch_size) == 2250


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_trains_a_few_steps(tiny_experiment, tracking_uri, name):
    outcome = run_experiment(tiny_experiment(name))

    run = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == name
    assert run.data.tags["setting"] == name
    assert 0 <= run.data.metrics["test_acc"] <= 1


@pytest.mark.parametrize("ablation", ["augment=none", "optimizer=sgd", "model.dropout=0.1",
                                      "model.layers=[512,512]", "train.label_smoothing=0"])
def test_best_mlp_ablations_are_one_override_and_change_nothing_else(make_cfg, ablation):
    from mlplab.app import experiment

    full = OmegaConf.to_container(_published_cfg(make_cfg, "best_mlp"))
    cfg = make_cfg("experiment=best_mlp", "train.batch_size=100", ablation)
    experiment.validate(cfg)  # composes and validates: no key left over from the recipe
    ablated = OmegaConf.to_container(cfg)
    key, _ = ablation.split("=")
    group = key.split(".")[0]
    differs = {k for k in full if full[k] != ablated[k]}
    assert differs == {group}, f"{ablation} changed {differs}"
