"""Everything a training run writes to MLflow, step by step.

The training process sends these calls to the tracking writer (`mlplab.writer`),
which runs them here in order; arguments are small (shapes, records, paths), and the
network travels as a file the training process saved, so nothing big crosses over.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlplab import tracking

CONFIG_FILE = "config.yaml"  # resolved config, written by the training process
NETWORK_FILE = "network.npz"  # trained network + input statistics (network.save)
EXAMPLE_ROWS = 2  # raw images logged as the model's input example


class RunRecorder:
    """One MLflow run of `mlplab.app.run_experiment`, from opening to its status."""

    def __init__(self):
        self.run: tracking.Run | None = None

    def open(self, uri: str, experiment: str, run_name: str | None,
             parent_run_id: str | None, environ: dict[str, str], cwd: str) -> str:
        """Start the run as the training process would, in its environment and folder
        as they are now (Hydra may have set variables or changed folder since this
        process started)."""
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        self.run = tracking.open_run(uri=uri, experiment=experiment, run_name=run_name,
                                     parent_run_id=parent_run_id)
        return self.run.run_id

    def log_params(self, params: dict[str, str]) -> None:
        self.run.log_params(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.set_tags(tags)

    def log_datasets(self, spec: dict) -> None:
        self.run.log_datasets(spec)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log_metrics(metrics, step)

    def log_outputs(self, folder: str, history: list[dict], title: str, image_shape,
                    class_names, examples=None) -> None:
        """From `folder` (removed afterwards): the config, the curves figure, the class
        templates of a 1-layer W, and with `examples` (raw input images) the model."""
        from mlplab import network, plots

        folder = Path(folder)
        try:
            net, _ = network.load(folder / NETWORK_FILE)
            plots.plot_curves(history, folder / "curves.png", title=title)
            artifacts = [folder / CONFIG_FILE, folder / "curves.png"]
            if net.n_layers == 1:
                plots.plot_class_templates(net.params["W1"], image_shape, class_names,
                                           folder / "class_templates.png")
                artifacts.append(folder / "class_templates.png")
            for path in artifacts:
                self.run.log_artifact(path)
            if examples is not None:
                from mlplab import pyfunc_model

                pyfunc_model.log_model(folder / NETWORK_FILE, examples)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def end(self, status: str, failure: str | None = None,
            metrics: dict[str, float] | None = None, step: int = 0) -> None:
        if self.run is None:  # never opened: nothing to close
            return
        try:
            if failure:
                self.run.set_tags({"failure": failure})
            if metrics:
                self.run.log_metrics(metrics, step)
        finally:
            self.run.end(status)
