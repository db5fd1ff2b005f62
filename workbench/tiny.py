"""Tiny random GGUF models, one per supported architecture, laid out exactly like real llama.cpp files.

`write_tiny(arch, path, seed)` writes a model small enough that a forward pass takes milliseconds (hidden 256,
2–6 layers, a 512-token vocabulary) but with the metadata keys, tensor names and GGUF shapes that
`convert_hf_to_gguf.py` writes and llama.cpp's loader expects, so the same file can be run by this engine, by
llama.cpp (llama-cpp-python) and, where its GGUF loader allows, by transformers, and the outputs compared.
Names and keys come from gguf-py (`TENSOR_NAMES`, `GGUFWriter.add_*`), not from string literals here.

Sizes, per architecture (TINY_SPECS, one for every arch in config.SUPPORTED_ARCHS, then the families): every model has hidden 256,
vocabulary 512, context 512, dense FFN 512, rms eps 1e-6 and rope base 1e6 unless noted.

    arch      layers heads kv head_dim  notes
    llama        2     4    2    64     rms eps 1e-5, rope base 1e4; writes vocab_size and rope.dimension_count
    qwen2        2     4    2    64     Q/K/V biases
    qwen3        3     4    2    96     head_dim != hidden/heads (q: 256 -> 384); q/k norms; tied output
    qwen3moe     2     4    2    96     8 experts, top-2, expert FFN 128; router in F32
    gemma3       6     4    1    64     sliding window 8 (layers 0-4 local, 5 global); post norms; tied output
    qwen2moe     2     4    2    64     Q/K/V biases; 8 experts, top-2, not renormalised, expert FFN 128; a shared
                                        expert 256 wide, gated by sigmoid(x · ffn_gate_inp_shexp)
    olmoe        2     4    4    64     QK-norm over the whole projection (q and k norms of 256 values, no GQA:
                                        llama.cpp sizes them n_embd); 8 experts, top-2, not renormalised, each
                                        feed_forward_length 128 wide; rms eps 1e-5, rope base 1e4
    mixtral      2     4    2    64     a llama file with experts (TINY_FAMILIES): 8 experts, top-2, each
                                        feed_forward_length 128 wide, no expert_feed_forward_length; rope base 1e6

Weights are random and deterministic given `seed`. They are stored in a mix of GGML types (QUANT_TYPES below)
so that every type the engine dequantizes appears in at least one model; row lengths that are not a multiple
of 256 (qwen3's attn_output rows of 384, qwen3moe's ffn_down_exps rows of 128) use 32-value block types, as
llama-quantize also falls back to for such rows. gguf-py can quantize the 32-value types and BF16; it cannot
quantize K-quants, so those are built as random blocks: random quant bits and sub-block scales, with f16
super-block scales chosen so the dequantized weights have the intended standard deviation and (where the
format has minimums) zero mean in every sub-block.

The tokenizer is the same small GPT-2-style byte-level BPE for every arch: the 256 byte tokens, merges learned
deterministically from the fixed text below, and the control tokens <|endoftext|> (bos/eos), <|im_start|> and
<|im_end|>, 512 tokens in all. Real Llama-3 and Qwen files use exactly this kind of vocabulary
("gpt2" model, pre-tokenizer "llama-bpe" / "qwen2"). Real Gemma files carry a 262k-token SentencePiece
vocabulary instead; we do not imitate it, because a tokenizer is independent of the architecture in llama.cpp,
transformers and this engine, a byte-level vocabulary encodes any text with no unknown tokens, and one
vocabulary keeps tokenization identical across the five tiny models (the real Gemma-3 model covers SPM).
Its pre-tokenizer is "default" (GPT-2's split), which llama.cpp accepts for any BPE vocabulary.

The other GGUF writers of the project (synthetic.py's benchmark models, data/train_tiny_moe.py's trained model)
write their files with the same pieces: `tensor_plan` (names, shapes, order) and `write_metadata` (the keys),
for their own TinySpec and Vocab.
"""

from __future__ import annotations

import numbers
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_TENSOR,
    TENSOR_NAMES,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFReader,
    GGUFType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)
from gguf.quants import dequantize, quantize

from workbench.errors import InputError
from workbench.tokenizer import bytes_to_unicode

HIDDEN = 256
FFN = 512
VOCAB_SIZE = 512
CONTEXT_LENGTH = 512


@dataclass(frozen=True)
class MLASpec:
    """deepseek2's extras: multi-head latent attention and its router (TinySpec.head_dim is nope + rope)."""

    nope: int  # the q·k dims of a head that RoPE leaves alone
    rope: int  # qk_rope_head_dim: the rotated dims, and the one RoPE key every head shares
    v_head_dim: int
    kv_lora: int  # the latent the cache holds
    q_lora: int  # 0: plain attn_q (V2-Lite)
    split_kv_b: bool  # attn_k_b / attn_v_b and the *_mla head sizes (newer files), or one attn_kv_b (older ones)
    n_dense_lead: int
    n_shared: int  # shared experts, each expert_ffn wide
    gating: str  # "softmax" (V2) | "sigmoid" (V3)
    groups: int = 1
    groups_used: int = 1
    scale: float = 1.0  # expert_weights_scale (routed_scaling_factor)
    norm: bool = False  # expert_weights_norm
    probs_bias: bool = False  # V3's exp_probs_b


@dataclass(frozen=True)
class TinySpec:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    rms_eps: float
    tied_output: bool  # no output.weight: the head reuses token_embd
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # qwen2moe: the shared expert's width (expert_shared_feed_forward_length)
    sliding_window: int | None = None
    hidden: int = HIDDEN
    ffn: int = FFN  # feed_forward_length: the dense FFN (a MoE states its HF intermediate_size, unused)
    vocab_size: int = VOCAB_SIZE
    context: int = CONTEXT_LENGTH
    mla: MLASpec | None = None
    yarn: tuple[float, int, float] | None = None  # YaRN: (factor, original context, yarn_log_multiplier as stored)


TINY_SPECS: dict[str, TinySpec] = {
    "llama": TinySpec(2, 4, 2, 64, rope_base=10000.0, rms_eps=1e-5, tied_output=False),
    "qwen2": TinySpec(2, 4, 2, 64, rope_base=1e6, rms_eps=1e-6, tied_output=False),
    "qwen3": TinySpec(3, 4, 2, 96, rope_base=1e6, rms_eps=1e-6, tied_output=True),
    "qwen3moe": TinySpec(2, 4, 2, 96, rope_base=1e6, rms_eps=1e-6, tied_output=False,
                         n_experts=8, n_experts_used=2, expert_ffn=128),
    # 6 layers so that llama.cpp's fixed gemma3 pattern (every 6th layer global) has one global layer.
    "gemma3": TinySpec(6, 4, 1, 64, rope_base=1e6, rms_eps=1e-6, tied_output=True, sliding_window=8),
    # Qwen2-MoE: Q/K/V biases, routed experts whose top-k weights are not renormalised, and a shared expert that
    # every token also goes through, gated by sigmoid(x · ffn_gate_inp_shexp).
    "qwen2moe": TinySpec(2, 4, 2, 64, rope_base=1e6, rms_eps=1e-6, tied_output=False,
                         n_experts=8, n_experts_used=2, expert_ffn=128, shared_ffn=256),
    # OLMoE: q and k each RMS-normed over the whole projection (weights of n_heads·head_dim values, not per head);
    # routed experts, top-k weights as they are, each expert feed_forward_length wide (no expert key).
    "olmoe": TinySpec(2, 4, 4, 64, rope_base=10000.0, rms_eps=1e-5, tied_output=False,
                      n_experts=8, n_experts_used=2, expert_ffn=128, ffn=128),
    # DeepSeek-V3's layout, scaled down: q through a LoRA, the split attn_k_b / attn_v_b, a latent of 128 plus a
    # RoPE key of 32 in the cache; one leading dense layer, then 8 routed experts in 4 groups (2 used) chosen by
    # sigmoid scores + exp_probs_b, weights renormalised and × 2.5, and one shared expert; YaRN ×8 over an
    # original context of 64 with mscale_all_dim 0.707 (stored × 0.1, as convert_hf_to_gguf writes it). 8 heads:
    # hidden / heads = 32 is far from the 96-wide q·k heads, as in the real models (V3: 56 vs 192).
    "deepseek2": TinySpec(3, 8, 1, 96, rope_base=10000.0, rms_eps=1e-6, tied_output=False,
                          n_experts=8, n_experts_used=2, expert_ffn=128, ffn=256, yarn=(8.0, 64, 0.0707),
                          mla=MLASpec(nope=64, rope=32, v_head_dim=64, kv_lora=128, q_lora=96, split_kv_b=True,
                                      n_dense_lead=1, n_shared=1, gating="sigmoid", groups=4, groups_used=2,
                                      scale=2.5, norm=True, probs_bias=True)),
    # DeepSeek-V2-Lite's: plain attn_q, the older single attn_kv_b, softmax routing over all experts with the
    # weights as they are, two shared experts.
    "deepseek2-lite": TinySpec(3, 4, 4, 96, rope_base=10000.0, rms_eps=1e-6, tied_output=False,
                               n_experts=8, n_experts_used=2, expert_ffn=128, ffn=256,
                               mla=MLASpec(nope=64, rope=32, v_head_dim=64, kv_lora=128, q_lora=0, split_kv_b=False,
                                           n_dense_lead=1, n_shared=2, gating="softmax")),
    # gpt-oss's layout: Q/K/V/O biases, a sink logit per head, sliding-window (4) layers alternating with full
    # ones, 8 experts (top-2 of the logits, then a softmax over the 2) in MXFP4 with biases, the router's bias,
    # the clamped SwiGLU; YaRN ×32 over an original context of 64.
    "gpt-oss": TinySpec(4, 4, 2, 64, rope_base=150000.0, rms_eps=1e-5, tied_output=False, n_experts=8,
                        n_experts_used=2, expert_ffn=128, sliding_window=4, yarn=(32.0, 64, 0.0)),
    # Mixtral's layout: a llama file whose every FFN is routed experts (top-2 of 8); feed_forward_length is each
    # expert's width, and there is no expert_feed_forward_length key (convert_hf_to_gguf writes none for it).
    "mixtral": TinySpec(2, 4, 2, 64, rope_base=1e6, rms_eps=1e-5, tied_output=False,
                        n_experts=8, n_experts_used=2, expert_ffn=128, ffn=128),
}
# Tiny models of a family that is not an architecture of its own: family → the GGUF architecture it writes.
TINY_FAMILIES = {"mixtral": "llama", "deepseek2-lite": "deepseek2"}
TINY_KINDS = tuple(TINY_SPECS)  # what write_tiny and `make-tiny --arch` take: every arch, then the families


def tiny_arch(kind: str) -> str:
    """The GGUF architecture a tiny model of `kind` (an arch or a family) is written as."""
    return TINY_FAMILIES.get(kind, kind)

T = GGMLQuantizationType
E = MODEL_TENSOR

# GGML type of each weight; a tuple cycles over the layers (layer i uses types[i % len(types)]).
# Not listed, as in real files: norms, Q/K/V biases and the MoE router (ffn_gate_inp) are always F32.
QUANT_TYPES: dict[str, dict[MODEL_TENSOR, tuple[GGMLQuantizationType, ...]]] = {
    "llama": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        E.ATTN_Q: (T.Q4_0, T.Q2_K), E.ATTN_K: (T.Q4_1, T.Q3_K), E.ATTN_V: (T.Q5_0, T.BF16),
        E.ATTN_OUT: (T.Q5_1, T.F16),
        E.FFN_GATE: (T.Q4_K, T.Q8_0), E.FFN_UP: (T.Q5_K, T.Q4_0), E.FFN_DOWN: (T.Q6_K, T.Q3_K),
    },
    "qwen2": {
        E.TOKEN_EMBD: (T.F16,), E.OUTPUT: (T.Q8_0,),
        E.ATTN_Q: (T.Q8_0, T.Q4_K), E.ATTN_K: (T.Q5_0, T.Q5_K), E.ATTN_V: (T.Q8_0, T.Q6_K),
        E.ATTN_OUT: (T.Q4_1, T.Q2_K),
        E.FFN_GATE: (T.Q3_K, T.Q5_1), E.FFN_UP: (T.BF16, T.Q4_0), E.FFN_DOWN: (T.Q4_K, T.F16),
    },
    "qwen3": {
        E.TOKEN_EMBD: (T.Q8_0,),
        E.ATTN_Q: (T.Q6_K, T.Q5_K, T.Q8_0), E.ATTN_K: (T.Q4_K, T.Q3_K, T.Q5_1),
        E.ATTN_V: (T.Q2_K, T.Q8_0, T.BF16),
        E.ATTN_OUT: (T.Q5_0, T.Q4_1, T.Q8_0),  # rows of 384: 32-value blocks only
        E.FFN_GATE: (T.Q5_K, T.Q4_0, T.Q6_K), E.FFN_UP: (T.Q4_K, T.F16, T.Q2_K),
        E.FFN_DOWN: (T.Q6_K, T.Q5_K, T.Q3_K),
    },
    "qwen3moe": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        E.ATTN_Q: (T.Q4_K, T.Q8_0), E.ATTN_K: (T.Q5_0, T.Q6_K), E.ATTN_V: (T.Q8_0, T.Q5_1),
        E.ATTN_OUT: (T.Q4_0, T.Q8_0),  # rows of 384
        E.FFN_GATE_EXP: (T.Q4_K, T.Q2_K), E.FFN_UP_EXP: (T.Q5_K, T.Q3_K),
        E.FFN_DOWN_EXP: (T.Q8_0, T.Q5_0),  # rows of 128
    },
    "gemma3": {
        E.TOKEN_EMBD: (T.Q8_0,),
        E.ATTN_Q: (T.Q5_0, T.Q4_K, T.Q8_0), E.ATTN_K: (T.Q5_0, T.Q6_K), E.ATTN_V: (T.Q8_0, T.Q3_K, T.BF16),
        E.ATTN_OUT: (T.Q4_K, T.Q5_1, T.Q2_K),
        E.FFN_GATE: (T.Q5_0, T.Q4_1, T.Q5_K), E.FFN_UP: (T.Q5_0, T.F16), E.FFN_DOWN: (T.Q6_K, T.Q4_0),
    },
    "qwen2moe": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q5_K,),
        E.ATTN_Q: (T.Q8_0, T.Q6_K), E.ATTN_K: (T.Q4_K, T.Q5_0), E.ATTN_V: (T.Q5_1, T.Q8_0),
        E.ATTN_OUT: (T.Q3_K, T.Q4_1),
        E.FFN_GATE_EXP: (T.Q5_K, T.Q4_K), E.FFN_UP_EXP: (T.Q6_K, T.Q2_K),
        E.FFN_DOWN_EXP: (T.Q5_0, T.Q8_0),  # rows of 128
        E.FFN_GATE_SHEXP: (T.Q4_K, T.Q8_0), E.FFN_UP_SHEXP: (T.Q3_K, T.F16), E.FFN_DOWN_SHEXP: (T.Q6_K, T.Q5_K),
    },
    "olmoe": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        E.ATTN_Q: (T.Q5_K, T.Q8_0), E.ATTN_K: (T.Q4_0, T.Q6_K), E.ATTN_V: (T.Q3_K, T.F16),
        E.ATTN_OUT: (T.Q8_0, T.Q5_1),
        E.FFN_GATE_EXP: (T.Q2_K, T.Q5_K), E.FFN_UP_EXP: (T.Q4_K, T.Q6_K),
        E.FFN_DOWN_EXP: (T.Q4_1, T.Q8_0),  # rows of 128
    },
    "deepseek2": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        E.ATTN_Q_A: (T.Q4_K, T.Q6_K, T.Q8_0), E.ATTN_Q_B: (T.Q8_0, T.Q5_0, T.Q4_1),  # q_b rows of 96
        E.ATTN_KV_A_MQA: (T.Q5_K, T.Q8_0, T.Q4_K), E.ATTN_K_B: (T.Q8_0, T.F16), E.ATTN_V_B: (T.F16, T.Q8_0),
        E.ATTN_OUT: (T.Q6_K, T.Q3_K, T.Q5_1),
        E.FFN_GATE: (T.Q4_K,), E.FFN_UP: (T.Q5_K,), E.FFN_DOWN: (T.Q6_K,),  # the leading dense layer
        E.FFN_GATE_EXP: (T.Q4_K, T.Q2_K), E.FFN_UP_EXP: (T.Q5_K, T.Q3_K), E.FFN_DOWN_EXP: (T.Q8_0, T.Q5_0),
        E.FFN_GATE_SHEXP: (T.Q4_K, T.Q8_0), E.FFN_UP_SHEXP: (T.Q6_K, T.F16), E.FFN_DOWN_SHEXP: (T.Q4_0, T.Q8_0),
    },
    "deepseek2-lite": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q5_K,),
        E.ATTN_Q: (T.Q5_K, T.Q8_0, T.Q4_K), E.ATTN_KV_A_MQA: (T.Q6_K, T.Q4_K, T.Q8_0),
        E.ATTN_KV_B: (T.Q8_0, T.Q5_1, T.F16),  # rows of 128
        E.ATTN_OUT: (T.Q4_K, T.Q5_K, T.Q8_0),
        E.FFN_GATE: (T.Q5_K,), E.FFN_UP: (T.Q4_K,), E.FFN_DOWN: (T.Q8_0,),
        E.FFN_GATE_EXP: (T.Q3_K, T.Q5_K), E.FFN_UP_EXP: (T.Q4_K, T.Q6_K), E.FFN_DOWN_EXP: (T.Q5_0, T.Q4_1),
        E.FFN_GATE_SHEXP: (T.Q8_0, T.Q4_K), E.FFN_UP_SHEXP: (T.Q5_K, T.Q8_0), E.FFN_DOWN_SHEXP: (T.Q8_0, T.Q6_K),
    },
    "gpt-oss": {  # the experts in MXFP4, as OpenAI released them; the rest as a mixed llama.cpp quantization
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        # K not in Q4_K: the quantized path's bfloat16 scales and mins cost a Q4_K projection ~5 % here (issue 16;
        # qwen3's layer 0 shows it too), which the sinks' softmax turns into a 0.97 cosine of the logits
        E.ATTN_Q: (T.Q8_0, T.Q5_K), E.ATTN_K: (T.Q5_0, T.F16), E.ATTN_V: (T.Q6_K, T.Q8_0), E.ATTN_OUT: (T.Q5_0, T.Q4_K),
        E.FFN_GATE_EXP: (T.MXFP4,), E.FFN_UP_EXP: (T.MXFP4,), E.FFN_DOWN_EXP: (T.MXFP4,),
    },
    "mixtral": {
        E.TOKEN_EMBD: (T.Q8_0,), E.OUTPUT: (T.Q6_K,),
        E.ATTN_Q: (T.Q4_K, T.Q5_0), E.ATTN_K: (T.Q6_K, T.Q8_0), E.ATTN_V: (T.Q8_0, T.Q4_1),
        E.ATTN_OUT: (T.Q5_K, T.F16),
        E.FFN_GATE_EXP: (T.Q4_K, T.Q3_K), E.FFN_UP_EXP: (T.Q5_K, T.Q2_K),
        E.FFN_DOWN_EXP: (T.Q8_0, T.Q4_0),  # rows of 128
    },
}

EMBED_STD = 0.05  # token_embd and output
PROJ_STD = 0.04  # attention and FFN projections: q·x has std ~0.6 for unit-RMS x, so activations stay O(1)
BIAS_STD = 0.1
NORM_NOISE = 0.1  # norm weights are 1 + N(0, 0.1); gemma3's GGUF norms already include its +1, so the same
# Router logits get std ~8 on unit-RMS input: routing is far from uniform and near-ties between the 2nd and 3rd
# expert (which make the top-2 choice fragile under rounding) are rare (~0.2% of tokens within 0.01), while the
# second expert still gets ~11% of the top-2 weight on average.
ROUTER_STD = 0.5

# --- tokenizer -----------------------------------------------------------------------------------------

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The text the merges are learned from: English prose and Python, so common words and code idioms get tokens.
_TRAINING_TEXT = '''\
The quick brown fox jumps over the lazy dog. A small model is a model that is small, and a tiny model is
smaller still: it has a few layers, a few heads and a short vocabulary, but it is laid out like the real thing.
When the engine reads a file, it checks the header, the metadata and the table of tensors, and then it maps
the weights into memory. Each weight is stored in blocks; each block holds a scale and a few bits per value.
The attention of every layer looks at the tokens that came before, and the feed forward network mixes the
features of each token on its own. In the end the output head turns the hidden state into one logit for
every token in the vocabulary, and the sampler picks the next token from them. Then the story goes on, one
token at a time, until the model writes the end of the text or the user stops it. There is nothing more to it
than that, and yet the details matter: the order of the rows, the sign of a scale, the position of a bit.

def forward(self, tokens: list[int], start: int = 0) -> list[float]:
    """Run the model on the tokens and return the logits of the last one."""
    hidden = self.embed(tokens)
    for index, layer in enumerate(self.layers):
        hidden = layer(hidden, start=start, index=index)
    return self.head(self.norm(hidden))[-1].tolist()


class Tokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return [self.vocab[piece] for piece in self.split(text)]


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd", end="\\n")
'''

# GPT-2's pre-tokenizer, restricted to ASCII (the training text is ASCII): contractions, words with their
# leading space, numbers, punctuation runs, whitespace.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def build_vocab() -> tuple[list[str], list[str]]:
    """The tiny byte-level BPE vocabulary: (tokens, merges). Bytes first (id = byte value), control tokens last."""
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    known = set(tokens)
    words: Counter[tuple[str, ...]] = Counter(
        tuple(byte_chars[b] for b in piece.encode()) for piece in _PRETOKENIZE.findall(_TRAINING_TEXT)
    )
    merges: list[str] = []
    n_learned = VOCAB_SIZE - len(CONTROL_TOKENS)
    while len(tokens) < n_learned:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        # Most frequent pair; ties go to the smallest pair, so the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:  # two merges can spell the same string; the vocabulary lists it once
            tokens.append(merged)
            known.add(merged)
        words = Counter({_merge(word, best, merged): count for word, count in words.items()})
    return tokens + list(CONTROL_TOKENS), merges


def _merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# --- weights -------------------------------------------------------------------------------------------

K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)  # gguf-py cannot quantize these: built as random blocks

def _encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float32 values → the array GGUFWriter stores: f32/f16 as such, other types as [rows, bytes] uint8."""
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return quantize(values.astype(np.float32), qtype)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins per super-block → the 12 packed bytes."""
    return np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )


def _random_k_quant(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType, std: float) -> np.ndarray:
    """Random K-quant super-blocks whose dequantized values have mean ~0 and standard deviation ~std.

    Quant bits and (for Q3_K, Q6_K: signed) sub-block scales are random bytes. For the types with a minimum
    per sub-block (value = d·sc·q − dmin·m), m is set equal to sc and dmin = d·mean(q), which centres every
    sub-block on zero. The f16 super-block scales are then set so the whole tensor has the intended std.
    """
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == T.Q2_K:  # bytes 0-15: scale (low nibble) and min (high nibble) of 16 sub-blocks; q ∈ 0..3
        sc = rng.integers(1, 16, size=(n_blocks, 16), dtype=np.uint8)
        blocks[:, :16] = sc | (sc << 4)
        f16_fields = {80: 1.0, 82: 1.5}  # byte offset of d, dmin → value relative to d
    elif qtype in (T.Q4_K, T.Q5_K):  # q ∈ 0..15 or 0..31
        sc = rng.integers(1, 64, size=(n_blocks, 8), dtype=np.uint8)
        blocks[:, 4:16] = _pack_scale_min(sc, sc)
        f16_fields = {0: 1.0, 2: 7.5 if qtype == T.Q4_K else 15.5}
    else:  # Q3_K, Q6_K: signed scales and quants, centred as they come; d is the block's last field
        f16_fields = {type_size - 2: 1.0}

    def set_scales(d: float) -> None:
        for offset, ratio in f16_fields.items():
            blocks[:, offset : offset + 2] = np.array([d * ratio], dtype=np.float16).view(np.uint8)

    set_scales(1.0)
    set_scales(std / float(dequantize(blocks, qtype).std()))
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def _weight(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType, std: float) -> np.ndarray:
    if qtype in K_QUANTS:
        return _random_k_quant(rng, shape, qtype, std)
    return _encode(rng.normal(0.0, std, size=shape), qtype)


def tensor_plan(arch: str, spec: TinySpec) -> list[tuple[str, tuple[int, ...], MODEL_TENSOR, int | None]]:
    """(name, shape in torch order, kind, layer) of every tensor, in llama.cpp's order within a layer."""
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    hidden, ffn, vocab = spec.hidden, spec.ffn, spec.vocab_size
    plan: list[tuple[str, tuple[int, ...], MODEL_TENSOR, int | None]] = [
        (TENSOR_NAMES[E.TOKEN_EMBD] + ".weight", (vocab, hidden), E.TOKEN_EMBD, None)
    ]
    for i in range(spec.n_layers):
        if spec.mla is not None or arch == "gpt-oss":
            own = _mla_layer(spec, i) if spec.mla is not None else _gpt_oss_layer(spec)
            plan += [(f"{TENSOR_NAMES[kind].format(bid=i)}.{suffix}", shape, kind, i) for kind, suffix, shape in own]
            continue
        layer: list[tuple[MODEL_TENSOR, str, tuple[int, ...]]] = [
            (E.ATTN_NORM, "weight", (hidden,)),
            (E.ATTN_Q, "weight", (q_dim, hidden)),
            (E.ATTN_K, "weight", (kv_dim, hidden)),
            (E.ATTN_V, "weight", (kv_dim, hidden)),
        ]
        if arch in ("qwen2", "qwen2moe"):
            layer += [(E.ATTN_Q, "bias", (q_dim,)), (E.ATTN_K, "bias", (kv_dim,)), (E.ATTN_V, "bias", (kv_dim,))]
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            layer += [(E.ATTN_Q_NORM, "weight", (spec.head_dim,)), (E.ATTN_K_NORM, "weight", (spec.head_dim,))]
        if arch == "olmoe":  # over the whole projection
            layer += [(E.ATTN_Q_NORM, "weight", (q_dim,)), (E.ATTN_K_NORM, "weight", (kv_dim,))]
        layer.append((E.ATTN_OUT, "weight", (hidden, q_dim)))
        if arch == "gemma3":
            layer += [(E.ATTN_POST_NORM, "weight", (hidden,)), (E.FFN_PRE_NORM, "weight", (hidden,))]
        else:
            layer.append((E.FFN_NORM, "weight", (hidden,)))
        if spec.n_experts:
            n, f = spec.n_experts, spec.expert_ffn
            layer += [
                (E.FFN_GATE_INP, "weight", (n, hidden)),
                (E.FFN_GATE_EXP, "weight", (n, f, hidden)),
                (E.FFN_UP_EXP, "weight", (n, f, hidden)),
                (E.FFN_DOWN_EXP, "weight", (n, hidden, f)),
            ]
            if spec.shared_ffn:
                sf = spec.shared_ffn
                layer += [(E.FFN_GATE_INP_SHEXP, "weight", (hidden,)), (E.FFN_GATE_SHEXP, "weight", (sf, hidden)),
                          (E.FFN_UP_SHEXP, "weight", (sf, hidden)), (E.FFN_DOWN_SHEXP, "weight", (hidden, sf))]
        else:
            layer += [(E.FFN_GATE, "weight", (ffn, hidden)), (E.FFN_UP, "weight", (ffn, hidden)), (E.FFN_DOWN, "weight", (hidden, ffn))]
        if arch == "gemma3":
            layer.append((E.FFN_POST_NORM, "weight", (hidden,)))
        plan += [(f"{TENSOR_NAMES[kind].format(bid=i)}.{suffix}", shape, kind, i) for kind, suffix, shape in layer]
    plan.append((TENSOR_NAMES[E.OUTPUT_NORM] + ".weight", (hidden,), E.OUTPUT_NORM, None))
    if not spec.tied_output:
        plan.append((TENSOR_NAMES[E.OUTPUT] + ".weight", (vocab, hidden), E.OUTPUT, None))
    return plan


def _mla_layer(spec: TinySpec, i: int) -> list[tuple[MODEL_TENSOR, str, tuple[int, ...]]]:
    """A deepseek2 block's tensors (kind, suffix, torch shape), as convert_hf_to_gguf names and shapes them."""
    m, H, hidden = spec.mla, spec.n_heads, spec.hidden
    dk = m.nope + m.rope
    layer: list[tuple[MODEL_TENSOR, str, tuple[int, ...]]] = [(E.ATTN_NORM, "weight", (hidden,))]
    if m.q_lora:
        layer += [(E.ATTN_Q_A, "weight", (m.q_lora, hidden)), (E.ATTN_Q_A_NORM, "weight", (m.q_lora,)),
                  (E.ATTN_Q_B, "weight", (H * dk, m.q_lora))]
    else:
        layer.append((E.ATTN_Q, "weight", (H * dk, hidden)))
    layer += [(E.ATTN_KV_A_MQA, "weight", (m.kv_lora + m.rope, hidden)), (E.ATTN_KV_A_NORM, "weight", (m.kv_lora,))]
    if m.split_kv_b:
        layer += [(E.ATTN_K_B, "weight", (H, m.kv_lora, m.nope)), (E.ATTN_V_B, "weight", (H, m.v_head_dim, m.kv_lora))]
    else:
        layer.append((E.ATTN_KV_B, "weight", (H * (m.nope + m.v_head_dim), m.kv_lora)))
    layer += [(E.ATTN_OUT, "weight", (hidden, H * m.v_head_dim)), (E.FFN_NORM, "weight", (hidden,))]
    if i < m.n_dense_lead:
        f = spec.ffn
        return layer + [(E.FFN_GATE, "weight", (f, hidden)), (E.FFN_UP, "weight", (f, hidden)), (E.FFN_DOWN, "weight", (hidden, f))]
    n, f, sf = spec.n_experts, spec.expert_ffn, spec.expert_ffn * m.n_shared
    layer.append((E.FFN_GATE_INP, "weight", (n, hidden)))
    if m.probs_bias:
        layer.append((E.FFN_EXP_PROBS_B, "bias", (n,)))
    layer += [(E.FFN_GATE_EXP, "weight", (n, f, hidden)), (E.FFN_UP_EXP, "weight", (n, f, hidden)),
              (E.FFN_DOWN_EXP, "weight", (n, hidden, f))]
    if m.n_shared:
        layer += [(E.FFN_GATE_SHEXP, "weight", (sf, hidden)), (E.FFN_UP_SHEXP, "weight", (sf, hidden)),
                  (E.FFN_DOWN_SHEXP, "weight", (hidden, sf))]
    return layer


def _gpt_oss_layer(spec: TinySpec) -> list[tuple[MODEL_TENSOR, str, tuple[int, ...]]]:
    """A gpt-oss block's tensors (kind, suffix, torch shape), as convert_hf_to_gguf names and shapes them: the norm
    before the experts is post_attention_norm, every projection and expert has a bias, each head a sink."""
    q_dim, kv_dim, hidden = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.hidden
    n, f = spec.n_experts, spec.expert_ffn
    return [
        (E.ATTN_NORM, "weight", (hidden,)),
        (E.ATTN_Q, "weight", (q_dim, hidden)), (E.ATTN_Q, "bias", (q_dim,)),
        (E.ATTN_K, "weight", (kv_dim, hidden)), (E.ATTN_K, "bias", (kv_dim,)),
        (E.ATTN_V, "weight", (kv_dim, hidden)), (E.ATTN_V, "bias", (kv_dim,)),
        (E.ATTN_OUT, "weight", (hidden, q_dim)), (E.ATTN_OUT, "bias", (hidden,)),
        (E.ATTN_SINKS, "weight", (spec.n_heads,)),
        (E.ATTN_POST_NORM, "weight", (hidden,)),
        (E.FFN_GATE_INP, "weight", (n, hidden)), (E.FFN_GATE_INP, "bias", (n,)),
        (E.FFN_GATE_EXP, "weight", (n, f, hidden)), (E.FFN_GATE_EXP, "bias", (n, f)),
        (E.FFN_UP_EXP, "weight", (n, f, hidden)), (E.FFN_UP_EXP, "bias", (n, f)),
        (E.FFN_DOWN_EXP, "weight", (n, hidden, f)), (E.FFN_DOWN_EXP, "bias", (n, hidden)),
    ]


def _data(
    rng: np.random.Generator, arch: str, name: str, shape: tuple[int, ...], kind: MODEL_TENSOR, layer: int | None
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's stored array and GGML type."""
    if name.endswith(".bias"):  # Q/K/V biases; deepseek2's exp_probs_b (of the order of its sigmoid scores' spread)
        return rng.normal(0.0, BIAS_STD, size=shape).astype(np.float32), T.F32
    if kind == E.ATTN_SINKS:  # logits of the order of q·k's: the sinks take a visible share of each softmax
        return rng.normal(0.0, 1.0, size=shape).astype(np.float32), T.F32
    if kind == E.FFN_GATE_INP_SHEXP:  # the shared expert's gate vector: x·g with std ~1.6, sigmoid well spread
        return rng.normal(0.0, 0.1, size=shape).astype(np.float32), T.F32
    if len(shape) == 1:  # every other 1-D weight is a norm
        return (1.0 + rng.normal(0.0, NORM_NOISE, size=shape)).astype(np.float32), T.F32
    if kind == E.FFN_GATE_INP:  # sigmoid scores (deepseek2 V3) saturate at logits of std 8: std ~1.6 there
        std = ROUTER_STD / 5 if TINY_SPECS[arch].mla is not None and TINY_SPECS[arch].mla.gating == "sigmoid" else ROUTER_STD
        return rng.normal(0.0, std, size=shape).astype(np.float32), T.F32
    types = QUANT_TYPES[arch][kind]
    qtype = types[0] if layer is None else types[layer % len(types)]
    return _weight(rng, shape, qtype, EMBED_STD if kind in (E.TOKEN_EMBD, E.OUTPUT) else PROJ_STD), qtype


# --- the file ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") as a GGUF file states it."""

    pre: str  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer name
    tokens: list[str]
    token_types: list[int]  # TokenType per token
    merges: list[str]  # "a b", in rank order
    bos_id: int
    eos_id: int
    pad_id: int | None = None
    chat_template: str | None = None


def tiny_vocab(pre: str, size: int = VOCAB_SIZE) -> Vocab:
    """build_vocab's tokens as a Vocab with `pre`; <|endoftext|> is bos, eos and pad. A `size` over the 512
    learned and control tokens pads the list with unused tokens (real models' vocabularies have such rows)."""
    tokens, merges = build_vocab()
    if size < len(tokens):
        raise InputError(f"a vocabulary of {size} is smaller than the {len(tokens)} tokens of the byte-level BPE.")
    tokens = tokens + [f"<unused{i}>" for i in range(size - len(tokens))]
    eos = tokens.index("<|endoftext|>")
    types = [TokenType.CONTROL if t in CONTROL_TOKENS else TokenType.NORMAL for t in tokens]
    return Vocab(pre, tokens, types, merges, bos_id=eos, eos_id=eos, pad_id=eos, chat_template=CHAT_TEMPLATE)


def write_metadata(w: GGUFWriter, arch: str, spec: TinySpec, vocab: Vocab, name: str, file_type: LlamaFileType) -> None:
    """The keys convert_hf_to_gguf.py writes for this arch (and only those: a key real files lack stays out)."""
    w.add_type(GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    if arch == "llama":  # LlamaModel writes these; llama files state no key_length (head_dim = hidden / heads)
        w.add_vocab_size(spec.vocab_size)
        w.add_rope_dimension_count(spec.head_dim)
    if arch in ("qwen3", "qwen3moe", "gemma3", "gpt-oss"):  # their HF configs have head_dim
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.n_experts:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
        if arch in ("qwen3moe", "qwen2moe", "gpt-oss"):  # a llama MoE (Mixtral) states its experts' width as feed_forward_length
            w.add_expert_feed_forward_length(spec.expert_ffn)
        if spec.shared_ffn:
            w.add_expert_shared_feed_forward_length(spec.shared_ffn)
    if spec.mla is not None:
        _mla_metadata(w, spec)
    if spec.yarn is not None:
        factor, original, log_mul = spec.yarn
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(original)
        if log_mul:  # deepseek2's converter writes one; gpt-oss's does not
            w.add_rope_scaling_yarn_log_mul(log_mul)
    if spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    w.add_file_type(file_type)
    w.add_quantization_version(GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(False)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def _mla_metadata(w: GGUFWriter, spec: TinySpec) -> None:
    """deepseek2's keys as convert_hf_to_gguf writes them: with the split attn_k_b / attn_v_b, key_length and
    value_length are the latent row (MQA over the latent, head_count_kv 1 in the spec) and the *_mla keys the
    decompressed heads; an older file states the decompressed heads as key_length / value_length."""
    m = spec.mla
    w.add_vocab_size(spec.vocab_size)
    w.add_leading_dense_block_count(m.n_dense_lead)
    w.add_q_lora_rank(m.q_lora)  # llama.cpp reads it on every layout but V2-Lite's layer counts: 0 = plain attn_q
    w.add_kv_lora_rank(m.kv_lora)
    if m.split_kv_b:
        w.add_key_length(m.kv_lora + m.rope)
        w.add_value_length(m.kv_lora)
        w.add_key_length_mla(m.nope + m.rope)
        w.add_value_length_mla(m.v_head_dim)
    else:
        w.add_key_length(m.nope + m.rope)
        w.add_value_length(m.v_head_dim)
    w.add_rope_dimension_count(m.rope)
    w.add_expert_feed_forward_length(spec.expert_ffn)
    w.add_expert_shared_count(m.n_shared)
    w.add_expert_weights_scale(m.scale)
    w.add_expert_weights_norm(m.norm)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if m.gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    if m.groups > 1:
        w.add_expert_group_count(m.groups)
        w.add_expert_group_used_count(m.groups_used)


def write_tiny(kind: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random model of `kind` (an arch, or a family of TINY_FAMILIES such as "mixtral") to `path`
    (same seed → byte-identical file) and return the path."""
    if kind not in TINY_SPECS:
        raise InputError(f"no tiny model for architecture '{kind}'; choose one of: {', '.join(TINY_KINDS)}.")
    # numpy refuses negative seeds with a ValueError; the bound keeps seeds the uint64 that torch's generators take.
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InputError(f"the seed must be an integer from 0 to 2**64 - 1, not {seed!r}.")
    spec, arch = TINY_SPECS[kind], tiny_arch(kind)
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch)
    pre = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "qwen3moe": "qwen2", "qwen2moe": "qwen2",
           "olmoe": "olmo"}.get(arch, "default")
    # A mix of types, like llama-quantize's own mixed recipes, which label the file Q4_K_M.
    write_metadata(writer, arch, spec, tiny_vocab(pre), f"tiny-{kind}", LlamaFileType.MOSTLY_Q4_K_M)
    for name, shape, tensor_kind, layer in tensor_plan(arch, spec):
        # Quantized data is [rows, bytes per row] uint8; GGUFWriter derives the element shape from raw_dtype.
        data, qtype = _data(rng, kind, name, shape, tensor_kind, layer)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- copies with edits -------------------------------------------------------------------------------------

# One way to copy a GGUF with edits: the exact reference's F32 copies (reference.f32_copy) and the tests'
# damaged or unusual files.
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
