"""The engine: data, layers, network, optimisers, schedules, trainer, gradient check.
Plain Python and NumPy (threadpoolctl for BLAS threads): no Hydra, MLflow, Optuna or
matplotlib, as tests/test_engine_alone.py checks for every module in this folder."""
