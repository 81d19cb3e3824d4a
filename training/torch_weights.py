"""Read a PyTorch legacy (non-zip) checkpoint as data, with numpy, and never as code.

A ``.pth`` file in PyTorch's legacy serialization is a sequence of pickles followed by raw tensor bytes:

1. a magic number, 2. the protocol version, 3. a dictionary describing the writer's machine,
4. the state dictionary, whose tensors refer to storages through pickle persistent ids,
5. the list of storage keys in the order their bytes follow,

then, for each storage key, its element count as a little-endian int64 and its raw little-endian elements.

Pickle can call any importable callable, so the unpickler here allows exactly three kinds of name
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage`` types) and maps them
to harmless local stand-ins. Every other name is refused with ``UnsafeCheckpointError``. torch is never imported.

Tensors are rebuilt with the storage offset, size *and stride* that the file records: many convolution kernels
of the EfficientNet-Lite checkpoints are non-contiguous views, and reading them as contiguous silently scrambles
their weights.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
"""The storage types a checkpoint may name, with the numpy type of their little-endian elements."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint names a callable outside the allowed set, or is not a legacy PyTorch checkpoint."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.*Storage`` class named by the pickle."""

    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes follow the pickles."""

    key: str
    dtype: np.dtype[Any]
    element_count: int


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` was asked to build: a strided view into one storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_ignored: object
) -> _TensorRef:
    """The stand-in for ``torch._utils._rebuild_tensor_v2``: records the view instead of building a tensor."""
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError("a tensor refers to something that is not a storage")
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names a legacy state dictionary needs, to local stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise UnsafeCheckpointError(f"the checkpoint names {module}.{name}, which is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # A legacy storage id is ('storage', storage type, key, location, element count[, view metadata]).
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError("the checkpoint holds a persistent id that is not a storage")
        storage_type, key, _location, element_count = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError("a storage of an unknown type")
        return _StorageRef(str(key), storage_type.dtype, int(element_count))


def _load_restricted(stream: IO[bytes]) -> Any:
    return RestrictedUnpickler(stream).load()


def read_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a legacy PyTorch checkpoint as a numpy array (copied, C-contiguous), by name."""
    with path.open("rb") as stream:
        if _load_restricted(stream) != LEGACY_MAGIC_NUMBER:
            raise UnsafeCheckpointError(f"{path.name} is not a legacy PyTorch checkpoint (wrong magic number)")
        if _load_restricted(stream) != LEGACY_PROTOCOL_VERSION:
            raise UnsafeCheckpointError(f"{path.name} has an unknown legacy protocol version")
        system_info = _load_restricted(stream)
        if not (isinstance(system_info, dict) and system_info.get("little_endian", False)):
            raise UnsafeCheckpointError(f"{path.name} was not written on a little-endian machine")
        state = _load_restricted(stream)
        storage_keys = _load_restricted(stream)
        if not isinstance(state, dict) or not isinstance(storage_keys, list):
            raise UnsafeCheckpointError(f"{path.name} does not hold a state dictionary")
        references = {name: value for name, value in state.items() if isinstance(value, _TensorRef)}
        dtypes = {ref.storage.key: ref.storage.dtype for ref in references.values()}
        storages: dict[str, np.ndarray] = {}
        for key in storage_keys:
            (element_count,) = struct.unpack("<q", stream.read(8))
            dtype = dtypes.get(str(key), np.dtype("u1"))
            raw = stream.read(element_count * dtype.itemsize)
            if len(raw) != element_count * dtype.itemsize:
                raise UnsafeCheckpointError(f"{path.name} is truncated")
            storages[str(key)] = np.frombuffer(raw, dtype=dtype)
    return {name: _materialize(ref, storages[ref.storage.key]) for name, ref in references.items()}


def _materialize(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """The strided view the checkpoint describes, copied out of its storage (bounds checked first)."""
    if any(s < 0 for s in ref.size + ref.stride) or ref.offset < 0:
        raise UnsafeCheckpointError("a tensor has a negative size, stride or offset")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True) if n > 0)
    if ref.size and min(ref.size) > 0 and last >= len(storage):
        raise UnsafeCheckpointError("a tensor reaches past the end of its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)
