"""YAML search spaces -> Ray Tune domains, keyed by the pretraining config's dotted keys.

A sweep overrides the same keys a user sets (``loss.gamma``), so a tuned value is the value used.

Example YAML::

    space:
      loss.alpha1: {type: uniform, low: 0.25, high: 1.0}
      loss.gamma: {type: loguniform, low: 0.1, high: 2.0}
      loss.alpha2: {type: choice, values: [0.25, 0.5]}
      train.lr: {type: grid, values: [1.0e-4, 5.0e-4]}
      views.n_local: {type: randint, low: 4, high: 11}   # integers 4..10: high is excluded, as in Ray Tune
"""

from __future__ import annotations

from typing import Any

from ray import tune

from deo.config import ConfigError, flat_keys, unknown_key_hint
from deo.train.config import PretrainConfig


def to_tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Translate the YAML space into Tune domains.

    Raises:
        ConfigError: a key is not a pretraining config key, or a spec lacks its fields.
    """
    valid = flat_keys(PretrainConfig)
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in valid:
            hint = unknown_key_hint(PretrainConfig, key, help_hint="`python pipelines/pretrain.py --help` lists them")
            raise ConfigError(f"space.{key}: not a pretraining config key; {hint}")
        kind = spec.get("type")
        try:
            if kind == "grid":
                out[key] = tune.grid_search(list(spec["values"]))
            elif kind == "choice":
                out[key] = tune.choice(list(spec["values"]))
            elif kind == "uniform":
                out[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
            elif kind == "loguniform":
                out[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
            elif kind == "randint":
                out[key] = tune.randint(int(spec["low"]), int(spec["high"]))
            else:
                raise ConfigError(f"space.{key}.type: unknown {kind!r}")
        except KeyError as e:
            raise ConfigError(f"space.{key}: type {kind} needs field {e.args[0]!r}") from e
    return out


def overrides_from_params(params: dict[str, Any]) -> list[str]:
    """Tune's sampled params as ``key=value`` overrides of the pretraining config."""
    return [f"{k}={v}" for k, v in sorted(params.items())]
