"""`--data` formats: .npz, image folders per class (Pillow), CSV and Parquet (pyarrow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from interscope._data import DataError, ModelShape, load_data

DIGITS = ModelShape(input_shape=(1, 8, 8), classes=tuple(str(k) for k in range(10)))
TABLE = ModelShape(
    input_shape=(3,), classes=("good", "bad"), feature_names=("age", "income", "debt")
)


def _images(root: Path, size: tuple[int, int] = (8, 8), mode: str = "L") -> np.ndarray:
    """Two classes of two images each; returns the pixels written, class by class, file by
    file (the order the loader must keep)."""
    rng = np.random.default_rng(0)
    written = []
    for label in ("3", "7"):
        (root / label).mkdir(parents=True)
        for k in range(2):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / label / f"{k}.png")
            written.append(pixels)
    return np.stack(written)


def test_npz_reads_and_says_what_it_expected(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 4)), y=np.array([0, 1, 2]))
    x, y = load_data(path, limit=2)
    assert x.dtype == np.float32 and x.shape == (2, 4) and y.tolist() == [0, 1]
    np.savez(path, x=np.ones((3, 4)))
    with pytest.raises(DataError, match=r"no array y in it \(an .npz with arrays x"):
        load_data(path)
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(DataError, match=r"unknown data format '.txt' \(an .npz .* a folder"):
        load_data(tmp_path / "d.txt")


def test_image_folder_pixels_labels_and_value_range(tmp_path: Path) -> None:
    pixels = _images(tmp_path / "imgs")
    x, y = load_data(tmp_path / "imgs", DIGITS)
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [3, 3, 7, 7]
    np.testing.assert_allclose(x[:, 0], pixels / 255.0, rtol=1e-6)
    # 0..255 maps onto the model's value range.
    ranged = ModelShape(input_shape=(1, 8, 8), classes=DIGITS.classes, value_range=(-1.0, 1.0))
    x, _ = load_data(tmp_path / "imgs", ranged)
    np.testing.assert_allclose(x[:, 0], pixels / 255.0 * 2 - 1, rtol=1e-5, atol=1e-6)


def test_image_folder_rgb_channels_first_and_last(tmp_path: Path) -> None:
    pixels = _images(tmp_path / "rgb", mode="RGB")
    first, _ = load_data(tmp_path / "rgb", ModelShape(input_shape=(3, 8, 8)))
    last, _ = load_data(tmp_path / "rgb", ModelShape(input_shape=(8, 8, 3)))
    np.testing.assert_allclose(first, np.moveaxis(pixels, -1, 1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(last, pixels / 255.0, rtol=1e-6)
    # The server's layout decides where the shape alone would not: (3, 8, 3) channels-last.
    _images(tmp_path / "narrow", size=(8, 3), mode="RGB")
    narrow, _ = load_data(tmp_path / "narrow", ModelShape(input_shape=(3, 8, 3), layout="NHWC"))
    assert narrow.shape == (4, 3, 8, 3)
    with pytest.raises(DataError, match=r"takes a feature vector .* \(give tabular data as"):
        load_data(tmp_path / "rgb", ModelShape(input_shape=(3, 8, 8), layout="features"))


def test_image_folder_resize_only_when_asked(tmp_path: Path) -> None:
    _images(tmp_path / "big", size=(12, 10))
    with pytest.raises(DataError, match=r"12x10 pixels, the model takes 8x8 \(pass --resize"):
        load_data(tmp_path / "big", DIGITS)
    x, y = load_data(tmp_path / "big", DIGITS, resize=True)
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [3, 3, 7, 7]


def test_image_folder_errors_name_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no class subfolders in it \(a folder with one subfolder"):
        load_data(tmp_path / "empty", DIGITS)
    _images(tmp_path / "named")
    (tmp_path / "named" / "cat").mkdir()
    with pytest.raises(DataError, match=r"'cat' is not a class of the model .*classes: 0, 1, 2"):
        load_data(tmp_path / "named", DIGITS)
    _images(tmp_path / "bad")
    (tmp_path / "bad" / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        load_data(tmp_path / "bad", DIGITS)
    with pytest.raises(DataError, match=r"takes inputs of shape \(5,\), not images"):
        load_data(tmp_path / "named", ModelShape(input_shape=(5,)))


def _table(tmp_path: Path, name: str, columns: dict[str, list[object]]) -> Path:
    table = pa.table(columns)
    path = tmp_path / name
    if name.endswith(".csv"):
        import pyarrow.csv

        pyarrow.csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_tables_match_feature_names_and_class_names(tmp_path: Path, name: str) -> None:
    # Columns in another order than the model's features, an extra column, string labels.
    path = _table(
        tmp_path,
        name,
        {
            "debt": [5.0, 6.0],
            "id": [100, 101],
            "age": [30.0, 40.0],
            "y": ["bad", "good"],
            "income": [1.5, 2.5],
        },
    )
    x, y = load_data(path, TABLE, label_column="y")
    np.testing.assert_array_equal(x, [[30.0, 1.5, 5.0], [40.0, 2.5, 6.0]])
    assert y.tolist() == [1, 0]


@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_table_errors_name_what_was_expected(tmp_path: Path, name: str) -> None:
    path = _table(tmp_path, name, {"age": [1.0], "income": [2.0], "label": ["good"]})
    with pytest.raises(DataError, match=r"no column for feature debt \(a table with a label"):
        load_data(path, TABLE)
    with pytest.raises(DataError, match=r"no column 'target' \(columns: age, income, label\)"):
        load_data(path, TABLE, label_column="target")
    path = _table(
        tmp_path, name, {"age": [1.0], "income": ["lots"], "debt": [0.0], "label": ["good"]}
    )
    with pytest.raises(DataError, match=r"column 'income' holds string, not numbers"):
        load_data(path, TABLE)
    path = _table(tmp_path, name, {"age": [1.0], "income": [2.0], "debt": [0.0], "label": ["ugly"]})
    with pytest.raises(DataError, match=r"row 0: label 'ugly' is not a class .*good, bad"):
        load_data(path, TABLE)
    path = _table(
        tmp_path,
        name,
        {"age": [1.0, None], "income": [2.0, 1.0], "debt": [0.0, 1.0], "label": [0, 1]},
    )
    with pytest.raises(DataError, match=r"column 'age' has 1 empty values"):
        load_data(path, TABLE)
    # Without feature names: every other column, their count checked against the input.
    unnamed = ModelShape(input_shape=(4,), classes=("good", "bad"))
    with pytest.raises(DataError, match=r"3 feature columns, the model takes 4 features"):
        load_data(path, unnamed)


def test_a_file_that_is_no_table(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"t.parquet: not a readable table"):
        load_data(path, TABLE)
