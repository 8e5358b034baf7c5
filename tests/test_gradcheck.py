"""The gradient check: the generic engine, every parameter of 1- to 9-layer nets (with
and without BN, lambda 0 and > 0, batches of 1 to 100), a broken gradient it must
catch, ReLU kinks it must not blame on the code, and the tracked command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from mlplab.app.config import ConfigError
from mlplab.commands import gradcheck as command
from mlplab.engine import data, gradcheck, layers, network

NINE_LAYERS = [50, 30, 20, 20, 10, 10, 10, 10]  # the reports' 9-layer net
D = 10  # input dimensions of the checked problems: enough to mix, fast to difference


@pytest.fixture(scope="module")
def problem(tiny_cifar, tmp_path_factory):
    """X: (280, 3072) float64, y: (280,) from the tiny archive (all batches, 20 held
    out), so that n=100 has rows to spare."""
    url, md5 = tiny_cifar
    ds = data.load_dataset("cifar10", split="all", n_val=20, url=url, md5=md5,
                           root=tmp_path_factory.mktemp("data"))
    return ds.X_train.astype(np.float64), ds.y_train


def _net(hidden, bn, seed=0, jitter=0.1):
    """A float64 network on D inputs, b, gamma, beta moved off their initial values as
    the command does."""
    net = network.init_network(D, hidden, 10, bn=bn, rng=seed, dtype=np.float64)
    command.move_off_initial_values(net, jitter, seed)
    return net


def _check(problem, hidden, bn, lam, n, **kwargs):
    X, y = problem
    return command.check_network(_net(hidden, bn), X[:n, :D], y[:n], lam, **kwargs)


# --- the engine, on functions whose gradients are known ---------------------------------

def test_numerical_gradients_match_a_known_gradient_and_restore_every_entry():
    a = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    params = {"a": a.copy(), "b": np.array([0.3, -0.7])}
    f = lambda: float(np.sum(params["a"] ** 3) + np.sum(np.sin(params["b"])))  # noqa: E731
    before = {k: v.copy() for k, v in params.items()}

    for order in (2, 4, 6):
        g = gradcheck.numerical_gradients(f, params, order=order)
        np.testing.assert_allclose(g["a"], 3 * a**2, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(g["b"], np.cos(params["b"]), rtol=1e-8)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])


def test_higher_orders_remove_the_step_error_of_a_sharply_curved_cost():
    # exp(x / s) bends on a scale s, as BN's cost does on batches of 2 (s ~ 3e-3 and
    # below); order k errs by ~(h / s)^k
    s = 3e-4
    params = {"x": np.array([0.0])}
    f = lambda: float(np.exp(params["x"][0] / s))  # noqa: E731
    rel = {order: abs(gradcheck.numerical_gradients(f, params, order=order)["x"][0] * s - 1)
           for order in (2, 4, 6)}
    assert rel[2] > 1e-4 and 1e-8 < rel[4] < 1e-6 and rel[6] < 1e-10
    assert gradcheck.largest_step(1e-5, 6) == pytest.approx(3e-5)


def test_float32_parameters_and_unknown_orders_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="float64"):
        gradcheck.numerical_gradients(lambda: 0.0, {"W1": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"order=3: allowed \(2, 4, 6\)"):
        gradcheck.numerical_gradients(lambda: 0.0, {"W1": np.zeros(3)}, order=3)


def test_relative_error_is_floored_by_eps_for_tiny_gradients():
    rel = gradcheck.relative_error(np.array([1.0, 1e-12]), np.array([1.0 + 2e-6, 0.0]),
                                   eps=1e-3)
    np.testing.assert_allclose(rel, [1e-6, 1e-9], rtol=1e-6)


def test_compare_reports_max_errors_share_within_threshold_and_excluded_entries():
    analytic = {"W": np.array([1.0, 1.0, 1.0, 1.0])}
    numeric = {"W": np.array([1.0, 1.0 + 1e-8, 1.1, 5.0])}
    exclude = {"W": np.array([False, False, False, True])}
    [row] = gradcheck.compare(analytic, numeric, eps=1e-3, threshold=1e-6, exclude=exclude)
    assert row.name == "W" and row.shape == (4,) and row.n_excluded == 1
    assert row.max_abs_err == pytest.approx(0.1)
    assert row.max_rel_err == pytest.approx(0.1 / 2.1)
    assert row.share_ok == pytest.approx(2 / 3)
    assert not row.ok and not gradcheck.passed([row])
    assert "| W | 4 |" in gradcheck.format_table([row]) and "FAIL" in gradcheck.format_table([row])


def test_a_parameter_with_nothing_left_to_compare_does_not_pass():
    [row] = gradcheck.compare({"W": np.ones(2)}, {"W": np.ones(2)},
                              exclude={"W": np.array([True, True])})
    assert row.n_compared == 0 and not row.ok


# --- every parameter of the networks the project trains ---------------------------------

CASES = [  # (hidden sizes, bn, lam, n): 1-, 2-, 3-layer nets in every combination ...
    (hidden, bn, lam, n)
    for hidden in ([], [8], [8, 6])
    for bn in ((False,) if not hidden else (False, True))  # BN needs a hidden layer
    for lam in (0.0, 0.1)
    for n in (1, 2, 20, 100)
    if not (bn and n == 1)  # BN maps a single sample to beta: nothing to check
] + [  # ... 9-layer nets: the reports' sizes where differencing is hardest (BN on a
    # batch of 2: units whose batch variance is below BN's epsilon), narrow ones (fast)
    # for each other batch size
    (NINE_LAYERS, True, 0.01, 2),
    ([6] * 8, False, 0.01, 1), ([6] * 8, True, 0.0, 20), ([6] * 8, False, 0.0, 100),
    ([6] * 8, True, 0.01, 100),
]


@pytest.mark.parametrize("hidden, bn, lam, n", CASES,
                         ids=[f"{'-'.join(map(str, h)) or 'linear'}{'-bn' if b else ''}"
                              f"-lam{lam:g}-n{n}" for h, b, lam, n in CASES])
def test_every_parameter_gradient_matches_to_1e_6(problem, hidden, bn, lam, n):
    rows = _check(problem, hidden, bn, lam, n)

    names = [r.name for r in rows]
    expected = [f"{p}{i}" for i in range(1, len(hidden) + 1)
                for p in (("W", "gamma", "beta") if bn else ("W", "b"))]
    assert names == expected + [f"W{len(hidden) + 1}", f"b{len(hidden) + 1}"]
    failing = {r.name: r.max_rel_err for r in rows if not r.ok}
    assert not failing, gradcheck.format_table(rows)
    # well under the threshold, and most entries compared (kinks are rare)
    assert max(r.max_rel_err for r in rows) < 5e-7
    assert sum(r.n_excluded for r in rows) < 0.01 * sum(r.n_compared for r in rows)


def _drop_variance_term(dout, cache):
    """batchnorm_backward without the gradient through the batch variance."""
    x_hat, gamma, inv_std = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = (gamma * inv_std / len(dout)) * (len(dout) * dout - dbeta)
    return dx, dgamma, dbeta


def _forget_gamma(dout, cache, batchnorm_backward=layers.batchnorm_backward):
    """batchnorm_backward without the factor gamma in dx."""
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    return dx / cache[1], dgamma, dbeta


def _last_bias_off_by_1e_4(backward):
    def broken(net, dscores, caches):
        grads = backward(net, dscores, caches)
        grads[f"b{net.n_layers}"] *= 1 + 1e-4
        return grads
    return broken


def test_a_broken_batchnorm_backward_fails_exactly_the_parameters_below_it(
        problem, monkeypatch):
    monkeypatch.setattr(layers, "batchnorm_backward", _drop_variance_term)
    rows = {r.name: r for r in _check(problem, [8, 6], True, 0.0, 20)}

    assert not rows["W1"].ok and not rows["W2"].ok and not rows["gamma1"].ok
    assert rows["W3"].ok and rows["b3"].ok  # above every BN layer: untouched
    assert rows["W1"].max_rel_err > 1e-2


def test_a_backward_that_forgets_gamma_is_caught_because_gamma_is_moved_off_1(
        problem, monkeypatch):
    X, y = problem
    monkeypatch.setattr(layers, "batchnorm_backward", _forget_gamma)
    at_init = command.check_network(_net([8], True, jitter=0.0), X[:20, :D], y[:20], 0.0)
    assert gradcheck.passed(at_init)  # gamma = 1 exactly: the bug cannot show there

    moved = {r.name: r for r in command.check_network(_net([8], True), X[:20, :D],
                                                      y[:20], 0.0)}
    assert not moved["W1"].ok


def test_a_gradient_off_by_one_part_in_ten_thousand_is_caught(problem, monkeypatch):
    monkeypatch.setattr(network, "backward", _last_bias_off_by_1e_4(network.backward))
    rows = {r.name: r for r in _check(problem, [8], False, 0.1, 20)}

    assert not rows["b2"].ok and rows["b2"].max_rel_err > 1e-5
    assert all(r.ok for name, r in rows.items() if name != "b2")


def test_entries_whose_difference_crosses_a_relu_kink_are_counted_not_blamed(problem):
    X, y = problem
    X, y = X[:20, :D], y[:20]
    net = _net([8], False)
    # put sample 0's pre-activation of unit 3 a hair above 0: moving b1[3] by h = 1e-5
    # switches the unit off, so the centred difference for b1[3] mixes two slopes
    net.params["b1"][3] = 1e-7 - X[0] @ net.params["W1"][:, 3]

    blind = {r.name: r for r in command.check_network(net, X, y, 0.0, exclude_kinks=False)}
    assert not blind["b1"].ok  # the numerical gradient is what is wrong here

    rows = {r.name: r for r in command.check_network(net, X, y, 0.0)}
    assert rows["b1"].n_excluded >= 1 and rows["W1"].n_excluded >= 1
    assert all(r.ok for r in rows.values()), gradcheck.format_table(list(rows.values()))


# --- the command: composed config, MLflow record, exit status ---------------------------

def test_command_checks_the_composed_config_and_records_table_metrics_and_verdict(
        make_cfg, tracking_uri, tmp_path, monkeypatch):
    cfg = make_cfg("model.layers=[6,5]", "bn=true", "gradcheck.d=12", "gradcheck.n=7",
                   "lam=0.05", config_name="gradcheck")
    outcome = command.run_gradcheck(cfg)

    assert outcome.passed
    assert [r.name for r in outcome.rows] == ["W1", "gamma1", "beta1", "W2", "gamma2",
                                              "beta2", "W3", "b3"]
    assert outcome.rows[0].shape == (12, 6)
    assert outcome.summary == "12-6-5-10 +BN, n=7, lam=0.05, h=1e-05, order 6"
    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "sanity"
    assert run.data.tags["mlplab.kind"] == "gradcheck"
    assert run.data.tags["gradcheck.result"] == "passed"
    assert run.data.params["gradcheck.h"] == "1e-05"
    m = run.data.metrics
    assert m["gradcheck.passed"] == 1.0
    assert m["gradcheck.max_rel_err.W1"] == pytest.approx(outcome.rows[0].max_rel_err)
    assert {"gradcheck.max_abs_err.gamma2", "gradcheck.share_ok.b3",
            "gradcheck.kinks.W2"} <= set(m)
    [artifact] = client.list_artifacts(outcome.run_id)
    assert artifact.path == command.TABLE_FILE
    table = client.download_artifacts(outcome.run_id, artifact.path, str(tmp_path))
    assert "| gamma1 | 6 |" in Path(table).read_text()

    monkeypatch.setattr(network, "backward", _last_bias_off_by_1e_4(network.backward))
    broken = command.run_gradcheck(cfg)
    assert not broken.passed
    run = client.get_run(broken.run_id)
    assert run.data.metrics["gradcheck.passed"] == 0.0
    assert run.data.tags["gradcheck.result"] == "failed"


@pytest.mark.parametrize("override, message", [
    ("gradcheck.h=0", "gradcheck.h=0"),
    ("gradcheck.order=3", "gradcheck.order=3: allowed (2, 4, 6)"),
    ("gradcheck.n=0", "gradcheck.n=0"),
    ("gradcheck.lam=-1", "gradcheck.lam=-1"),
    ("gradcheck.n=1 bn=true", "n >= 2"),
    ("gradcheck.n=61", "allowed 1..60"),  # the tiny archive's training split
    ("gradcheck.d=4000", "allowed 1..3072"),
])
def test_bad_values_are_refused_naming_the_key_before_anything_is_recorded(
        make_cfg, tmp_path, override, message):
    cfg = make_cfg(*override.split(), config_name="gradcheck")
    with pytest.raises(ConfigError, match=re.escape(message)):
        command.run_gradcheck(cfg)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def run_command(tmp_path, cli_env):
    def _run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlplab.commands.gradcheck", *args],
                              cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                              timeout=300)

    return _run


def test_exit_status_is_zero_when_every_parameter_passes_and_one_when_any_fails(
        run_command):
    ok = run_command("model.layers=[6]", "bn=true", "gradcheck.d=8", "gradcheck.n=4")
    assert ok.returncode == 0, ok.stderr
    assert "Gradient check PASSED" in ok.stdout and "| gamma1 | 6 |" in ok.stdout

    # a threshold below float64 rounding: the table is printed, the status says no
    bad = run_command("model.layers=[6]", "gradcheck.d=8", "gradcheck.n=4",
                      "gradcheck.threshold=1e-15")
    assert bad.returncode == 1, bad.stderr
    assert "Gradient check FAILED" in bad.stdout and "FAIL |" in bad.stdout
    assert "Traceback" not in bad.stderr


# --- dropout and label smoothing ---------------------------------------------------------

def _dropout_net(bn=True, rate=0.3):
    net = network.init_network(D, [8, 6], 10, bn=bn, dropout=rate, rng=0, dtype=np.float64)
    command.move_off_initial_values(net, 0.1, 0)
    return net


@pytest.mark.parametrize("bn", [False, True])
def test_every_parameter_of_a_net_with_dropout_passes_with_the_same_masks(problem, bn):
    # each evaluation of the cost draws its masks from the same seed (network.DROPOUT_SEED)
    X, y = problem
    rows = command.check_network(_dropout_net(bn), X[:20, :D], y[:20], 0.01)
    assert gradcheck.passed(rows), gradcheck.format_table(rows)


def _dropout_without_scale(x, rate, rng=None, *, mask=None):
    """dropout_forward that forgets to scale the kept units by 1 / (1 - rate)."""
    if mask is None:
        mask = rng.random(x.shape, dtype=np.float32) >= rate
    x *= mask
    return x, (mask, 1.0)


def test_a_dropout_that_forgets_its_scale_is_caught(problem, monkeypatch):
    X, y = problem
    monkeypatch.setattr(layers, "dropout_forward", _dropout_without_scale)
    rows = {r.name: r for r in command.check_network(_dropout_net(), X[:20, :D], y[:20], 0.0)}
    assert not rows["W1"].ok and rows["W1"].max_rel_err > 1e-2
    assert rows["W3"].ok and rows["b3"].ok  # above every dropout layer: untouched


def test_the_label_smoothing_gradient_matches_for_scores_and_every_parameter(problem):
    X, y = problem
    X, y = X[:20, :D], y[:20]
    scores = {"s": np.random.default_rng(0).normal(size=(20, 10))}
    f = lambda: layers.softmax_cross_entropy(scores["s"], y, 0.1)[0]  # noqa: E731
    analytic = {"s": layers.softmax_cross_entropy(scores["s"], y, 0.1)[1]}
    assert gradcheck.passed(gradcheck.compare(analytic,
                                              gradcheck.numerical_gradients(f, scores)))

    net = _dropout_net(rate=0.0)

    def cost_and_grads():
        return network.cost_and_grads(net, X, y, 0.01, update_stats=False, label_smoothing=0.1)

    rows = gradcheck.compare(cost_and_grads()[2],
                             gradcheck.numerical_gradients(lambda: cost_and_grads()[1],
                                                           net.params),
                             exclude=gradcheck.kink_crossings(
                                 lambda: command.relu_pattern(net, X), net.params,
                                 gradcheck.largest_step()))
    assert gradcheck.passed(rows), gradcheck.format_table(rows)
