"""Reading a DCP checkpoint's `.metadata` without running code from it.

torch.distributed.checkpoint stores its metadata as a pickle and reads it with `pickle.load`, so a
crafted `.metadata` runs whatever it names. `SafeReader` reads it through an unpickler that builds only
the classes DCP's metadata holds for tensors (the metadata dataclasses, torch dtypes and sizes, paths)
and refuses anything else by name. `BytesStorageMetadata` is refused too: it would make DCP
`torch.load` the entry with `weights_only=False`, and this project never saves non-tensor entries.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name (torch.strided)
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("pathlib._local", "WindowsPath"),
}


class UnsafeCheckpoint(ValueError):
    """A checkpoint's metadata names something DCP metadata never holds."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in ALLOWED or dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(
            f"its .metadata refers to {module}.{name}, which DCP metadata for tensors never "
            "holds: refusing to unpickle it"
        )


def load_metadata(file: str | os.PathLike) -> Metadata:
    """The `Metadata` in a checkpoint's `.metadata` file, through the restricted unpickler.

    Raises:
        UnsafeCheckpoint: the pickle names a class or function outside `ALLOWED`, or is not a Metadata.
    """
    with open(file, "rb") as f:
        metadata = _Unpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"its .metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `read_metadata` through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        file = self._get_metadata_path(rank) if hasattr(self, "_get_metadata_path") else Path(self.path) / ".metadata"
        metadata = load_metadata(file)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata
