"""Small trained heads and probes on disk: plain arrays in an .npz, never a pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cliplens.errors import InvalidInputError
from cliplens.store.files import write_atomic_binary


def save_arrays(path: str | Path, metrics: dict[str, float], **arrays: Any) -> Path:
    """Write arrays and a flat dict of metrics to `path` exactly (no .npz appended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = np.array(list(metrics), dtype=str)
    values = np.array(list(metrics.values()), dtype=np.float64)
    write_atomic_binary(
        path, lambda f: np.savez(f, metric_names=names, metric_values=values, **arrays)
    )
    return path


def load_arrays(path: str | Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(arrays, metrics) from `save_arrays`; a bad file is a clear error naming `what`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("metric_")}
            names, values = z["metric_names"].tolist(), z["metric_values"].tolist()
            metrics = dict(zip(names, values, strict=True))
    except (OSError, KeyError, ValueError) as e:
        raise InvalidInputError(f"{what} {path}: not a cliplens {what} file ({e})") from e
    return arrays, metrics
