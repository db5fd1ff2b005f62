"""llama.cpp beside our engine: the same GGUF, the same tokens, its logits per step (optional dependency).

llama.cpp is the reference implementation of GGUF. Feeding it exactly the tokens our forward saw lets a user
see at which step the two engines part ways. Its CPU matmuls quantize activations to 8 bits, so cosines of
0.99-0.9999 are normal on real models; what matters is where they fall and whether top-1 agrees.
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.errors import InputError

ENGINES = ("llama.cpp",)


class ReferenceEngine:
    def __init__(self, engine: str, model, capacity: int) -> None:
        if engine not in ENGINES:
            raise InputError(f"unknown reference engine '{engine}'; available: {', '.join(ENGINES)}.")
        try:
            import llama_cpp
        except ImportError:
            raise InputError(
                "the llama.cpp reference needs llama-cpp-python: pip install llama-cpp-python "
                "(or the project's 'reference' extra)."
            ) from None
        self._llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model.gguf.path), n_ctx=capacity, n_threads=torch.get_num_threads(),
                                   logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.fed: list[int] = []

    def logits_after(self, ids: list[int]) -> torch.Tensor:
        """llama.cpp's next-token logits [vocab] after `ids`, evaluating only what it has not seen."""
        common = 0
        while common < min(len(ids), len(self.fed)) and ids[common] == self.fed[common]:
            common += 1
        if common == len(ids):  # nothing new: re-run the last token to get its logits again
            common -= 1
        self.llm.n_tokens = common  # eval() drops llama.cpp's cache past n_tokens
        self.llm.eval(ids[common:])
        self.fed = list(ids)
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
