"""A minimal workbench-dump/1 writer in Python for an engine of your own: numpy and safetensors, nothing else.

    python write_dump.py out.safetensors      # the demo below: numbers that are a function of their position
"""

import json
import sys

import numpy as np
from safetensors.numpy import save_file


class DumpWriter:
    def __init__(self, tokens: list[int], n_prompt: int, engine: str = "") -> None:
        self.meta = {"format": "workbench-dump/1", "tokens": json.dumps([int(t) for t in tokens]), "n_prompt": str(n_prompt)}
        if engine:
            self.meta["engine"] = engine
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, step: int, capture: str, values) -> None:
        """values: rows first ([T, n_heads, head_dim], [T, hidden], …); float32/float16 values, int64 expert ids."""
        a = np.asarray(values)
        self.tensors[f"{step}/{capture}"] = np.ascontiguousarray(a.astype(np.int64 if a.dtype.kind in "iu" else a.dtype))

    def save(self, path: str) -> None:
        save_file(self.tensors, path, metadata=self.meta)


if __name__ == "__main__":
    hidden, k = 8, 2
    dump = DumpWriter([1, 5, 9, 4], n_prompt=3, engine="python demo")
    dump.add(0, "blocks.0.attn_norm", 0.25 * np.arange(3 * hidden, dtype=np.float32).reshape(3, hidden) - 1.0)
    dump.add(1, "blocks.0.resid_post", -0.5 * np.arange(hidden, dtype=np.float32)[None])
    dump.add(1, "blocks.0.moe.topk_ids", [[3, 1]])
    dump.save(sys.argv[1])
