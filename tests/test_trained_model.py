"""The trained tiny qwen3moe (data/tiny-qwen3moe.gguf, built by data/train_tiny_moe.py; see data/README.md):
it loads, it is laid out as a real Qwen3-MoE file, cached ≡ uncached decoding, and the engine reproduces the
validation loss recorded at training time on the stored validation slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conftest import load_model
from workbench.session import Session

DATA = Path(__file__).resolve().parent.parent / "data"
GGUF = DATA / "tiny-qwen3moe.gguf"
VAL = DATA / "tiny-qwen3moe-val.npy"  # [8, 256] int32: the fixed validation slice (see data/README.md)
# Mean next-token cross-entropy (nats) of the workbench engine (fp32, CPU) over the 8 windows, each run alone
# from position 0: 8 × 255 predictions. Recorded by data/train_tiny_moe.py after export.
VAL_LOSS = 4.255360


def test_config_is_qwen3moe_with_decoupled_head_dim():
    model = load_model(GGUF)
    c = model.config
    assert c.arch == "qwen3moe"
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == (4, 256, 8, 2, 64)
    assert c.head_dim != c.hidden // c.n_heads
    assert (c.n_experts, c.n_experts_used, c.expert_ffn_hidden) == (16, 4, 256)
    assert c.qk_norm and c.norm_topk and c.rope_style == "neox" and not c.tied_output
    assert c.vocab_size == model.tokenizer.vocab_size == 4096
    t = model.gguf.tensors
    assert t["blk.0.ffn_gate_exps.weight"].shape == (16, 256, 256)
    assert t["blk.0.ffn_down_exps.weight"].shape == (16, 256, 256)
    assert t["blk.0.ffn_gate_inp.weight"].shape == (16, 256)
    assert t["blk.0.attn_q.weight"].shape == (512, 256) and t["blk.0.attn_k_norm.weight"].shape == (64,)


def test_cached_equals_uncached():
    model = load_model(GGUF)
    prompt = model.tokenizer.encode('"""Return the')
    runs = {}
    for path in ("cached", "uncached"):
        session = Session(model, prompt, path=path, context=len(prompt) + 16)
        logits = torch.stack([session.step().logits for _ in range(16)])
        runs[path] = session.ids[len(prompt):], logits
    assert runs["cached"][0] == runs["uncached"][0]
    cached, uncached = runs["cached"][1], runs["uncached"][1]
    assert ((cached - uncached).abs().amax(-1) <= 1e-4 * uncached.abs().amax(-1)).all()


def test_validation_loss_matches_the_recorded_value():
    model = load_model(GGUF)
    windows = np.load(VAL)
    assert windows.shape == (8, 256) and 0 <= windows.min() and windows.max() < model.config.vocab_size
    total, n = 0.0, 0
    for w in windows:
        ids = torch.tensor(w, dtype=torch.long)
        logits = model.forward(ids, 0, model.new_cache(len(ids)))
        total += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
        n += len(ids) - 1
    assert abs(total / n - VAL_LOSS) <= 1e-3, total / n
    assert f"{VAL_LOSS:.6f}" in (DATA / "README.md").read_text()  # README and test quote one number
