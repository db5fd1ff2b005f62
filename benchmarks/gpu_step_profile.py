"""Where a GPU decode step's time goes: graph replay alone, the eager static step, and its kernels.

    python benchmarks/gpu_step_profile.py FILE.gguf [--replays 100] [--top 15]

Loads FILE on CUDA, prefills 32 tokens, captures the decode step (steps.DecodeGraph) and times `replays`
back-to-back replays (no Session around them: what the GPU needs per token), then the same step eager. A
torch.profiler pass over a few eager steps lists the kernels by GPU time and counts the launches per step:
a step of a few thousand small kernels is bound by their count, not by memory bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.model import Model  # noqa: E402
from workbench.steps import DecodeGraph  # noqa: E402


def time_replays(graph: DecodeGraph, first: int, n: int) -> float:
    """Seconds per step over n back-to-back steps from position `first` (after 5 untimed ones)."""
    for i in range(5):
        graph.step(7, first + i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        graph.step(7, first + i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--replays", type=int, default=100)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this profile needs a GPU.", file=sys.stderr)
        return 2
    model = Model.load(args.file, device="cuda")
    prompt = 32
    cache = model.new_cache(prompt + args.replays + 16)
    model.forward(torch.arange(100, 100 + prompt, device="cuda"), 0, cache, last_only=True)
    graph = DecodeGraph(model, cache, prompt)
    replay = time_replays(graph, prompt, args.replays)

    token, pos = torch.tensor([7], device="cuda"), torch.tensor([prompt], device="cuda")
    for _ in range(3):
        model.forward(token, 0, cache, last_only=True, pos=pos)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_eager = 20
    for _ in range(n_eager):
        model.forward(token, 0, cache, last_only=True, pos=pos)
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / n_eager

    from torch.profiler import ProfilerActivity, profile

    steps = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.forward(token, 0, cache, last_only=True, pos=pos)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    launches = sum(e.count for e in kernels) / steps
    gpu_ms = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {model.config.n_layers} layers")
    print(f"graph replay: {replay * 1e3:.2f} ms/token ({1 / replay:.1f} tok/s); eager static step: {eager * 1e3:.2f} ms")
    print(f"kernels per step: {launches:.0f}, summed kernel time {gpu_ms:.2f} ms "
          f"({gpu_ms * 1e3 / launches:.1f} µs per kernel on average)")
    kernels.sort(key=lambda e: -e.self_device_time_total)
    print(f"\n| kernel | per step | µs per step | µs each |\n|---|---|---|---|")
    for e in kernels[: args.top]:
        print(f"| {e.key[:90]} | {e.count / steps:.0f} | {e.self_device_time_total / steps:.0f} | "
              f"{e.self_device_time_total / e.count:.1f} |")

    # The same graph with attention written out op by op (what grouped_attention did before it called
    # scaled_dot_product_attention): how much the fused kernel saves.
    import workbench.model as wm

    def unfused(q, keys, values, mask, scale):
        T, n_heads, d = q.shape
        n_kv, S = keys.shape[0], keys.shape[1]
        group = n_heads // n_kv
        qg = q.permute(1, 0, 2).reshape(n_kv, group * T, d)
        scores = (qg @ keys.transpose(1, 2)).float() * scale
        if mask is not None:
            scores = scores.view(n_kv, group, T, S).masked_fill(~mask, float("-inf")).view(n_kv, group * T, S)
        out = torch.softmax(scores, dim=-1).to(values.dtype) @ values
        return out.view(n_heads, T, d).transpose(0, 1)

    # The compiled step inside the graph (Session(compile=True) on CUDA): inductor fuses the small kernels.
    t0 = time.perf_counter()
    graph3 = DecodeGraph(model, cache, prompt, compiled=True)
    compile_s = time.perf_counter() - t0
    print(f"\ngraph replay of the torch.compile'd step: {time_replays(graph3, prompt, args.replays) * 1e3:.2f} ms/token "
          f"(compiled and captured in {compile_s:.0f} s)")
    a = graph.step(7, prompt).float()
    b = graph3.step(7, prompt).float()
    print(f"compiled vs eager graph logits: cosine {float(torch.nn.functional.cosine_similarity(a, b)):.6f}, "
          f"same argmax {bool(a.argmax() == b.argmax())}")
    del graph3

    fused = wm.grouped_attention
    wm.grouped_attention = unfused
    try:
        graph2 = DecodeGraph(model, cache, prompt)
        print(f"\ngraph replay with unfused attention: {time_replays(graph2, prompt, args.replays) * 1e3:.2f} ms/token")
    finally:
        wm.grouped_attention = fused
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
