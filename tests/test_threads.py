"""How many BLAS threads a run and a sweep's trials use: fixed rules of the core count."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from hydra_plugins.mlplab_optuna_sweeper import _parallel
from mlplab.engine import threads

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_a_steps_work_counts_forward_weight_and_input_gradient_products():
    # 3072-50-10 at batch 100: forward and weight gradient of both layers, input
    # gradient of the second only
    assert threads.step_macs([3072, 50, 10], 100) == 100 * (2 * (3072 * 50 + 50 * 10) + 500)


@pytest.mark.parametrize("sizes, cores, update", [
    ([3072, 50, 10], 1, 1),                  # the reports' nets: two threads at most
    ([3072, 50, 10], 2, 2),
    ([3072, 50, 10], 16, 2),
    ([3072, 1024, 1024, 10], 16, 16),        # the toolbox net: every core
    ([64, 8, 10], 16, 1),                    # a tiny net: one
])
def test_update_steps_get_threads_by_their_work_evaluation_gets_all(sizes, cores, update):
    phases = threads.Phases(cores, threads.step_macs(sizes, 100))
    assert phases.plan == {"update": update, "eval": cores}


def _blas() -> int:
    """The BLAS limit as threadpoolctl reads it, independently of mlplab.engine.threads."""
    return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def test_phases_switch_their_limits_and_restore_the_one_they_found_even_on_an_error():
    two = min(2, threads.available_cores())  # OpenBLAS goes no higher than the cores
    with threadpool_limits(1, user_api="blas"):  # as a user's OPENBLAS_NUM_THREADS=1
        phases = threads.Phases(two, threads.step_macs([8, 4, 2], 10))  # tiny: 1 update
        phases.start()
        assert _blas() == 1
        with pytest.raises(RuntimeError), phases.evaluate():
            assert _blas() == two
            raise RuntimeError("an evaluation fails")
        assert _blas() == 1, "back to the update phase's limit"
        phases.stop()
        assert _blas() == 1, "the limit found at the start"
    assert phases.used == {"update": 1, "eval": two}


def test_a_runs_default_threads_stay_within_a_blas_limit_the_user_set():
    with threadpool_limits(1, user_api="blas"):
        assert threads.default_threads() == 1
    assert threads.default_threads() == min(threads.available_cores(), _blas())


def test_the_plan_on_an_8_core_machine_runs_8_trials_at_once_on_one_thread_each():
    plan = _parallel.plan(cores=8, workers=None, n_jobs=1, launcher=_parallel.BASIC_LAUNCHER)
    assert plan.workers == 8
    assert plan.threads(10) == 1       # lambda_c2f's stage 0: 10 trials, 8 at a time
    assert plan.threads(8) == 1        # stage 1
    assert plan.threads(3) == 2        # a 3-trial stage leaves cores to share
    assert plan.threads(1) == 8        # the lone final retrain gets every core


def test_a_users_worker_count_and_a_batch_launcher_are_honoured():
    assert _parallel.plan(8, 2, 1, _parallel.BASIC_LAUNCHER).threads(10) == 4
    # the basic launcher runs a batch's jobs one after the other: n_jobs adds no trials
    assert _parallel.plan(8, 2, 4, _parallel.BASIC_LAUNCHER).threads(10) == 4
    joblib = _parallel.plan(8, None, 4, JOBLIB)
    assert joblib.workers == 1 and joblib.threads(10) == 2  # 4 jobs share 8 cores
    slurm = _parallel.plan(8, None, 8, SLURM)
    assert slurm.workers == 1 and slurm.threads(10) is None  # each job's own machine


def test_a_trial_gets_the_planned_threads_unless_its_config_sets_them():
    plan = _parallel.plan(8, None, 1, _parallel.BASIC_LAUNCHER)
    assert _parallel.thread_override(plan, 1, None) == ["train.threads=8"]
    assert _parallel.thread_override(plan, 1, 3) == [], "the user's train.threads wins"
    assert _parallel.thread_override(plan, 1, 0) == [], "an app without the key"
    assert _parallel.thread_override(_parallel.plan(8, None, 8, SLURM), 1, None) == []


def test_the_planned_threads_stay_within_a_blas_limit_the_user_set():
    plan = _parallel.plan(8, None, 1, _parallel.BASIC_LAUNCHER, max_threads=1)
    assert plan.workers == 8 and plan.threads(1) == 1
