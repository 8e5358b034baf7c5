"""mlplab's Hydra sweeper: staged (coarse-to-fine) Optuna searches with MLflow records.

Select it with `hydra/sweeper=mlplab_optuna` (conf/search/*.yaml do). Modules whose
names start with "_" hold the work; Hydra's plugin scan skips them, so importing
Optuna and MLflow costs nothing to runs that don't sweep.
"""
