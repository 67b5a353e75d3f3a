"""A run dir's JSON files read back (config.json, dataset.json, metrics.json), checked on the way in.

Each reader returns what `nmoe train` wrote or raises one `DamagedFile` naming the file and what was
expected, so a truncated or hand-edited file is one error line, never a traceback. Stdlib only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.config import Config, ConfigError, from_dict
from toolkit.errors import DamagedFile, one_line

METRIC_KEYS = ("personalized_accuracy", "global_accuracy", "upload_bytes", "download_bytes")


def read_json(path: Path, expected: str) -> Any:
    """The JSON value in `path`; DamagedFile (saying `expected`) when it cannot be read or parsed."""
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise DamagedFile(f"{path}: cannot read ({e.strerror or e}); expected {expected}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedFile(f"{path}: not valid JSON ({one_line(e)}); expected {expected}") from None


def read_config(run_dir: Path) -> Config:
    """The resolved config `nmoe train` stored in `run_dir/config.json`."""
    path = run_dir / "config.json"
    try:
        return from_dict(read_json(path, "the resolved config `nmoe train` writes"))
    except ConfigError as e:
        raise DamagedFile(f"{path}: {e} (expected the resolved config `nmoe train` writes)") from None


def read_dataset_info(run_dir: Path) -> dict[str, Any]:
    """`run_dir/dataset.json`: input shape, normalization and class names."""
    path = run_dir / "dataset.json"
    expected = ("an object with input_shape [C, H, W], scale, mean and std (one per channel), num_classes and "
                "class_names, as `nmoe train` writes")
    info = read_json(path, expected)
    if not (isinstance(info, dict) and _ints(info.get("input_shape"), 3) and _number(info.get("scale"))
            and _numbers(info.get("mean"), info["input_shape"][0])
            and _numbers(info.get("std"), info["input_shape"][0])
            and _ints(info.get("num_classes"), None)
            and isinstance(info.get("class_names"), list) and len(info["class_names"]) == info["num_classes"]
            and all(isinstance(n, str) for n in info["class_names"])):
        raise DamagedFile(f"{path}: expected {expected}")
    return info


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """`run_dir/metrics.json` with, per method, the numbers of the results table."""
    path = run_dir / "metrics.json"
    expected = f"an object whose 'methods' maps each method to its {', '.join(METRIC_KEYS)}, as `nmoe train` writes"
    metrics = read_json(path, expected)
    if not (isinstance(metrics, dict) and isinstance(metrics.get("methods"), dict) and all(
            isinstance(m, dict) and all(_number(m.get(k)) for k in METRIC_KEYS) for m in metrics["methods"].values())):
        raise DamagedFile(f"{path}: expected {expected}")
    return metrics


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: object, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(map(_number, value))


def _ints(value: object, n: int | None) -> bool:
    """A positive int (n None) or a list of n positive ints."""
    if n is None:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return isinstance(value, list) and len(value) == n and all(_ints(v, None) for v in value)
