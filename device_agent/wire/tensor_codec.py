"""Binary tensor encoding (docs/protocol.md §6): dtypes 1-3 of version 1, uint8 (dtype 4) of version 2.

Layout: ``u8 dtype, u8 ndim, ndim x u32 dims, [int8 only: f32 scale, i8 zero_point], data``,
all little-endian. Decoding validates every field and raises only :class:`ProtocolError`.
"""

import math
import struct
from typing import Any, Literal

import numpy as np

MAX_PAYLOAD = 1 << 20  # a whole frame (the broker's message_size_limit)
MAX_TENSOR_DATA = MAX_PAYLOAD - 1024  # a tensor's data: room for the largest frame header (565 B)
MAX_DIMS = 4

Encoding = Literal["fp32", "fp16", "int8"]  # latent encodings (presence caps.latent_encodings)
ENCODINGS: tuple[Encoding, ...] = ("fp32", "fp16", "int8")
TensorEncoding = Literal["fp32", "fp16", "int8", "uint8"]  # every tensor dtype on the wire
TENSOR_ENCODINGS: tuple[TensorEncoding, ...] = ("fp32", "fp16", "int8", "uint8")
ENCODING_VERSIONS: dict[TensorEncoding, int] = {"fp32": 1, "fp16": 1, "int8": 1, "uint8": 2}  # lowest frame version

DTYPE_FLOAT32 = 1
DTYPE_FLOAT16 = 2
DTYPE_INT8 = 3
DTYPE_UINT8 = 4

_WIRE_DTYPES: dict[int, tuple[TensorEncoding, np.dtype[Any]]] = {
    DTYPE_FLOAT32: ("fp32", np.dtype("<f4")),
    DTYPE_FLOAT16: ("fp16", np.dtype("<f2")),
    DTYPE_INT8: ("int8", np.dtype("i1")),
    DTYPE_UINT8: ("uint8", np.dtype("u1")),
}
_QPARAMS = struct.Struct("<fb")


class ProtocolError(ValueError):
    """A payload or message that violates the protocol; the text is a short reason."""


def encode_tensor(a: np.ndarray) -> bytes:
    """Encode a finite float32 or float16 array (dtype 1 or 2)."""
    if a.dtype == np.float32:
        code = DTYPE_FLOAT32
    elif a.dtype == np.float16:
        code = DTYPE_FLOAT16
    else:
        raise ProtocolError(f"cannot encode dtype {a.dtype}; use encode_tensor_as")
    if not np.isfinite(a).all():
        raise ProtocolError("non-finite value in tensor")
    _, wire = _WIRE_DTYPES[code]
    return _header(code, a.shape, wire.itemsize) + np.ascontiguousarray(a, wire).tobytes()


def quantize_int8(a: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Asymmetric per-tensor affine int8 quantization: ``real ~= scale * (q - zero_point)``.

    Over float32 values, with lo = min(min(a), 0) and hi = max(max(a), 0) in float64:
    scale = float32((hi - lo) / 255), or 1.0 if that is 0; zero_point =
    clamp(rint(-128 - lo / scale)); q = clamp(rint(a / scale) + zero_point), clamps to
    [-128, 127], rint = round half to even. The error is at most scale / 2 (up to float
    rounding).
    """
    x = _as_float(a, np.float32).astype(np.float64)
    if x.size == 0 or not np.isfinite(x).all():
        raise ProtocolError("int8 quantization needs a non-empty finite tensor")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) or 1.0
    zero_point = int(np.clip(np.rint(-128.0 - lo / scale), -128, 127))
    q = np.clip(np.rint(x / scale) + zero_point, -128, 127).astype(np.int8)
    return q, scale, zero_point


def encode_tensor_as(a: np.ndarray, encoding: TensorEncoding) -> bytes:
    """Encode real values (any real dtype) as fp32, fp16, int8 with scale and zero point, or uint8
    (version 2; every value must be an integer 0..255)."""
    if encoding == "fp32":
        return encode_tensor(_as_float(a, np.float32))
    if encoding == "fp16":
        return encode_tensor(_as_float(a, np.float16))
    if encoding == "int8":
        q, scale, zero_point = quantize_int8(a)
        return _header(DTYPE_INT8, q.shape, 1) + _QPARAMS.pack(scale, zero_point) + q.tobytes()
    if encoding == "uint8":
        arr = np.asarray(a)
        if not is_uint8_valued(arr):
            raise ProtocolError("uint8 tensor values must be integers 0..255")
        return _header(DTYPE_UINT8, arr.shape, 1) + arr.astype(np.uint8).tobytes()
    raise ProtocolError(f"unknown latent encoding {encoding!r}")


def is_uint8_valued(a: np.ndarray) -> bool:
    """Whether every value of a real array is an integer 0..255 (what a uint8 tensor can hold)."""
    if a.dtype == np.uint8:
        return True
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        return False
    return bool(np.all((a >= 0) & (a <= 255)) and np.array_equal(a, np.rint(a)))


def decode_tensor(buf: memoryview | bytes, offset: int,
                  version: int = max(ENCODING_VERSIONS.values())) -> tuple[np.ndarray, TensorEncoding, int]:
    """Decode one tensor at `offset` of a frame of `version`: (float32 array: int8 dequantized, fp16
    and uint8 widened exactly; its encoding; the offset after it)."""
    view = byte_view(buf)
    if not 0 <= offset <= len(view):
        raise ProtocolError("tensor offset out of range")
    code, ndim = _unpack("<BB", view, offset, "tensor header")
    offset += 2
    if code not in _WIRE_DTYPES:
        raise ProtocolError(f"unknown tensor dtype {code}")
    if ENCODING_VERSIONS[_WIRE_DTYPES[code][0]] > version:
        needs = ENCODING_VERSIONS[_WIRE_DTYPES[code][0]]
        raise ProtocolError(f"unknown tensor dtype {code} in a version {version} frame "
                            f"({_WIRE_DTYPES[code][0]} needs protocol version {needs})")
    if not 1 <= ndim <= MAX_DIMS:
        raise ProtocolError(f"bad tensor ndim {ndim}")
    shape = _unpack(f"<{ndim}I", view, offset, "tensor dims")
    offset += 4 * ndim
    encoding, wire = _WIRE_DTYPES[code]
    nbytes = _data_size(shape, wire.itemsize)
    scale, zero_point = 1.0, 0
    if code == DTYPE_INT8:
        scale, zero_point = _unpack("<fb", view, offset, "int8 parameters")
        offset += _QPARAMS.size
        if not (math.isfinite(scale) and scale > 0):
            raise ProtocolError("int8 scale must be finite and > 0")
    if len(view) - offset < nbytes:
        raise ProtocolError("truncated tensor data")
    raw = np.frombuffer(view, wire, math.prod(shape), offset).reshape(shape)
    with np.errstate(over="ignore"):
        out = raw.astype(np.float32)
        if code == DTYPE_INT8:
            out = np.float32(scale) * (out - np.float32(zero_point))
    if not np.isfinite(out).all():
        raise ProtocolError("non-finite value in tensor")
    return out, encoding, offset + nbytes


def byte_view(buf: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view of `buf`; ProtocolError if it is not a contiguous buffer."""
    try:
        return memoryview(buf).cast("B")
    except TypeError as e:
        raise ProtocolError("payload must be a contiguous bytes-like object") from e


def _as_float(a: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """`a` converted to `dtype`, refusing non-real input."""
    arr = np.asarray(a)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ProtocolError(f"cannot encode dtype {arr.dtype}")
    with np.errstate(over="ignore"):
        return arr.astype(dtype)


def _header(code: int, shape: tuple[int, ...], itemsize: int) -> bytes:
    """dtype, ndim and dims, after checking the shape against the limits."""
    if not 1 <= len(shape) <= MAX_DIMS:
        raise ProtocolError(f"tensor must have 1..{MAX_DIMS} dims, got {len(shape)}")
    _data_size(shape, itemsize)
    return struct.pack(f"<BB{len(shape)}I", code, len(shape), *shape)


def _data_size(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of data implied by `shape`; every dim >= 1 and the total <= MAX_TENSOR_DATA."""
    if any(d < 1 for d in shape):
        raise ProtocolError("tensor dims must be >= 1")
    nbytes = itemsize
    for d in shape:
        nbytes *= d
        if nbytes > MAX_TENSOR_DATA:
            raise ProtocolError("tensor too large")
    return nbytes


def _unpack(fmt: str, view: memoryview, offset: int, what: str) -> tuple[Any, ...]:
    """struct.unpack_from that reports a short buffer as a truncated `what`."""
    if len(view) - offset < struct.calcsize(fmt):
        raise ProtocolError(f"truncated {what}")
    return struct.unpack_from(fmt, view, offset)
