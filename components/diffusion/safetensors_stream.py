"""safetensors read and written one tensor at a time, so a model never has to be in memory whole.

The format (docs/interchange.md): 8 bytes little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range within the data, then the data. Because the header says everything the data
will hold, a writer can put the header down first and append the tensors as they are produced; a header
value that depends on the data (ModelSpec's ``hash_sha256``) is written as a placeholder of its final
width and filled in at the end, in place.

Reading goes through ordinary file reads, not a memory map: a mapped 10 GB file shows in the reader's
resident memory as it is touched, a read one tensor long does not.

Pure: torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
HASH_PLACEHOLDER = "0x" + "0" * 64
"""The width of a ``0x``-prefixed sha256, written where the hash will go once the data is known."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its key, safetensors dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> Entry:
        return cls(key, NAMES[tensor.dtype], tuple(tensor.shape))


def read_header(path: str | Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file; the data starts at ``8 + length``."""
    with Path(path).open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return size, json.loads(fh.read(size))


def entries(path: str | Path) -> list[Entry]:
    """The tensors of a file in the order of their data."""
    _, header = read_header(path)
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    return [Entry(k, v["dtype"], tuple(v["shape"])) for k, v in items]


def iter_tensors(path: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a file in data order, each read on its own and, with ``dtype``, floating ones cast to it
    as it is read (the caller holds at most what it keeps)."""
    with Path(path).open("rb") as fh:
        yield from read_tensors(fh, dtype, str(path))


def read_tensors(fh, dtype: torch.dtype | None = None, name: str = "stream") -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_tensors`` on an open binary file with ``seek`` and ``read`` (a local file, an S3 object opened
    through pyarrow)."""
    fh.seek(0)
    (size,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(size))
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    for key, info in items:
        start, end = info["data_offsets"]
        stored, buffer = DTYPES[info["dtype"]], None
        if end > start:
            fh.seek(8 + size + start)
            buffer = bytearray(fh.read(end - start))
            if len(buffer) != end - start:
                raise ValueError(f"{name}: tensor {key!r} is cut short (the file ends inside its data)")
            tensor = torch.frombuffer(buffer, dtype=stored).reshape(info["shape"])
        else:
            tensor = torch.empty(info["shape"], dtype=stored)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield key, tensor
        tensor = buffer = None  # let go before the next read allocates its buffer


def metadata(path: str | Path) -> dict[str, str]:
    return dict(read_header(path)[1].get("__metadata__") or {})


def _header_blob(layout: list[Entry], meta: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(meta)} if meta else {}
    offset = 0
    for entry in layout:
        header[entry.key] = {"dtype": entry.dtype, "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes with spaces


def write_tensors(path: str | Path, layout: Iterable[Entry], tensors: Iterable[tuple[str, torch.Tensor]],
                  meta: Mapping[str, str] | None = None, *, hash_key: str | None = None) -> Path:
    """Write a safetensors file whose header is ``layout`` (in that order) from ``tensors``, an iterable that
    yields exactly those keys in that order, one at a time; each is written and let go before the next is asked
    for. With ``hash_key`` the metadata gets the ``0x``-prefixed sha256 of the data under that key. The file
    appears at ``path`` only when complete; a tensor that is not the one the layout expects raises."""
    path = Path(path)
    layout = list(layout)
    meta = dict(meta or {})
    if hash_key is not None:
        meta[hash_key] = HASH_PLACEHOLDER
    blob = _header_blob(layout, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            produced = iter(tensors)
            for entry in layout:
                key, tensor = next(produced, (None, None))
                if key is None:
                    raise ValueError(f"{path.name}: the tensors ended before {entry.key!r}")
                if Entry.of(key, tensor) != entry:
                    raise ValueError(f"{path.name}: expected {entry}, got {Entry.of(key, tensor)}")
                if tensor.numel():
                    data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                    digest.update(data)
                    fh.write(data)
                    del data
                del tensor
            if next(produced, None) is not None:
                raise ValueError(f"{path.name}: more tensors than the layout names")
            if hash_key is not None:
                meta[hash_key] = "0x" + digest.hexdigest()
                final = _header_blob(layout, meta)
                if len(final) != len(blob):
                    raise AssertionError("the hash changed the header's length")
                fh.seek(8)
                fh.write(final)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return path


def copy_cast(sources: list[Path], path: str | Path, dtype: torch.dtype) -> Path:
    """One file at ``path`` with every tensor of ``sources`` (a model's weight file, or its shards) in data
    order, floating ones cast to ``dtype``, the first source's metadata kept; one tensor in memory at a time."""
    layout = []
    for source in sources:
        for entry in entries(source):
            stored = DTYPES[entry.dtype]
            name = NAMES[dtype] if stored.is_floating_point else entry.dtype
            layout.append(Entry(entry.key, name, entry.shape))

    def produce():
        for source in sources:
            yield from iter_tensors(source, dtype)

    return write_tensors(path, layout, produce(), metadata(sources[0]) if sources else {})
