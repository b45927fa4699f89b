"""Safetensors reading without torch, validated before anything is allocated.

The header is checked against the file size (offsets inside the data region, sizes equal to
dtype x shape, no overlap) so a corrupt or hostile file is rejected with a message instead of a
multi-gigabyte allocation or a silent garbage tensor. Tensors are read lazily, one at a time.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data region). Raises SafetensorsError on any inconsistency."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is truncated ({size} bytes; no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header claims {n} bytes but the file has {size}; "
                                   "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not (isinstance(begin, int) and isinstance(end, int)):
            raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape or offsets")
        nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise SafetensorsError(f"{path}: tensor {name!r} (shape {shape}, {dtype}) claims bytes {begin}..{end} "
                                   f"but needs {nbytes} and the data region has {data_size}; the file is "
                                   "truncated or corrupt")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header, data_start


class SafetensorsFile(Mapping):
    """Lazy read-only mapping name -> np.ndarray for one .safetensors file (memory-mapped reads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.data_start = read_header(self.path)

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if end == begin:
            return np.zeros(entry["shape"], dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin, shape=(end - begin,))
        return np.array(mm.view(dtype).reshape(entry["shape"]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


class SafetensorsDir(Mapping):
    """All tensors of a Hugging Face directory: model.safetensors or shards listed in model.safetensors.index.json."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                if fname not in self.files:
                    if not (directory / fname).is_file():
                        raise SafetensorsError(f"{index}: shard {fname} is listed but missing")
                    self.files[fname] = SafetensorsFile(directory / fname)
                if name not in self.files[fname].header:
                    raise SafetensorsError(f"{index}: tensor {name!r} is listed in {fname} but not stored there")
                self.where[name] = fname
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise SafetensorsError(f"{directory}: no .safetensors files found")
            for shard in shards:
                self.files[shard.name] = SafetensorsFile(shard)
                for name in self.files[shard.name].header:
                    self.where[name] = shard.name
        self.directory = directory

    def file_of(self, name: str) -> str:
        return str(self.directory / self.where[name]) if name in self.where else str(self.directory)

    def describe(self) -> str:
        return ", ".join(str(self.directory / f) for f in self.files)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.files[self.where[name]][name]

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write one safetensors file (numpy arrays; bfloat16 supported) with the standard layout."""
    names = sorted(tensors)
    inverse = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset = {}, 0
    arrays = []
    for name in names:
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in inverse:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": inverse[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
