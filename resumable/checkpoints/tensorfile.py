"""Tensor files in the safetensors layout, written and read with the SHA-256 computed alongside.

Layout: an 8-byte little-endian header length, a JSON header (`{name: {dtype, shape,
data_offsets}}`), then the raw bytes of each tensor. Files are readable by the
`safetensors` library. Nothing is unpickled: a file that is not in this layout (a
`torch.save` zip, a raw pickle) is refused before any byte of it is interpreted.

Each file's digest is `sha256-chunks`: the SHA-256 of the concatenated SHA-256 digests of
its chunks, a chunk being the header (with its length prefix) or a slice of at most 16 MiB
of one tensor. Chunks are hashed on a pool of threads over the very buffers the file is
written from or read into; `hashlib` and file I/O release the GIL, so hashing overlaps the
I/O and uses every core instead of adding a serial pass over the bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import torch

from resumable.errors import CheckpointCorrupted, UnsafeCheckpoint

HASH_ALGORITHM = "sha256-chunks/16MiB"
CHUNK_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_NAMES = {name: dtype for dtype, name in DTYPES.items()}


_HASH_POOL = ThreadPoolExecutor(
    max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="checkpoint-hash"
)


def _chunk_digest(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


class ParallelHasher:
    """The `sha256-chunks` digest of chunks handed to it in order, hashed on a thread pool.

    The caller must keep each chunk's buffer unchanged until `hexdigest` returns.
    """

    def __init__(self) -> None:
        self._digests: list[Future[bytes]] = []

    def update(self, chunk: bytes | memoryview) -> None:
        self._digests.append(_HASH_POOL.submit(_chunk_digest, memoryview(chunk)))

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(f.result() for f in self._digests)).hexdigest()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES]


def build_header(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise TypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which checkpoints do not store"
            )
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_tensor_file(
    stream: IO[bytes], tensors: dict[str, torch.Tensor]
) -> tuple[int, str]:
    """Write CPU, contiguous `tensors` to `stream`; returns (bytes written, SHA-256)."""
    hasher = ParallelHasher()
    header = build_header(tensors)
    stream.write(header)
    hasher.update(header)
    written = len(header)
    for tensor in tensors.values():
        for chunk in _chunks(_byte_view(tensor)):
            hasher.update(chunk)
            stream.write(chunk)
            written += len(chunk)
    return written, hasher.hexdigest()


def _refuse_foreign(prefix: bytes, label: str) -> None:
    if prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80":
        raise UnsafeCheckpoint(
            label,
            "a tensor file is a pickle or torch.save archive; resumable never unpickles checkpoint files, "
            "so this file is refused unread",
        )


def _parse_header(
    prefix: bytes, read_header, label: str, file_size: int | None
) -> tuple[bytes, list[tuple[str, torch.dtype, list[int], int, int]]]:
    _refuse_foreign(prefix, label)
    if len(prefix) != 8:
        raise CheckpointCorrupted(label, "the tensor file ends before its header")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_BYTES or (
        file_size is not None and header_size + 8 > file_size
    ):
        raise CheckpointCorrupted(
            label, f"the tensor file's header claims {header_size} bytes"
        )
    raw_header = read_header(header_size)
    try:
        header = json.loads(raw_header)
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointCorrupted(
            label, f"the tensor file's header is not valid JSON ({err})"
        ) from err
    entries = []
    expected_offset = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_NAMES[entry["dtype"]]
            start, end = (int(n) for n in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            if any(n < 0 for n in shape):
                raise ValueError(f"negative dimension in {shape}")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointCorrupted(
                label, f"entry {name!r} of the header is malformed ({err})"
            ) from err
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if start != expected_offset or end - start != size:
            raise CheckpointCorrupted(
                label,
                f"entry {name!r} has offsets {start}..{end}, expected {expected_offset}..",
            )
        expected_offset = end
        entries.append((name, dtype, shape, start, end))
    if file_size is not None and 8 + header_size + expected_offset != file_size:
        raise CheckpointCorrupted(
            label,
            f"the tensor file is {file_size} bytes but its header describes {8 + header_size + expected_offset}",
        )
    return prefix + raw_header, entries


def _numel(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def read_tensor_file(
    stream: IO[bytes], label: str, expected_size: int | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Read a tensor file into fresh CPU tensors; returns them and the file's digest.

    Raises:
        UnsafeCheckpoint: the file is a pickle or a `torch.save` archive.
        CheckpointCorrupted: the layout is broken (the digest is checked by the caller).
    """
    header, entries = _parse_header(stream.read(8), stream.read, label, expected_size)
    hasher = ParallelHasher()
    hasher.update(header)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, _start, _end in entries:
        tensor = torch.empty(shape, dtype=dtype)
        for chunk in _chunks(_byte_view(tensor)):
            if stream.readinto(chunk) != len(chunk):  # type: ignore[attr-defined]
                raise CheckpointCorrupted(
                    label, f"the tensor file ends inside tensor {name!r}"
                )
            hasher.update(chunk)
        tensors[name] = tensor
    if stream.read(1):
        raise CheckpointCorrupted(
            label, "the tensor file has bytes after its last tensor"
        )
    return tensors, hasher.hexdigest()


def map_tensor_file(path: str, label: str) -> tuple[dict[str, torch.Tensor], str]:
    """Like `read_tensor_file` for a local file, but the tensors are copy-on-write views of a mapping.

    Nothing is copied: the page cache backs the tensors until they are written to, and
    hashing reads the mapped pages on every core.
    """
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size < 8:
            raise CheckpointCorrupted(label, "the tensor file ends before its header")
        mapping = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapping)

    def read_header(n: int) -> bytes:
        return bytes(view[8 : 8 + n])

    header, entries = _parse_header(bytes(view[:8]), read_header, label, size)
    base = len(header)
    hasher = ParallelHasher()
    hasher.update(header)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, start, end in entries:
        data = view[base + start : base + end]
        for chunk in _chunks(data):
            hasher.update(chunk)
        if end == start:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(
                mapping, dtype=dtype, count=_numel(shape), offset=base + start
            ).reshape(shape)
    return tensors, hasher.hexdigest()
