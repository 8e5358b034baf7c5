"""Where models logged before the engine/app folders (2026-12) find their class:
MLflow unpickles `mlplab.pyfunc_model.ImageClassifier` by that name."""

from mlplab.app.pyfunc_model import ImageClassifier  # noqa: F401
