"""GPU decode of a model with Qwen3-30B-A3B's exact shapes: load time, host memory, tokens/s, bytes per token.

    python benchmarks/gpu_moe.py [--file F.gguf] [--layers N] [--steps 64] [--json OUT.json]

Without --file it writes the synthetic model first (`workbench make-synthetic qwen3-30b-a3b`: 48 layers, 128
experts of 768, top-8, every matrix Q4_K, ≈ 17 GB, random weights) to a temporary folder. Then, in this
process: load onto the GPU (timed; peak host RSS against the file's size), prefill a 32-token prompt, and
decode --steps greedy tokens on the cached path three ways: with the step captured as a CUDA graph (what a
Session does on CUDA by default), eager PyTorch, and the uncached path for a few steps. The graph's logits are
checked against the eager forward's on the same step.

Bytes per token counts what a decode step must read: every attention matrix, the router, the 8 chosen
experts' three matrices, the head, one embedding row, and the whole KV cache (a graph step attends over the
cache's full capacity under a mask). On GPUs without the grouped matmul (before Hopper) the chosen experts'
matrices are first gathered into one batch, which copies them once more (read and write); that traffic is
reported apart. GB/s = bytes per token / seconds per
token, next to the card's peak memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.model import Model  # noqa: E402
from workbench.session import Session  # noqa: E402

PEAK_TB_S = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H200": 4.8, "A100-SXM4-80GB": 2.04, "RTX 4090": 1.01}


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_TB_S.items() if k in name), None)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def bytes_per_token(model: Model, capacity: int) -> tuple[int, int]:
    """(bytes a decode step reads, extra bytes of the expert gather) for the dense-on-GPU weights."""
    c, kv_el = model.config, model.dtype.itemsize
    # A weight: its compute dtype dequantized; quantized (Q4_K: one 4-bit plane), half a byte plus a bf16
    # scale and zero per 32.
    el = kv_el if model.info.weights == "dequantized" else 0.5 + 4 / 32
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = (c.hidden * (q + 2 * kv) + q * c.hidden) * el  # wqkv, wo
    per_layer += 2 * c.n_kv_heads * capacity * c.head_dim * kv_el  # K and V over the whole cache
    gather = 0
    if c.is_moe:
        per_layer += c.hidden * c.n_experts * 4  # router, float32
        expert = 3 * c.expert_ffn_hidden * c.hidden * el
        per_layer += c.n_experts_used * expert
        if not model.grouped_mm and model.info.weights == "dequantized":  # the gathered copy: written, then read
            gather = c.n_layers * c.n_experts_used * expert * 2
    else:
        per_layer += 3 * c.ffn_hidden * c.hidden * el
    return int(c.n_layers * per_layer + c.vocab_size * c.hidden * el + c.hidden * kv_el), int(gather)


def decode(model: Model, prompt: list[int], steps: int, graphs: bool, path: str = "cached") -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds per token, tokens) for greedy decoding."""
    s = Session(model, prompt, path=path, context=len(prompt) + steps + 16, cuda_graphs=graphs)
    t0 = time.perf_counter()
    s.step()  # prefill (the uncached path: its first full pass)
    prefill = time.perf_counter() - t0
    s.step()  # a graph is captured here: not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        s.step()
    torch.cuda.synchronize()
    return prefill, (time.perf_counter() - t0) / steps, s.ids[len(prompt):]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, help="an existing GGUF (default: write the synthetic Qwen3-30B-A3B)")
    ap.add_argument("--layers", type=int, help="synthetic model with fewer layers (a quick check)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="move the synthetic file here instead of deleting it")
    ap.add_argument("--weights", default="auto", help="auto | dequantized | quantized (Model.load)")
    ap.add_argument("--skip-uncached", action="store_true", help="skip the uncached path and the cached-vs-uncached check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU.", file=sys.stderr)
        return 2
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.mkdtemp(prefix="gpu_moe_")
        path = Path(tmp) / "qwen3-30b-a3b-synthetic-Q4_K.gguf"
        # What `workbench make-synthetic` does, in a child process (its memory is not this one's RSS) that
        # needs only the engine's dependencies.
        code = ("import sys; from workbench.synthetic import SHAPES, write_synthetic; s = SHAPES['qwen3-30b-a3b'];"
                "n = int(sys.argv[2]); write_synthetic(s.scaled(n_layers=n) if n else s, sys.argv[1])")
        cmd = [sys.executable, "-c", code, str(path), str(args.layers or 0)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        result["write_s"] = time.perf_counter() - t0
    file_gib = path.stat().st_size / 2**30
    result["file_gib"] = file_gib

    torch.cuda.init()
    rss_before = rss_gib()
    t0 = time.perf_counter()
    model = Model.load(path, device="cuda", weights=args.weights)
    result["load_s"] = time.perf_counter() - t0
    result["peak_rss_gib"] = rss_gib()
    result["rss_before_load_gib"] = rss_before
    result["peak_rss_over_file"] = result["peak_rss_gib"] / file_gib
    result["weights"] = model.info.weights
    result["dtype"] = str(model.dtype).removeprefix("torch.")
    result["gpu_weights_gib"] = model.info.weight_bytes / 2**30
    result["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    c = model.config
    result["shape"] = dict(layers=c.n_layers, hidden=c.hidden, heads=c.n_heads, kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                           experts=c.n_experts, top_k=c.n_experts_used, expert_ffn=c.expert_ffn_hidden, vocab=c.vocab_size)
    print(f"loaded {path.name} ({file_gib:.2f} GiB) in {result['load_s']:.1f} s; peak host RSS {result['peak_rss_gib']:.2f} GiB", flush=True)

    prompt = [1000 + i for i in range(args.prompt_tokens)]
    capacity = len(prompt) + args.steps + 16
    read, gather = bytes_per_token(model, capacity)
    prefill_g, step_g, tokens_g = decode(model, prompt, args.steps, graphs=True)
    prefill_e, step_e, tokens_e = decode(model, prompt, max(8, args.steps // 4), graphs=False)
    step_u = decode(model, prompt, 4, graphs=False, path="uncached")[1] if not args.skip_uncached else float("nan")
    peak = peak_bandwidth(result["device"])
    result.update(
        prompt_tokens=len(prompt), steps=args.steps,
        prefill_s=prefill_g, prefill_tok_s=len(prompt) / prefill_g,
        graph_tok_s=1 / step_g, eager_tok_s=1 / step_e, uncached_tok_s=1 / step_u,
        graph_speedup_over_eager=step_e / step_g,
        same_tokens_graph_vs_eager=tokens_g[: len(tokens_e)] == tokens_e,
        bytes_per_token_gb=read / 1e9, gather_bytes_per_token_gb=gather / 1e9,
        achieved_gb_s=read / step_g / 1e9, achieved_with_gather_gb_s=(read + gather) / step_g / 1e9,
        card_peak_tb_s=peak,
    )
    # The graph's logits against the eager forward's on one step (same cache contents).
    result["cached_vs_uncached_max_rel"], result["cached_vs_uncached_argmax_equal"] = float("nan"), "not run"
    if not args.skip_uncached:
        s = Session(model, prompt, path="both", context=capacity)
        for _ in range(6):
            s.step()
        result["cached_vs_uncached_max_rel"] = max(e["max_abs_diff"] / e["max_abs_logit"] for e in s.records.equiv)
        equal = sum(e["argmax_equal"] for e in s.records.equiv)
        result["cached_vs_uncached_argmax_equal"] = f"{equal}/{len(s.records.equiv)}"

    rows = [
        ("device", result["device"]),
        ("file", f"{file_gib:.2f} GiB Q4_K" + (f", written in {result['write_s']:.1f} s" if "write_s" in result else "")),
        ("load (file → GPU)", f"{result['load_s']:.1f} s ({result['weights']} weights)"),
        ("peak host RSS while loading", f"{result['peak_rss_gib']:.2f} GiB = {result['peak_rss_over_file']:.2f} × the file"),
        ("weights on the GPU", f"{result['gpu_weights_gib']:.1f} GiB ({result['weights']}, {result['dtype']})"),
        ("prefill", f"{len(prompt)} tokens in {prefill_g * 1e3:.0f} ms"),
        ("decode, CUDA graph", f"{1 / step_g:.1f} tok/s ({step_g * 1e3:.2f} ms/token)"),
        ("decode, eager", f"{1 / step_e:.1f} tok/s ({step_e * 1e3:.2f} ms/token)"),
        ("decode, uncached (32+ tokens per step)", f"{1 / step_u:.1f} tok/s"),
        ("bytes read per token", f"{read / 1e9:.2f} GB" + (f" (+ {gather / 1e9:.2f} GB of expert gather)" if gather else "")),
        ("MoE decode", "quantized experts, selected on the device one by one" if model.info.weights == "quantized"
         else "grouped matmul over the expert stack" if model.grouped_mm else "gathered experts, batched matmul"),
        ("achieved bandwidth", f"{read / step_g / 1e9:.0f} GB/s"
         + (f" ({(read + gather) / step_g / 1e9:.0f} with the gather)" if gather else "")
         + (f" of {peak:.2f} TB/s peak" if peak else "")),
        ("graph tokens = eager tokens", str(result["same_tokens_graph_vs_eager"])),
        ("cached vs uncached (6 steps)", f"max rel {result['cached_vs_uncached_max_rel']:.1e}, argmax equal {result['cached_vs_uncached_argmax_equal']}"),
        ("GPU memory after load (peak allocated)", f"{result['gpu_peak_alloc_gib']:.1f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'':<{width}} | |\n|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if tmp is not None:
        if args.keep:
            os.replace(path, args.keep)
        else:
            os.remove(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
