"""The trained network as an MLflow pyfunc model.

`mlflow.pyfunc.load_model(uri).predict(images)` takes raw images as they come from the
dataset, `(n, H, W, C)` uint8 (for CIFAR-10 `(n, 32, 32, 3)`), standardises them with
the training split's statistics and returns class indices `(n,)` int64.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from mlplab.engine import network
from mlplab.engine.data import images_to_rows

WEIGHTS = "weights"
NAME = "model"  # the logged model's name in its run


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.net, extra = network.load(context.artifacts[WEIGHTS])
        self.mean, self.std = extra["mean"], extra["std"]

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        rows = images_to_rows(model_input).astype(self.net.dtype)
        rows -= self.mean
        rows /= self.std
        return network.predict_scores(self.net, rows).argmax(axis=1).astype(np.int64)


def log_model(weights: Path, example_images: np.ndarray, run_id: str, model_id: str):
    """Log the network saved at `weights` (`network.save` with the input `mean` and
    `std`) with a signature and input example, as the logged model `model_id` of run
    `run_id`; returns MLflow's ModelInfo."""
    shape = (-1, *example_images.shape[1:])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )
    with _quiet_mlflow():
        # Model.log is mlflow.pyfunc.log_model for a run given by id, not the active one
        return Model.log(
            artifact_path=None, name=NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=model_id,
            python_model=ImageClassifier(),
            artifacts={WEIGHTS: str(weights)},
            signature=signature,
            input_example=example_images,
            # Named explicitly: inferring requirements re-imports the model (seconds).
            pip_requirements=["mlplab", f"numpy=={np.__version__}",
                              f"mlflow=={mlflow.__version__}"],
        )


@contextmanager
def _quiet_mlflow():
    """Silence MLflow's INFO/WARNING notes while logging our model: the class is our
    own code, so its advice on pickled classes and input validation is noise."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
