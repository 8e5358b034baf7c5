"""The engine (every module in src/mlplab/engine/) is plain Python + NumPy: usable
from a notebook without Hydra, MLflow, Optuna or matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlplab.engine

ENGINE_DIR = Path(mlplab.engine.__file__).parent
BLOCKED = ("hydra", "omegaconf", "mlflow", "optuna", "matplotlib", "mlplab.app")
BLOCK = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
"""

ENGINE_ONLY = BLOCK + """

import numpy as np
from mlplab.engine import data, network, schedules, trainer

rng = np.random.default_rng(0)
X = rng.standard_normal((200, 12), dtype=np.float32)
y = rng.integers(0, 3, 200)
ds = data.Dataset(X[:120], y[:120], X[120:160], y[120:160], X[160:], y[160:],
                  np.zeros(12, np.float32), np.ones(12, np.float32), (2, 2, 3),
                  ("a", "b", "c"), "synthetic", "test")
net = network.init_network(12, [16], 3, bn=True, rng=0)
result = trainer.train(net, ds, schedules.Cyclical(1e-4, 1e-1, 12, 1), lam=1e-3,
                       batch_size=20, rng=0, progress=False)
print("trained", result.steps, round(result.final["test_acc"], 3))
"""


def test_the_engine_imports_and_trains_without_hydra_or_mlflow():
    done = subprocess.run([sys.executable, "-c", ENGINE_ONLY], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained 24")


def test_every_module_in_the_engine_folder_imports_without_the_app_layers_libraries():
    modules = sorted(p.stem for p in ENGINE_DIR.glob("*.py") if p.stem != "__init__")
    assert {"data", "network", "trainer", "gradcheck"} <= set(modules)
    code = BLOCK + "".join(f"import mlplab.engine.{m}\n" for m in modules) + "print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
