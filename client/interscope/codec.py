"""numpy <-> wire Tensor conversion (Open Inference Protocol datatypes, little-endian bytes)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from interscope.v1 import tensor_pb2

#: Open Inference Protocol datatype name -> little-endian numpy dtype.
DATATYPES: dict[str, np.dtype] = {
    "FP64": np.dtype("<f8"),
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "INT16": np.dtype("<i2"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class TensorError(ValueError):
    """A wire tensor is malformed or does not fit what was asked of it."""


def datatype_of(dtype: npt.DTypeLike) -> str:
    """The Open Inference Protocol name of a numpy dtype (TensorError if it has none)."""
    kind = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else dtype
    for name, candidate in DATATYPES.items():
        if np.dtype(kind) == candidate:
            return name
    raise TensorError(
        f"numpy dtype {np.dtype(dtype)} has no wire datatype; use one of {', '.join(DATATYPES)}"
    )


def to_tensor(array: npt.ArrayLike) -> tensor_pb2.Tensor:
    """Encode an array as a Tensor message (row-major, little-endian)."""
    arr = np.asarray(array)
    name = datatype_of(arr.dtype)
    data = np.ascontiguousarray(arr, dtype=DATATYPES[name])
    return tensor_pb2.Tensor(datatype=name, shape=list(arr.shape), raw_data=data.tobytes())


def from_tensor(
    tensor: tensor_pb2.Tensor,
    *,
    what: str = "tensor",
    max_bytes: int | None = None,
    allowed: tuple[str, ...] | None = None,
    finite: bool = False,
) -> np.ndarray:
    """Decode a Tensor message into a fresh numpy array, validating it first.

    Raises TensorError with a message naming `what` and the rule broken: unknown or disallowed
    datatype, negative dimension, byte length that does not match the shape, a size above
    `max_bytes` (message starts with "too large"), or NaN/Inf when `finite` is asked for.
    """
    name = tensor.datatype.upper()
    if name not in DATATYPES:
        raise TensorError(
            f"{what}: unknown datatype {tensor.datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    if allowed is not None and name not in allowed:
        raise TensorError(f"{what}: datatype {name} not allowed here; use {' or '.join(allowed)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{what}: shape {list(shape)} has a negative dimension")
    dtype = DATATYPES[name]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise TensorError(
            f"too large: {what} of shape {list(shape)} needs {expected} bytes; "
            f"the limit is {max_bytes}"
        )
    if len(tensor.raw_data) != expected:
        raise TensorError(
            f"{what}: raw_data has {len(tensor.raw_data)} bytes but shape {list(shape)} of "
            f"{name} needs {expected}"
        )
    array = (
        np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    )
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise TensorError(f"{what}: contains NaN or Inf values")
    return array
