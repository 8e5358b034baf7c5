"""The app's error for a bad config value; a module of its own, below everything that
raises it (config, the Optuna storage, the sweeper)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value outside what is allowed; `key` names it (None: several keys)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # keeps the key when a launcher sends it between processes
        return type(self), (str(self), self.key)
