"""The report command on a small store: tiny real runs of two published settings, plus
hand-made runs for the cases training does not produce quickly (seeds, failures,
sweep trials, sweeps, earlier reports)."""

from __future__ import annotations

import csv

import pytest
from mlflow import MlflowClient

from mlplab.app import report, store
from mlplab.commands import report as report_command
from mlplab.commands.common import CONF_DIR
from mlplab.commands.train import run_experiment

EXPERIMENT = "dd2424"


def _fake_run(uri, experiment, tags, metrics=None, status="FINISHED", artifact=None,
              params=None):
    client, exp_id = store.open_experiment(uri, experiment)
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value, step=0)
    if artifact:
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id, status)
    return run_id


def _final(train, val, test):
    return {"final_train_acc": train, "final_val_acc": val, "test_acc": test}


def _row(markdown: str, setting: str) -> dict[str, str]:
    """The table row of a setting: {column header: cell}."""
    lines = markdown.splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header = cells(next(ln for ln in lines if ln.startswith("| setting |")))
    return dict(zip(header, cells(next(ln for ln in lines
                                       if ln.startswith(f"| `{setting}` |"))), strict=True))


def _write_trials(folder, rows):
    """folder/trials.csv in the sweeper's layout."""
    folder.mkdir()
    path = folder / report.TRIALS_ARTIFACT
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["stage", "number", "state", "value", "lam"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def bn_pair(tiny_experiment):
    """Tiny real runs of three_layer and three_layer_bn: name -> Outcome."""
    return {name: run_experiment(tiny_experiment(name))
            for name in ("three_layer", "three_layer_bn")}


def test_every_setting_the_report_draws_has_an_experiment_file():
    files = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert set(report.KNOWN_ORDER) <= files


def test_report_tables_each_setting_beside_its_reference_and_draws_the_bn_pair(
        bn_pair, tracking_uri, tmp_path):
    path = report.build_report(tracking_uri, EXPERIMENT, tmp_path / "out")
    md = path.read_text()

    for name, reference in (("three_layer", 52.2), ("three_layer_bn", 53.5)):
        final = bn_pair[name].final
        row = _row(md, name)
        assert row["runs"] == "1"
        assert row["lambda"] == "0.005"
        for split in ("train", "val", "test"):
            assert row[split] == f"{100 * final[f'{split}_acc']:.1f}"
        assert row["reference test"] == f"{reference:.1f}"
        assert row["test − reference"] == f"{100 * final['test_acc'] - reference:+.1f}"
    assert "(figures/three_layer_bn.png)" in md
    assert (tmp_path / "out" / "figures" / "three_layer_bn.png").stat().st_size > 0
    # no 9-layer runs: no 9-layer figure, rather than an empty one
    assert not (tmp_path / "out" / "figures" / "nine_layer_bn.png").exists()
    assert "nine_layer_bn.png" not in md


def test_report_tables_best_mlp_after_the_reproduced_settings_and_draws_its_curves(
        tiny_experiment, tracking_uri, tmp_path):
    reproduced = run_experiment(tiny_experiment("three_layer_bn"))
    best = run_experiment(tiny_experiment("best_mlp"))

    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path / "out").read_text()

    row = _row(md, "best_mlp")
    assert row["runs"] == "1"
    assert row["lambda"] == "0.0002"
    assert row["test"] == f"{100 * best.final['test_acc']:.1f}"
    assert row["reference test"] == row["test − reference"] == ""  # beyond the reports
    assert _row(md, "three_layer_bn")["test"] == f"{100 * reproduced.final['test_acc']:.1f}"
    assert md.index("| `three_layer_bn` |") < md.index("| `best_mlp` |")
    assert "(figures/best_mlp.png)" in md
    assert (tmp_path / "out" / "figures" / "best_mlp.png").stat().st_size > 0


def test_report_averages_seeds_keeps_failed_settings_and_skips_trials_and_reports(
        tracking_uri, tmp_path):
    ref = {"reference_test_acc": "0.5"}
    for test_acc in (0.50, 0.60):
        _fake_run(tracking_uri, EXPERIMENT, {"setting": "mine", **ref},
                  _final(0.7, 0.55, test_acc))
    _fake_run(tracking_uri, EXPERIMENT, {"setting": "mine"}, _final(0.1, 0.1, 0.1),
              status="FAILED")
    parent = _fake_run(tracking_uri, EXPERIMENT, {"mlplab.sweep": "true"})
    _fake_run(tracking_uri, EXPERIMENT, {"setting": "mine", "mlflow.parentRunId": parent},
              _final(0.9, 0.9, 0.9))  # a sweep trial is not a run of the setting
    _fake_run(tracking_uri, EXPERIMENT, {"setting": "mine", "mlplab.kind": "report"})
    _fake_run(tracking_uri, EXPERIMENT, {"setting": "broken", "failure":
                                         "training diverged at update step 3: cost is nan "
                                         "(try a smaller learning rate)"}, status="FAILED")
    _fake_run(tracking_uri, "elsewhere", {"setting": "other"}, _final(0.3, 0.3, 0.3))

    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path).read_text()

    row = _row(md, "mine")
    assert row["runs"] == "2 (+1 failed)"
    assert row["test"] == "55.0 ± 7.1"  # mean and sample std of 50 and 60
    assert row["test − reference"] == "+5.0"
    broken = _row(md, "broken")
    assert broken["runs"] == "0 of 1"
    assert broken["train"] == "training diverged at update step 3: cost is nan"
    assert "`other`" not in md  # another experiment's runs stay out


def test_report_averages_only_runs_of_the_published_configuration_and_lists_the_rest(
        tracking_uri, tmp_path):
    published = {"lam": "0.005", "bn": "False", "model.layers": "[50, 50]"}

    def run(overrides, test_acc, status="FINISHED", **params):
        seed = params.pop("seed", "0")
        _fake_run(tracking_uri, EXPERIMENT,
                  {"setting": "mine", "hydra_overrides": f"experiment=mine {overrides}"},
                  _final(0.7, 0.6, test_acc), status=status,
                  params={**published, **params, "train.seed": seed,
                          "tracking.uri": f"sqlite:///{seed}.db", "tags.setting": "mine"})

    run("train.seed=0 train.progress=false", 0.50)
    run("train.seed=1", 0.52, seed="1")
    run("lam=0.005 train.seed=2", 0.54, seed="2")  # overridden with its own value: same
    run("model.layers=[50,50] bn=true", 0.10, status="FAILED", bn="True")
    run("lam=0.1", 0.30, lam="0.1")  # the newest run: yet not the published setting

    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path).read_text()

    row = _row(md, "mine")
    assert row["runs"] == "3"  # neither the lam=0.1 run nor the failed bn=True one
    assert row["lambda"] == "0.005"
    assert row["test"] == "52.0 ± 2.0"
    assert "Left out: 2 runs" in md
    assert "- `mine`: 1 run with `lam=0.1`" in md
    assert "- `mine`: 1 run with `bn=True`" in md


def test_report_plots_accuracy_vs_lambda_of_the_newest_search(tracking_uri, tmp_path):
    old = _write_trials(tmp_path / "old", [
        {"stage": 0, "number": 0, "state": "COMPLETE", "value": 0.4, "lam": 0.1}])
    _fake_run(tracking_uri, "search", {"mlplab.sweep": "true"}, artifact=old)
    new = _write_trials(tmp_path / "new", [
        {"stage": 0, "number": 0, "state": "COMPLETE", "value": 0.50, "lam": 1e-4},
        {"stage": 0, "number": 1, "state": "COMPLETE", "value": 0.52, "lam": 3e-3},
        {"stage": 0, "number": 2, "state": "FAIL", "value": "", "lam": 5e-2},
        {"stage": 1, "number": 3, "state": "COMPLETE", "value": 0.53, "lam": 2e-3},
        {"stage": "final", "number": 4, "state": "COMPLETE", "value": 0.56, "lam": 2e-3},
    ])
    newest = _fake_run(tracking_uri, "search", {"mlplab.sweep": "true"},
                       {"final_test_acc": 0.525}, artifact=new)

    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path / "out").read_text()

    section = md[md.index("## Accuracy vs lambda"):]
    assert f"Sweep run `{newest}` in experiment `search`: 3 completed trials." in section
    # the final retrain validates on other rows: reported apart, not the best trial
    assert "Best: lam = 0.002 with validation accuracy 53.0% (stage 1, trial 3)" in section
    assert ("Final retrain: lam = 0.002, validation accuracy 56.0%, test accuracy 52.5%."
            in section)
    assert (tmp_path / "out" / "figures" / "lambda_search.png").stat().st_size > 0
    # a named experiment without a search: said, not raised
    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path / "named",
                             search_experiment=EXPERIMENT).read_text()
    assert f"No search found in experiment `{EXPERIMENT}`" in md


def test_report_of_an_empty_store_says_there_are_no_runs(tracking_uri, tmp_path):
    md = report.build_report(tracking_uri, EXPERIMENT, tmp_path).read_text()
    assert f"No finished runs with a `setting` tag in experiment `{EXPERIMENT}`" in md
    assert "No search found in any experiment" in md


def test_report_command_logs_the_report_as_a_run_that_later_reports_ignore(
        bn_pair, tracking_uri, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["--experiment", EXPERIMENT, "--out", str(out), "--tracking-uri", tracking_uri]
    report_command.main(argv)

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    [logged] = client.search_runs([exp.experiment_id], "tags.`mlplab.kind` = 'report'")
    assert logged.info.run_id in capsys.readouterr().out
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == \
        {"report.md", "figures"}
    figures = {a.path for a in client.list_artifacts(logged.info.run_id, "figures")}
    assert "figures/three_layer_bn.png" in figures
    # a second report counts the same runs: the first report is not a setting
    report_command.main(argv + ["--no-log"])
    assert _row((out / "report.md").read_text(), "three_layer")["runs"] == "1"
