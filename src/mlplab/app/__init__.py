"""The app around the engine: Hydra configs, MLflow tracking (spool, courier), reports,
plots and the pyfunc model. The commands (`mlplab.commands`) are built on it."""
