"""Condition variables: from label values to the numbers the UNet is conditioned on, and back.

A run trained with ``--condition slice,age`` conditions its UNet on those label columns
(dataset.find_labels reads them from the data folder's labels.csv, or the OASIS PNG names).
This module owns what happens between the labels and the network:

* `condition_stats`: per variable, measured on the TRAINING split only and saved in
  config.json (`RunConfig.condition_stats`), so sampling normalises as training did::

      {"slice": {"mean": 0.5, "std": 0.29, "min": 0.0, "max": 1.0, "known": 151, "categories": null},
       "sex":   {"mean": 0.6, "std": 0.49, "min": 0.0, "max": 1.0, "known": 400, "categories": [0.0, 1.0]}}

  A variable is categorical when its values are all 0 or 1 (a flag such as sex); the UNet
  embeds it with a lookup table
  (`RunConfig.cond_categories` gives the UNet the counts). Every other variable is
  continuous (slice, age, CDR 0/0.5/1/2, MMSE, ...) and goes through a small MLP: ordinal
  and numeric variables keep their order, and a value between those seen still means
  something (a small data set's few ages must not become categories).
* `normalise`: raw values (N, K) → the network's input (N, K) float32:
  continuous (v − mean) / std, categorical the index of v in `categories`; NaN stays NaN
  and means "unknown" (the UNet then uses a learned "unknown" embedding; see
  modules.ConditionEmbedding).
* `requested_values`: what a user asks for (``{"slice": 0.6, "age": 80}``, scalars or one
  value per sample) as raw (n, K) with NaN for the variables left out, with one-line errors
  for unknown names and a warning for values outside the training range.
* `parse_assignments`: predict.py's ``--condition slice=0.6 age=80`` into that dict.

Classifier-free guidance itself (eps_u + w (eps_c − eps_u)) lives in samplers.Sampler;
the dropout of conditions during training in diffusion.LatentDiffusion.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from cli import UserError

CATEGORICAL_VALUES = (0.0, 1.0)  # a variable with no other values is categorical (a flag)


def condition_stats(names, columns, train_values: np.ndarray) -> dict:
    """Statistics of the variables `names` over the training labels (see the module docstring).

    columns: the label columns (K_all,); train_values: float (N, K_all), NaN = unknown.
    UserError for a name that is not a column, or a variable no training image knows.
    """
    columns = list(columns)
    stats = {}
    for name in names:
        if name not in columns:
            raise UserError(
                f"--condition {name}: no such label; the data's labels are {', '.join(columns) or '(none)'}"
            )
        column = np.asarray(train_values, np.float64)[:, columns.index(name)]
        known = column[np.isfinite(column)]
        if not len(known):
            raise UserError(f"--condition {name}: no training image has a value for it")
        distinct = np.unique(known)
        categorical = bool(np.isin(distinct, CATEGORICAL_VALUES).all())
        std = float(known.std())
        stats[name] = {
            "mean": float(known.mean()),
            "std": std if std > 0 else 1.0,
            "min": float(known.min()),
            "max": float(known.max()),
            "known": int(len(known)),
            "categories": [float(v) for v in distinct] if categorical else None,
        }
    return stats


def normalise(stats: dict, raw: np.ndarray) -> np.ndarray:
    """Raw values (N, K), columns in the order of `stats`, NaN = unknown → float32 (N, K) network
    input: (v − mean) / std, or the index of v among the categories. A categorical value that
    is not one of the categories becomes unknown (NaN); `requested_values` refuses it first."""
    raw = np.asarray(raw, np.float64).reshape(-1, len(stats))
    out = np.full(raw.shape, np.nan)
    for k, s in enumerate(stats.values()):
        v = raw[:, k]
        if s["categories"]:
            categories = np.asarray(s["categories"])
            match = np.isclose(v[:, None], categories[None, :])
            out[:, k] = np.where(match.any(axis=1), match.argmax(axis=1), np.nan)
        else:
            out[:, k] = (v - s["mean"]) / s["std"]
    return out.astype(np.float32)


def parse_assignments(items) -> dict[str, float]:
    """["slice=0.6", "age=80"] → {"slice": 0.6, "age": 80.0}; UserError for a malformed item."""
    condition = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or not math.isfinite(number):
            raise UserError(f"--condition {item!r}: expected NAME=NUMBER, e.g. slice=0.6")
        if name in condition:
            raise UserError(f"--condition {name} is given twice")
        condition[name] = number
    return condition


def requested_values(stats: dict | None, condition: dict | None, n: int) -> np.ndarray | None:
    """Raw values (n, K) for `condition` ({name: a number, or n numbers}); variables left out
    are NaN (unknown). None when the run is unconditional and nothing is asked for.

    UserError when the run was trained without conditioning but a condition is given, for a
    name the run was not trained on, for a categorical value it never saw, or for a wrong
    number of values. A continuous value outside the training range [min, max] is allowed,
    with one warning (the network extrapolates there).
    """
    condition = dict(condition or {})
    if not stats:
        if condition:
            raise UserError(f"this run was trained without conditioning; it cannot take {', '.join(condition)}")
        return None
    unknown = [name for name in condition if name not in stats]
    if unknown:
        raise UserError(
            f"this run is not conditioned on {unknown[0]!r}; its condition variables are {', '.join(stats)}"
        )
    raw = np.full((n, len(stats)), np.nan)
    for k, (name, s) in enumerate(stats.items()):
        if name not in condition:
            continue
        value = np.asarray(condition[name], np.float64)
        values = np.full(n, float(value)) if value.ndim == 0 else value.reshape(-1)
        if values.shape != (n,):
            raise UserError(f"condition {name}: expected one value or {n} values, got {values.size}")
        given = values[np.isfinite(values)]
        if s["categories"]:
            bad = [v for v in given if not np.isclose(v, s["categories"]).any()]
            if bad:
                shown = ", ".join(f"{c:g}" for c in s["categories"])
                raise UserError(f"condition {name}={bad[0]:g}: not one of the training values {shown}")
        elif len(given) and (given.min() < s["min"] or given.max() > s["max"]):
            outside = given[(given < s["min"]) | (given > s["max"])][0]
            warnings.warn(
                f"condition {name}={outside:g} is outside the training range [{s['min']:g}, {s['max']:g}]",
                stacklevel=2,
            )
        raw[:, k] = values
    return raw


def sweep_values(stats: dict, name: str, count: int) -> np.ndarray:
    """`count` values of `name` across its training range, for conditions.png: every category
    of a categorical variable, else evenly spaced from min to max."""
    s = stats[name]
    if s["categories"]:
        return np.asarray(s["categories"], np.float64)
    return np.linspace(s["min"], s["max"], count)
