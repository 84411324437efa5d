"""The tensor file format on its own: round trips through both readers, and malformed files refused."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
import torch

from resumable.checkpoints.tensorfile import (
    map_tensor_file,
    read_tensor_file,
    write_tensor_file,
)
from resumable.errors import CheckpointCorrupted, UnsafeCheckpoint

TENSORS = {
    "weight": torch.randn(3, 5),
    "half": torch.randn(7).to(torch.bfloat16),
    "step": torch.tensor(4.0),
    "empty": torch.empty(0, 3),
    "flags": torch.tensor([True, False]),
    "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
}


def test_both_readers_return_what_was_written_with_the_same_digest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as stream:
        _, written_digest = write_tensor_file(stream, TENSORS)
    with open(path, "rb") as stream:
        read, read_digest = read_tensor_file(stream, "t", path.stat().st_size)
    mapped, mapped_digest = map_tensor_file(str(path), "t")
    assert written_digest == read_digest == mapped_digest
    for loaded in (read, mapped):
        assert loaded.keys() == TENSORS.keys()
        for name, tensor in TENSORS.items():
            assert (
                torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
            )


def test_a_changed_byte_changes_the_digest() -> None:
    buffer = io.BytesIO()
    _, digest = write_tensor_file(buffer, TENSORS)
    data = bytearray(buffer.getvalue())
    data[-1] ^= 0xFF
    _, other = read_tensor_file(io.BytesIO(bytes(data)), "t")
    assert other != digest


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"PK\x03\x04" + b"\x00" * 40, UnsafeCheckpoint),
        (b"\x80\x04\x95" + b"\x00" * 40, UnsafeCheckpoint),
        (b"\x01\x02", CheckpointCorrupted),
        (struct.pack("<Q", 2**40) + b"{}", CheckpointCorrupted),
        (struct.pack("<Q", 8) + b"[1,2,3] ", CheckpointCorrupted),
        (
            struct.pack("<Q", 48)
            + b'{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}'[:48],
            CheckpointCorrupted,
        ),
        (
            struct.pack("<Q", 56)
            + b'{"x":{"dtype":"OBJ","shape":[1],"data_offsets":[0,4]}}  ',
            CheckpointCorrupted,
        ),
    ],
)
def test_malformed_or_foreign_files_are_refused(
    data: bytes, error: type[Exception], tmp_path: Path
) -> None:
    with pytest.raises(error):
        read_tensor_file(io.BytesIO(data), "t")
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(error):
        map_tensor_file(str(path), "t")
