"""Passwords in URLs, kept off disk.

Database passwords belong in the environment (PGPASSWORD) or ~/.pgpass, which libpq
reads when a URL has none. A password given in a URL anyway
(`tracking.uri=postgresql://u:SECRET@host/db`, `hydra.sweeper.storage=...`) is masked
in the config before Hydra writes anything (`.hydra/*.yaml`, `multirun.yaml`, the
jobs' overrides; see commands.common.HidePasswords), so MLflow params, tags and logs
see it masked too. The masked config still works: `unmask` gives the real value back,
from this process's memory, or for the tracking URI and a sweep's Optuna storage from
$MLFLOW_TRACKING_URI and $MLPLAB_OPTUNA_STORAGE, where they are put for a sweep's jobs
to inherit (in this process or one a launcher starts).
"""

from __future__ import annotations

import os
import re

MASK = "***"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
STORAGE_ENV = "MLPLAB_OPTUNA_STORAGE"  # a pruning sweep's jobs report to it
ENV_OF_KEY = {"tracking.uri": TRACKING_ENV, "hydra.sweeper.storage": STORAGE_ENV}
# scheme://user:PASSWORD@ -- the user part has no '/', ':' or '@', the password no '@'
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@/]+@")

_real: dict[str, str] = {}  # masked value -> the value it hid, in this process only


def mask_password(text: str) -> str:
    """'postgresql://u:SECRET@h/db' -> 'postgresql://u:***@h/db', in a URL or in any text
    holding URLs (an override, a log line, an error message)."""
    return _USERINFO.sub(rf"\1:{MASK}@", text)


def unmask(value: str) -> str:
    """The real value behind a masked one (itself if it hides nothing known)."""
    if value in _real:
        return _real[value]
    for name in ENV_OF_KEY.values():
        env = os.environ.get(name)
        if env and value != env and mask_password(env) == value:
            return env
    return value


def hide_passwords(cfg) -> None:
    """Mask every password in a URL in the DictConfig `cfg` (task and Hydra config,
    overrides included), in place; a real `tracking.uri` goes to $MLFLOW_TRACKING_URI."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

    def mask(node) -> None:
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        for key in list(node.keys() if isinstance(node, DictConfig) else range(len(node))):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                mask(child)
            elif isinstance(value := child._value(), str) and mask_password(value) != value:
                _real[mask_password(value)] = value
                with read_write(node):
                    node[key] = mask_password(value)

    for key, env in ENV_OF_KEY.items():
        url = OmegaConf.select(cfg, key, default=None)
        if isinstance(url, str) and mask_password(url) != url:
            os.environ[env] = url
    mask(cfg)
