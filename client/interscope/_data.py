"""Audit data from files: an .npz, a folder of images per class, or a CSV / Parquet table."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: File names taken as images in a class folder (others, and hidden files, are skipped).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TABLE_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})
FORMATS = (
    "an .npz with arrays x and y, a folder with one subfolder of images per class, or a .csv / "
    ".parquet table with a label column"
)


class DataError(ValueError):
    """A data file that is not what was expected: one line, and what was expected instead."""

    def __init__(self, message: str, expected: str) -> None:
        super().__init__(f"{message} ({expected})")
        self.message = message
        self.expected = expected


@dataclass(frozen=True)
class ModelShape:
    """What the data must fit: the model's per-example input shape, classes, value range and
    feature names (all optional: an .npz needs none of them)."""

    input_shape: tuple[int, ...] = ()
    classes: Sequence[str] = ()
    value_range: tuple[float, float] = (0.0, 1.0)
    feature_names: Sequence[str] = field(default_factory=tuple)
    #: "NCHW", "NHWC" or "features" as the server reports it; "" infers from the shape.
    layout: str = ""


def load_data(
    path: Path,
    model: ModelShape | None = None,
    *,
    limit: int | None = None,
    label_column: str = "label",
    resize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """x (float32, N x input shape) and y (int64 labels) from `path`, by its kind."""
    model = model or ModelShape()
    if path.is_dir():
        x, y = _image_folder(path, model, resize)
    elif not path.exists():
        raise DataError(f"{path}: no such file or folder", FORMATS)
    elif path.suffix.lower() == ".npz":
        x, y = load_npz(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        x, y = _table(path, model, label_column)
    else:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}", FORMATS)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y from an .npz (no pickles)."""
    expected = "an .npz with arrays x (inputs) and y (integer labels), as numpy.savez writes"
    if not path.is_file():
        raise DataError(f"{path}: no such file", expected)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive", expected)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data]
            if missing:
                raise DataError(f"{path}: no array {' or '.join(missing)} in it", expected)
            x, y = data["x"], data["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: cannot read it ({error})", expected) from None
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}", expected)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y holds {y.dtype}, not integer class labels", expected)
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def _label_of(name: str, classes: Sequence[str]) -> int | None:
    """A folder name or table value as a class index: a class name of the model, else a
    non-negative integer; None if it is neither (never a guess from sorting)."""
    if name in classes:
        return list(classes).index(name)
    if name.isdigit() and (not classes or int(name) < len(classes)):
        return int(name)
    return None


def _class_list(classes: Sequence[str]) -> str:
    shown = ", ".join(list(classes)[:12]) + (", ..." if len(classes) > 12 else "")
    return f"the model's classes: {shown}" if classes else "class indices 0, 1, ..."


def _image_layout(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels_first) of an image input shape: as the model's
    layout says, else inferred where the shape leaves no doubt."""
    if layout == "NCHW" and len(shape) == 3:
        return shape[1], shape[2], shape[0], True
    if layout == "NHWC" and len(shape) == 3:
        return shape[0], shape[1], shape[2], False
    if layout == "features":
        raise DataError(
            f"the model takes a feature vector of shape {shape}, not images",
            "give tabular data as a .csv / .parquet table or an .npz",
        )
    if len(shape) == 2:
        return shape[0], shape[1], 1, True
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape[1], shape[2], shape[0], True
    if len(shape) == 3 and shape[-1] in (1, 3):
        return shape[0], shape[1], shape[-1], False
    raise DataError(
        f"the model takes inputs of shape {shape}, not images",
        "an image model takes (C, H, W), (H, W, C) or (H, W) with 1 or 3 channels",
    )


def _image_folder(path: Path, model: ModelShape, resize: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # the `data` extra

    expected = (
        f"a folder with one subfolder per class, named as {_class_list(model.classes)}, "
        "holding image files"
    )
    if not model.input_shape:
        raise DataError(f"{path}: the model's input shape is unknown", expected)
    height, width, channels, first = _image_layout(tuple(model.input_shape), model.layout)
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{path}: no class subfolders in it", expected)
    low, high = model.value_range
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for folder in folders:
        label = _label_of(folder.name, model.classes)
        if label is None:
            raise DataError(f"{folder}: {folder.name!r} is not a class of the model", expected)
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        for file in files:
            try:
                with Image.open(file) as opened:
                    image = opened.convert("L" if channels == 1 else "RGB")
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
                raise DataError(f"{file}: not a readable image ({error})", expected) from None
            if image.size != (width, height):
                if not resize:
                    raise DataError(
                        f"{file}: {image.size[0]}x{image.size[1]} pixels, the model takes "
                        f"{width}x{height}",
                        "pass --resize to resize every image to the model's input",
                    )
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
            # 0..255 maps linearly onto the model's value range (its config's, [0, 1] by
            # default): the same rule for every image, stated in the README.
            pixels = low + pixels / 255.0 * (high - low)
            xs.append(np.moveaxis(pixels, -1, 0) if first else pixels)
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no image files in its class subfolders", expected)
    x = np.stack(xs).reshape(len(xs), *model.input_shape).astype(np.float32)
    return x, np.asarray(ys, dtype=np.int64)


def _read_table(path: Path, expected: str) -> Any:
    import pyarrow as pa  # the `data` extra
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".csv":
            return pyarrow.csv.read_csv(path)
        return pyarrow.parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: not a readable table ({first})", expected) from None


def _table(path: Path, model: ModelShape, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    names = list(model.feature_names)
    want = f"feature columns {', '.join(names)}" if names else "numeric feature columns"
    expected = f"a table with a label column {label_column!r} and {want}"
    table = _read_table(path, expected)
    columns = list(table.column_names)
    if label_column not in columns:
        raise DataError(
            f"{path}: no column {label_column!r} (columns: {', '.join(columns[:20])})",
            "name the label column with --label-column",
        )
    if names:
        missing = [n for n in names if n not in columns]
        if missing:
            raise DataError(f"{path}: no column for feature {', '.join(missing)}", expected)
        features = names
    else:
        features = [c for c in columns if c != label_column]
    size = math.prod(model.input_shape) if model.input_shape else len(features)
    if len(features) != size:
        raise DataError(
            f"{path}: {len(features)} feature columns, the model takes {size} features", expected
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows", expected)
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for k, name in enumerate(features):
        x[:, k] = _numeric(table.column(name), f"{path}: column {name!r}", expected)
    y = _labels(table.column(label_column), model.classes, f"{path}: column {label_column!r}")
    shape = tuple(model.input_shape) or (len(features),)
    return x.reshape(len(x), *shape), y


def _numeric(column: Any, where: str, expected: str) -> np.ndarray:
    if column.null_count:
        raise DataError(f"{where} has {column.null_count} empty values", expected)
    try:
        values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where} holds {column.type}, not numbers", expected) from None
    if not np.all(np.isfinite(values)):
        raise DataError(f"{where} holds NaN or infinite values", expected)
    return values


def _labels(column: Any, classes: Sequence[str], where: str) -> np.ndarray:
    expected = f"labels as {_class_list(classes)}"
    if column.null_count:
        raise DataError(f"{where} has {column.null_count} empty labels", expected)
    values = column.to_pylist()
    out = np.empty(len(values), dtype=np.int64)
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{where} row {k}: label {value!r} is not a class", expected)
        label = _label_of(str(value), classes)
        if label is None:
            raise DataError(f"{where} row {k}: label {value!r} is not a class", expected)
        out[k] = label
    return out
