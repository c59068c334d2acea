"""SVI checkpoints as plain data: a JSON description and raw numeric arrays, never a pickle.

A store is data: whoever can write into it (a shared project folder, a store copied from
a colleague) must not be able to run code as the next person who resumes a fit from it.
So the fit's state (guide and optimiser tensors, schedule, loss trace, stop rule, RNG) is
written as one byte string:

    MAGIC | header length (8 bytes, little-endian) | JSON header | array bytes

The header holds the state's tree (dicts with str/int keys, lists, tuples, numbers,
strings, booleans, None, and references to arrays) and, per array, its dtype (numeric or
bool only), shape and byte range. Reading it builds nothing but those values: an unknown
node, a dtype that is not a plain number, or a range outside the bytes is refused with
`CheckpointError`, and the fit starts over.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

MAGIC = b"BDCKPT1\n"
_LENGTH = struct.Struct("<Q")
_NUMERIC = frozenset("biuf")  # bool, signed, unsigned, float
_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint that is not one this module wrote (damaged, truncated or foreign)."""


def encode_state(state: Any) -> bytes:
    """The state as checkpoint bytes; raises `CheckpointError` on a value it cannot hold."""
    arrays: list[np.ndarray] = []
    meta: list[dict[str, Any]] = []
    tree = _encode(state, arrays, meta)
    header = json.dumps({"tree": tree, "arrays": meta}).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def _encode(value: Any, arrays: list[np.ndarray], meta: list[dict[str, Any]]) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        is_tensor = isinstance(value, torch.Tensor)
        array = value.detach().cpu().numpy() if is_tensor else value
        array = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d
        if array.dtype.kind not in _NUMERIC:
            raise CheckpointError(f"cannot checkpoint an array of dtype {array.dtype}")
        offset = sum(m["nbytes"] for m in meta)
        meta.append(
            {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
                "torch": is_tensor,
            }
        )
        arrays.append(array)
        return {"array": len(arrays) - 1}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise CheckpointError(f"cannot checkpoint a dict key of type {type(key).__name__}")
        return {"dict": [[k, _encode(v, arrays, meta)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_encode(v, arrays, meta) for v in value]}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, _SCALARS):
        return {"value": value}
    raise CheckpointError(f"cannot checkpoint a value of type {type(value).__name__}")


def decode_state(data: bytes) -> Any:
    """The state written by `encode_state`; anything else raises `CheckpointError`."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LENGTH.size:
        raise CheckpointError("not a bayesdream checkpoint (unknown format)")
    start = len(MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack(data[len(MAGIC) : start])
    try:
        header = json.loads(data[start : start + length].decode())
        tree, meta = header["tree"], header["arrays"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"unreadable checkpoint header: {err}") from None
    if not isinstance(meta, list):
        raise CheckpointError("unreadable checkpoint header: 'arrays' is not a list")
    body = memoryview(data)[start + length :]
    arrays = [_array(item, body) for item in meta]
    return _decode(tree, arrays)


def _array(item: Any, body: memoryview) -> np.ndarray | torch.Tensor:
    """One array from its header entry, checked before any byte is read."""
    try:
        dtype = np.dtype(str(item["dtype"]))
        shape = tuple(int(d) for d in item["shape"])
        offset, nbytes = int(item["offset"]), int(item["nbytes"])
        is_tensor = bool(item["torch"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"unreadable checkpoint array entry {item!r}: {err}") from None
    if dtype.kind not in _NUMERIC or dtype.hasobject:
        raise CheckpointError(f"checkpoint array of dtype {dtype} refused (numbers only)")
    if any(d < 0 for d in shape) or nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CheckpointError(f"checkpoint array entry {item!r} is inconsistent")
    if offset < 0 or offset + nbytes > len(body):
        raise CheckpointError("checkpoint is truncated (an array lies beyond its end)")
    array = np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape).copy()
    return torch.from_numpy(array) if is_tensor else array


def _decode(node: Any, arrays: list) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"unreadable checkpoint node {node!r}")
    ((kind, payload),) = node.items()
    if kind == "value" and isinstance(payload, _SCALARS):
        return payload
    if kind == "array" and isinstance(payload, int) and 0 <= payload < len(arrays):
        return arrays[payload]
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [_decode(item, arrays) for item in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(payload, list):
        out = {}
        for pair in payload:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int)):
                raise CheckpointError(f"unreadable checkpoint dict entry {pair!r}")
            out[pair[0]] = _decode(pair[1], arrays)
        return out
    raise CheckpointError(f"unreadable checkpoint node of kind {kind!r}")
