"""Open and validate a GGUF file: metadata as plain Python values, a table of tensors, raw bytes on demand.

The header is parsed here with bounds checks on every read, so a damaged file ends in a `GGUFError` that says
what is wrong, and no count read from the file is trusted before it is checked against the file's size.
gguf-py supplies the format's constants (value types, GGML types and their block sizes); its `GGUFReader`
is the reference the tests compare this parser against. We do not build on `GGUFReader` itself because it
parses string arrays one numpy slice per string: 9.4 s for Gemma3's 262 144-token vocabulary on this
machine, against ~0.2 s here. Tensor bytes are never copied: `raw()` returns a view of the memory map.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from workbench.errors import GGUFError, ModelError, UnsupportedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Fixed-size scalar value types: struct format of one value.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
_NUMPY_DTYPES = {t: np.dtype(fmt) for t, fmt in _SCALAR_FORMATS.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is in PyTorch order (GGUF lists dimensions fastest-first)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


class _Cursor:
    """Sequential reads over the memory map; every read is checked against the end of the file."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos}).")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"the file ends in the middle of {what}; it is truncated or corrupt")

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8") from exc

    def value_type(self, what: str) -> GGUFValueType:
        code = self.u32(f"the type of {what}")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {code}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(vtype, what)
        if depth > 2:
            raise self.fail(f"{what} nests arrays too deeply")
        item_type = self.value_type(f"the items of {what}")
        count = self.u64(f"the length of {what}")
        if item_type in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[item_type]
            self.need(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        # Strings and nested arrays take at least 8 bytes each: refuse counts the file cannot hold.
        if count * 8 > self.size - self.pos:
            raise self.fail(f"{what} claims {count} items, more than the file can hold")
        if item_type == GGUFValueType.STRING:
            return self.strings(count, what)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """An array of `count` strings (a vocabulary: 49k–262k of them) in one tight, still checked, loop."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"the file ends in the middle of the length of {what}; it is truncated or corrupt")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                raise self.fail(f"the file ends in the middle of {what}; it is truncated or corrupt")
            append(buf[pos : pos + n])
            pos += n
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8") from exc


class GGUFFile:
    """A validated GGUF file: `metadata` (key → Python value), `tensors` (name → TensorInfo), `raw(name)`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path} does not exist.")
        if self.path.is_dir():
            raise GGUFError(f"{self.path} is a directory, not a GGUF file.")
        stat = self.path.stat()
        self.size = stat.st_size
        self._stamp = (stat.st_size, stat.st_mtime_ns)  # what the file was when it was read
        self._sha256: str | None = None
        if self.size == 0:
            raise GGUFError(f"{self.path} is empty.")
        with open(self.path, "rb") as fh:
            # ACCESS_COPY: a private mapping, so torch can wrap it without a read-only warning; nothing is written.
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._map, self.size, self.path)
        cur.need(4, "the magic number")
        if self._map[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it does not start with the bytes 'GGUF').")
        cur.pos = 4
        self.version = cur.u32("the version")
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{self.path} is GGUF version {self.version}; supported versions are "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}."
            )
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        # A metadata entry takes at least 13 bytes, a tensor entry at least 24: check before looping.
        if n_kv * 13 + n_tensors * 24 > self.size - cur.pos:
            raise GGUFError(
                f"{self.path} is not a valid GGUF file: its header claims {n_tensors} tensors and {n_kv} "
                f"metadata entries, more than a {self.size}-byte file can hold."
            )
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.value_type(f"metadata '{key}'")
            if key in self.metadata:
                raise cur.fail(f"metadata key '{key}' appears twice")
            self.metadata[key] = cur.value(vtype, f"metadata '{key}'")
            self.metadata_types[key] = vtype
        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.metadata_types.get("general.alignment", GGUFValueType.UINT32) != GGUFValueType.UINT32:
            raise GGUFError(f"{self.path}: general.alignment must be a u32, as llama.cpp requires, not {alignment!r}.")
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a power of two, not {alignment!r}.")
        data_start = -(-cur.pos // alignment) * alignment
        self.data_offset = data_start
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0  # llama.cpp (gguf.cpp): tensors lie in table order, back to back, each padded to the alignment
        for name, dims, ggml_type, rel_offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path} is not a valid GGUF file: tensor '{name}' appears twice.")
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if dims[0] % block_size:
                raise GGUFError(
                    f"{self.path}: tensor '{name}' has rows of {dims[0]} values, not a multiple of the "
                    f"{ggml_type.name} block size {block_size}."
                )
            n_bytes = int(np.prod(dims[1:], dtype=np.int64)) * (dims[0] // block_size) * type_size
            if rel_offset != expected:
                raise GGUFError(
                    f"{self.path} is not a valid GGUF file: tensor '{name}' starts at data offset {rel_offset}, not at "
                    f"{expected} where the previous tensor ends (padded to {alignment} bytes), as llama.cpp requires."
                )
            expected += -(-n_bytes // alignment) * alignment
            offset = data_start + rel_offset
            if offset + n_bytes > self.size:
                raise GGUFError(
                    f"{self.path} is truncated: tensor '{name}' needs bytes {offset}..{offset + n_bytes} "
                    f"but the file has {self.size}."
                )
            self.tensors[name] = TensorInfo(name, ggml_type, tuple(reversed(dims)), offset, n_bytes)

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.u32(f"the rank of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.u64(f"the shape of tensor '{name}'") for _ in range(n_dims))
        if any(d == 0 for d in dims) or int(np.prod(dims, dtype=np.float64)) > self.size * 16:
            raise cur.fail(f"tensor '{name}' has an impossible shape {list(dims)}")
        code = cur.u32(f"the type of tensor '{name}'")
        try:
            ggml_type = GGMLQuantizationType(code)
        except ValueError:
            raise UnsupportedError(f"{self.path}: tensor '{name}' has unknown GGML type {code}.") from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise UnsupportedError(f"{self.path}: tensor '{name}' uses GGML type {ggml_type.name}, which has no known block size.")
        return name, dims, ggml_type, cur.u64(f"the offset of tensor '{name}'")

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelError(f"{self.path} has no general.architecture string in its metadata.")
        return arch

    @property
    def n_params(self) -> int:
        """Values in all tensors together."""
        return sum(t.n_elements for t in self.tensors.values())

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor [rows, bytes per row], a view of the memory map (no copy)."""
        info = self.tensors[name]
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return raw.view(n_rows, info.n_bytes // n_rows)

    @functools.cache
    def changed_on_disk(self) -> bool:
        """Whether the file was rewritten, truncated or removed since it was opened: its bytes may then no longer
        be the ones a model was loaded from (anything that reads the file again must not trust it)."""
        try:
            stat = self.path.stat()
        except OSError:
            return True
        return (stat.st_size, stat.st_mtime_ns) != self._stamp

    def sha256(self) -> str:
        """The file's sha256 (computed once per GGUFFile: traces ask for it at every step). GGUFError if the file
        changed since it was opened: the hash would not be that of what was read."""
        if self.changed_on_disk():
            raise GGUFError(f"{self.path} changed on disk after it was opened; its hash would not describe the loaded model.")
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256
