"""Copies of GGUF files with edits, through gguf-py: the one way the tests make damaged or unusual files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

Tensor = tuple[np.ndarray, GGMLQuantizationType]  # stored array (typed for floats, [rows, bytes] uint8 otherwise), type


def copy_gguf(
    src: Path, dst: Path,
    meta: Callable[[str, Any], Any] = lambda key, value: value,
    tensor: Callable[[str, np.ndarray, GGMLQuantizationType], Tensor | None] = lambda name, data, qtype: (data, qtype),
    add: dict[str, Any] | None = None,
) -> Path:
    """Copy `src` to `dst`. meta(key, value) gives each metadata value (None drops the key; a key keeps its GGUF
    type unless a str replaces a non-string); tensor(name, data, type) gives each tensor (None drops it);
    `add` sets keys whose GGUF type follows from the value (float → f32, int → i32, list → array) or is given
    as (value, GGUFValueType). general.architecture goes through meta like any key."""
    reader = GGUFReader(src)
    add = add or {}
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=meta("general.architecture", arch))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in add:
            continue
        value = meta(key, field.contents())
        if value is None:
            continue
        vtype = field.types[0]
        if isinstance(value, str) and vtype != GGUFValueType.STRING:
            vtype = GGUFValueType.STRING
        writer.add_key_value(key, value, vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for key, value in add.items():
        value, vtype = value if isinstance(value, tuple) else (value, GGUFValueType.get_type(value))
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        edited = tensor(t.name, np.asarray(t.data), t.tensor_type)
        if edited is not None:
            writer.add_tensor(t.name, edited[0], raw_dtype=edited[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def as_f32(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A stored tensor's values, dequantized by gguf-py, as float32 (its last dim in values, not bytes)."""
    from gguf.quants import dequantize

    return dequantize(data, qtype).astype(np.float32)
