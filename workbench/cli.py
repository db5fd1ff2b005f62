"""`workbench inspect|tokenize|generate|logits|trace|bench|diff|dump|compare|make-tiny|make-synthetic`: the command-line contract other tools
build on.

Exit status: 0 on success, 2 on a usage error (argparse), 1 on bad input with one line `error: …` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from workbench.config import ModelConfig
from workbench.errors import InputError, WorkbenchError
from workbench.gguf_file import GGUFFile
from workbench.loading import describe_weights, set_threads
from workbench.model import BREAKS, Model
from workbench.models import bundled_names, resolve
from workbench.reference import ENGINES
from workbench.tiny import TINY_KINDS

DUMP_ENGINES = ("workbench", *ENGINES, "transformers")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"a GGUF path or a bundled name ({', '.join(bundled_names())})")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--weights", default="auto",
                   help="auto (CPU: blocks where its kernels build, else dequantized wherever it fits in memory, "
                        "else quantized) | blocks (the file's GGUF blocks, float32 activations: exact and fast, CPU) | "
                        "dequantized (exact) | quantized (4-bit planes, bfloat16 activations: not exact)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one fewer than the cores, at least 1: stays fast when "
                        "another program shares the cores)")


def _path_arg(p: argparse.ArgumentParser, both: bool = False) -> None:
    from workbench.session import PATHS  # cached, uncached, both

    choices = PATHS if both else tuple(p for p in PATHS if p != "both")
    p.add_argument("--path", default="cached", choices=choices,
                   help="decode path (default: cached)" + ("; both: uncached teacher-forced beside cached" if both else ""))


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=32)
    _device_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--break", dest="breaks", action="append", default=[], metavar="NAME",
                   help="reproduce a bug class on purpose (repeatable): " + ", ".join(BREAKS))
    p.add_argument("--reference", choices=ENGINES,
                   help="run llama.cpp beside ours on the same tokens: on the file as it is (8-bit activations: "
                        "cosine 0.99-0.9999), or llama.cpp-f32 on an F32 copy with an F32 KV cache (exact: ≥ 0.999999 "
                        "against --weights dequantized or blocks, --dtype float32)")
    p.add_argument("--compile", action="store_true",
                   help="plain cached decode steps run torch.compile'd (CPU: ~1 min the first time, seconds after)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="GGUF decode workbench: inspect, tokenize and run GGUF models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture, config (defaulted values marked) and tensor table")
    _model_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tokenize", help="text → token ids and pieces (BOS as generate adds it)")
    _model_arg(p)
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="decode --steps tokens after --prompt")
    _model_arg(p)
    _session_args(p)
    _path_arg(p, both=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    p = sub.add_parser("trace", help="generate with probes on and write every frame to one Parquet file")
    _model_arg(p)
    _session_args(p)
    _path_arg(p, both=True)
    p.add_argument("--out", required=True, help="FILE.parquet")
    p.add_argument("--attention", action="store_true",
                   help="also the attention frame: the newest token's pattern per layer and head (a second attention per layer)")
    p.add_argument("--lens", action="store_true",
                   help="also the logit lens: every layer through the final norm and head (a vocabulary matmul per layer)")

    p = sub.add_parser("bench", help="cached vs uncached tokens/s, llama-bench style")
    _model_arg(p)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--paths", default="cached,uncached", help="comma-separated: cached,uncached")
    p.add_argument("--probes", action="store_true", help="also measure with probes on (the probe cost)")
    p.add_argument("--compile", action="store_true",
                   help="the cached path runs the torch.compile'd decode step (CPU: ~1 min the first time)")
    _device_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("diff", help="where two traces part ways, per frame")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logits", help="write float32 [n, vocab] next-token logits to a .npy file")
    _model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="comma-separated ids, used exactly as given (no BOS added)")
    src.add_argument("--prompt", help="text, tokenized as generate does")
    p.add_argument("--out", required=True)
    _path_arg(p)
    _device_args(p)

    p = sub.add_parser("dump", help="one engine's tensors at every capture point, as a workbench-dump/1 safetensors file")
    _model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=4, help="decode steps after the prompt (greedy, chosen by our engine)")
    p.add_argument("--out", required=True, help="FILE.safetensors (or .npz)")
    p.add_argument("--engine", default="workbench", choices=DUMP_ENGINES,
                   help="whose tensors: ours (default), llama.cpp (file as is), llama.cpp-f32 (F32 copy, F32 KV cache) "
                        "or transformers; every engine is fed the same tokens")
    p.add_argument("--points", action="append", default=None, metavar="PATTERN",
                   help="capture points to keep, fnmatch patterns (repeatable; default: all), e.g. 'blocks.*.resid_post'")
    p.add_argument("--break", dest="breaks", action="append", default=[], metavar="NAME",
                   help="our engine only: dump it with a bug switched on (repeatable): " + ", ".join(BREAKS))
    _device_args(p)

    p = sub.add_parser("compare", help="line a dump up with our exact engine: local and end-to-end errors per "
                                       "capture point, the first divergence, suspects")
    _model_arg(p)
    p.add_argument("dump", help="a workbench-dump/1 file (.safetensors or .npz)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="print every point, not only the diverging layer and the worst ones")
    p.add_argument("--no-suspects", action="store_true", help="skip the run per break switch that ranks suspects")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one fewer than the cores)")

    p = sub.add_parser("make-tiny", help="write a tiny random GGUF of an architecture or family (mixed quant types)")
    p.add_argument("--arch", required=True, choices=TINY_KINDS, help="an architecture, or a family: mixtral (llama with experts)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("make-synthetic", help="write a random model with the exact shapes of a real one (Q4_K; benchmarks)")
    p.add_argument("shape", help="qwen3-30b-a3b")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, help="fewer layers than the real model (the rest of its shapes kept)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def cmd_inspect(args: argparse.Namespace) -> int:
    gguf = GGUFFile(resolve(args.model))
    config = ModelConfig.from_gguf(gguf)
    tensors = [
        {"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes} for t in gguf.tensors.values()
    ]
    by_type: dict[str, int] = {}
    for t in gguf.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
    n_params = gguf.n_params
    n_bytes = sum(t.n_bytes for t in gguf.tensors.values())
    cfg = config.as_dict()
    defaulted = cfg.pop("defaulted")
    if args.json:
        print(json.dumps({
            "path": str(gguf.path), "file_bytes": gguf.size, "gguf_version": gguf.version, "arch": config.arch,
            "name": gguf.metadata.get("general.name"), "config": cfg, "defaulted": list(defaulted),
            "tensors": tensors, "totals": {"tensors": len(tensors), "params": n_params, "bytes": n_bytes, "bytes_by_type": by_type},
        }))
        return 0
    print(f"{gguf.path}  ({_human_bytes(gguf.size)}, GGUF v{gguf.version})")
    print(f"name: {gguf.metadata.get('general.name', '?')}   arch: {config.arch}")
    print("\nconfig  (* = not in the file; llama.cpp's default for this arch)")
    default_fields = {key.split(".", 1)[1] for key in defaulted}
    key_of = {"head_dim": "attention.key_length", "v_head_dim": "attention.value_length", "vocab_size": "vocab_size",
              "rope_base": "rope.freq_base", "rope_dim": "rope.dimension_count", "rope_scale": "rope.scaling.type",
              "n_kv_heads": "attention.head_count_kv", "n_experts": "expert_count", "n_experts_used": "expert_used_count",
              "expert_ffn_hidden": "expert_feed_forward_length", "swa_pattern": "attention.sliding_window_pattern",
              "rope_base_local": "rope.freq_base_swa"}
    for name, value in cfg.items():
        mark = "*" if key_of.get(name) in default_fields else " "
        print(f"  {mark} {name:<18} {value}")
    print(f"\ntensors ({len(tensors)})")
    print(f"  {'name':<32} {'type':<6} {'shape':<22} {'bytes':>12}")
    for t in tensors:
        print(f"  {t['name']:<32} {t['type']:<6} {str(t['shape']):<22} {t['bytes']:>12}")
    print(f"\ntotal: {n_params:,} parameters in {_human_bytes(n_bytes)}; by type: "
          + ", ".join(f"{k} {_human_bytes(v)}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from workbench.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_metadata(GGUFFile(resolve(args.model)).metadata)
    ids = tokenizer.encode(args.text)
    pieces = [tokenizer.piece(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        print(" ".join(f"{i}:{p!r}" for i, p in zip(ids, pieces)))
    return 0


def _load(args: argparse.Namespace) -> Model:
    set_threads(args.threads)
    return Model.load(args.model, device=args.device, dtype=args.dtype, weights=args.weights)


def _arithmetic(model: Model) -> str:
    """The line that says which numbers these are: device, weights form and activations, threads."""
    return f"{model.device}, {describe_weights(model.info.weights, model.dtype)}, {torch.get_num_threads()} threads"


def _prompt_ids(model, prompt: str) -> list[int]:
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty and this model adds no BOS token: give some text.")
    return ids


def _session(args: argparse.Namespace, probes: bool = False, **frames: bool):
    from workbench.session import Sampling, Session

    if args.steps < 1:
        raise InputError(f"--steps must be ≥ 1, not {args.steps}.")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # validate before the slow load
    unknown = [b for b in args.breaks if b not in BREAKS]
    if unknown:
        raise InputError(f"unknown --break '{unknown[0]}'; choose from: {', '.join(BREAKS)}.")
    model = _load(args)
    prompt_ids = _prompt_ids(model, args.prompt)
    context = min(model.config.context_length, len(prompt_ids) + args.steps)
    return Session(model, prompt_ids, path=args.path, sampling=sampling, context=context, probes=probes,
                   breaks=frozenset(args.breaks), reference=args.reference, compile=args.compile, **frames)


def cmd_generate(args: argparse.Namespace) -> int:
    session = _session(args)
    model, prompt_ids = session.model, session.prompt_ids
    decoder = model.tokenizer.decoder()
    text_parts: list[str] = []
    prefill_seconds = decode_seconds = 0.0
    stop = "steps"
    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    for result in session.generate(args.steps):
        if result.prefill:
            prefill_seconds = result.seconds
        else:
            decode_seconds += result.seconds
        piece = decoder.push(result.token_id)
        text_parts.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
        # The session's capacity is prompt + steps, so "context" only means something at the model's limit.
        if result.stop == "eos" or (result.stop == "context" and session.capacity == model.config.context_length):
            stop = result.stop
    tail = decoder.flush()
    text_parts.append(tail)
    n_decode = session.n_generated - (1 if args.path != "uncached" else 0)
    tps = n_decode / decode_seconds if decode_seconds > 0 else 0.0
    checks = _check_lines(session)
    if args.json:
        trace = session.trace()
        print(json.dumps({
            "model": str(args.model), "file": str(model.gguf.path), "arch": model.config.arch,
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "weights": model.info.weights,
            "arithmetic": describe_weights(model.info.weights, model.dtype), "threads": torch.get_num_threads(),
            "reference_error": session.reference_error, "path": args.path,
            "breaks": sorted(session.breaks), "prompt": args.prompt, "prompt_ids": prompt_ids,
            "ids": session.ids[len(prompt_ids):], "text": "".join(text_parts), "stop": stop,
            "load_seconds": model.info.seconds, "prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds,
            "decode_tokens_per_s": tps, "equiv": trace.equiv.to_dicts(), "reference": trace.reference.to_dicts(),
        }, ensure_ascii=False))
    else:
        sys.stdout.write(tail + "\n")
        note = {"eos": "stopped at end-of-sequence", "context": "stopped: the context is full", "steps": f"{args.steps} steps"}[stop]
        print(f"[{model.config.arch} on {_arithmetic(model)}; {args.path}"
              f"{' with ' + ', '.join(sorted(session.breaks)) if session.breaks else ''}: load {model.info.seconds:.2f} s, "
              f"prefill {len(prompt_ids)} tokens {prefill_seconds:.3f} s, decode {tps:.1f} tok/s; {note}]", file=sys.stderr)
        for line in checks:
            print(line, file=sys.stderr)
    return 0


def _check_lines(session) -> list[str]:
    """One line per live check the session ran: cached vs uncached, and the reference engine."""
    r, lines = session.records, []
    if r.equiv:
        worst = max(r.equiv, key=lambda e: e["max_abs_diff"] / max(e["max_abs_logit"], 1e-30))
        agree = sum(e["argmax_equal"] for e in r.equiv)
        lines.append(f"[cached vs uncached: max |Δlogit| {worst['max_abs_diff']:.3g} (step {worst['step']}, "
                     f"{worst['max_abs_diff'] / max(worst['max_abs_logit'], 1e-30):.1e} of max |logit|; "
                     f"allowed {session.model.equivalence_tolerance:g} with {session.model.info.weights} weights), "
                     f"argmax equal {agree}/{len(r.equiv)}]")
    if session.reference_error:
        lines.append(f"[warning: the {session.reference} reference is off: {session.reference_error}]")
    if r.reference:
        worst = min(r.reference, key=lambda e: e["cosine"])
        agree = sum(e["top1_equal"] for e in r.reference)
        lines.append(f"[vs {session.reference}: min cosine {worst['cosine']:.5f} (step {worst['step']}), "
                     f"top-1 equal {agree}/{len(r.reference)}]")
    return lines


def cmd_trace(args: argparse.Namespace) -> int:
    session = _session(args, probes=True, attention=args.attention, lens=args.lens)
    for _ in session.generate(args.steps):
        pass
    trace = session.trace({"prompt": args.prompt})
    out = trace.write(args.out)
    sizes = ", ".join(f"{name} {df.height}" for name, df in trace.frames.items())
    print(f"wrote {out}: {session.n_generated} steps, {args.path}; rows: {sizes}", file=sys.stderr)
    for line in _check_lines(session):
        print(line, file=sys.stderr)
    bad = trace.first_bad_layer()
    if bad.height:
        first = bad.row(0, named=True)
        print(f"[non-finite values: first at step {first['step']}, layer {first['first_bad_layer']} ({first['path']})]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from workbench import bench

    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    model = _load(args)
    rows = bench.run(model, args.prompt_tokens, args.steps, paths, probes=(False, True) if args.probes else (False,),
                     compile=args.compile)
    if args.json:
        print(json.dumps(bench.as_json(rows)))
    else:
        print(bench.table(model, rows))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from workbench.trace import Trace, diff

    a, b = Trace.read(args.a), Trace.read(args.b)
    results = diff(a, b, rtol=args.rtol, atol=args.atol)
    if args.json:
        print(json.dumps([{"frame": d.frame, "rows_compared": d.rows_compared, "steps_a": d.steps_a,
                           "steps_b": d.steps_b, "steps_both": d.steps_both, "first": d.first,
                           "largest": d.largest.to_dicts()} for d in results], default=str))
        return 0
    print(f"A: {a.meta.get('model_file')} ({a.meta.get('dtype')}, {a.meta.get('path')}, breaks {a.meta.get('breaks')})")
    print(f"B: {b.meta.get('model_file')} ({b.meta.get('dtype')}, {b.meta.get('path')}, breaks {b.meta.get('breaks')})")
    # tokens comes first and has a row at every step, so it speaks for the run
    uneven = next((d for d in results if not d.steps_a == d.steps_b == d.steps_both), None)
    if uneven is not None:
        print(f"A has {uneven.steps_a} steps, B has {uneven.steps_b}: compared the {uneven.steps_both} steps both have")
    print(f"tolerance: |a - b| > {args.atol:g} + {args.rtol:g}·max(|a|, |b|)\n")
    for d in results:
        if d.rows_compared == 0:
            print(f"{d.frame:<10} no rows in common")
            continue
        if d.first is None:
            print(f"{d.frame:<10} same within tolerance over {d.rows_compared} rows")
        else:
            where = ", ".join(f"{k}={v}" for k, v in d.first.items() if k not in ("column", "a", "b"))
            print(f"{d.frame:<10} first differs at {where}: {d.first['column']} {d.first['a']} vs {d.first['b']}")
        for row in d.largest.filter(pl.col("max_abs_diff") > 0).iter_rows(named=True):
            print(f"{'':<12}largest |Δ| {row['column']}: {row['max_abs_diff']:.4g} at {row['at']}")
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.tokens is not None:
        try:
            ids = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--tokens must be comma-separated integers, not '{args.tokens}'.") from None
        if not ids:
            raise InputError("--tokens is empty.")
    else:
        ids = _prompt_ids(model, args.prompt)
    model.check_token_ids(ids)  # before torch.tensor(): an id past int64 would not even convert
    if len(ids) > model.config.context_length:
        raise InputError(f"{len(ids)} tokens do not fit the model's context of {model.config.context_length}.")
    tokens = torch.tensor(ids, device=model.device)
    cache = model.new_cache(len(ids))
    if args.path == "cached":  # the first token, then one token per step through the cache
        rows = [model.forward(tokens[i : i + 1], i, cache)[0] for i in range(len(ids))]
        logits = torch.stack(rows)
    else:
        logits = model.forward(tokens, 0, cache)
    out = Path(args.out)
    np.save(out, logits.float().cpu().numpy())
    print(f"wrote {out} [{len(ids)}, {model.config.vocab_size}] float32 ({args.path})", file=sys.stderr)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from workbench.tiny import write_tiny

    path = write_tiny(args.arch, args.out, seed=args.seed)
    print(f"wrote {path} (tiny {args.arch}, seed {args.seed})", file=sys.stderr)
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from workbench.synthetic import SHAPES, write_synthetic

    if args.shape not in SHAPES:
        raise InputError(f"no synthetic shape '{args.shape}'; choose one of: {', '.join(SHAPES)}.")
    shape = SHAPES[args.shape]
    if args.layers is not None:
        if args.layers < 1:
            raise InputError("--layers must be at least 1.")
        shape = shape.scaled(n_layers=args.layers)
    t0 = time.perf_counter()
    path = write_synthetic(shape, args.out, seed=args.seed)
    print(f"wrote {path} ({args.shape}, {shape.n_layers} layers, {shape.n_params / 1e9:.2f} B params, "
          f"{path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from workbench.dump import ours
    from workbench.session import Session

    if args.steps < 0:
        raise InputError(f"--steps must be ≥ 0, not {args.steps}.")
    unknown = [b for b in args.breaks if b not in BREAKS]
    if unknown:
        raise InputError(f"unknown --break '{unknown[0]}'; choose from: {', '.join(BREAKS)}.")
    if args.breaks and args.engine != "workbench":
        raise InputError("--break switches bugs on in our engine only; drop it or use --engine workbench.")
    t0 = time.perf_counter()
    model = _load(args)
    prompt_ids = _prompt_ids(model, args.prompt)
    session = Session(model, prompt_ids, context=min(model.config.context_length, len(prompt_ids) + args.steps + 1))
    for _ in range(args.steps):
        session.step()
    tokens, n_prompt = session.ids[: len(prompt_ids) + args.steps], len(prompt_ids)
    if args.engine == "workbench":
        dump = ours(model, tokens, n_prompt, names=args.points, breaks=frozenset(args.breaks))
    elif args.engine == "transformers":
        from workbench.hf import transformers_dump

        dump = transformers_dump(model.gguf.path, tokens, n_prompt, names=args.points)
    else:
        from workbench.reference import llama_cpp_dump

        dump = llama_cpp_dump(model, tokens, n_prompt, engine=args.engine, names=args.points)
    path = dump.save(args.out)
    print(f"wrote {path}: {len(dump.tensors) + len(dump.stats)} tensors, steps 0..{dump.n_steps - 1} over "
          f"{len(tokens)} tokens ({n_prompt} prompt), {dump.engine}, {_human_bytes(path.stat().st_size)} in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _finite(value):
    """JSON has no inf or NaN: they print as null (an error that could not be measured, or a non-finite tensor)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def cmd_compare(args: argparse.Namespace) -> int:
    from workbench.compare import compare
    from workbench.dump import Dump

    dump = Dump.read(args.dump)  # a bad file fails before the model loads
    set_threads(args.threads)
    model = Model.load(args.model, device=args.device, dtype="float32", weights="dequantized")
    result = compare(model, dump, suspects=not args.no_suspects)
    if args.json:
        print(json.dumps(_finite(result.as_json())))
        return 0
    print(f"{Path(args.dump).name} ({dump.engine or 'engine not named'}) against our exact path on {model.gguf.path.name}: "
          f"{len(dump.tokens)} tokens ({dump.n_prompt} prompt), steps 0..{dump.n_steps - 1}, {len(result.points)} points")
    print("thresholds of local error: " + ", ".join(f"{k} {v:.1e}" for k, v in result.thresholds.items())
          + (", routing ids: any row" if model.config.is_moe else ""))
    fd = result.first_divergence
    if fd is None:
        print("first divergence: none — every local error is within what its kind of operation introduces here.")
    else:
        where = ", ".join(x for x in (f"layer {fd.layer}" if fd.layer is not None else "",
                                      f"head {fd.head}" if fd.head is not None else "",
                                      f"position {fd.row}" if fd.row is not None else "") if x)
        local = "n/a (statistics only)" if fd.local_error is None else f"{fd.local_error:.2e}"
        print(f"first divergence: step {fd.step}, {fd.capture} ({where}): local error {local} > {fd.threshold:.1e} "
              f"({fd.kind}); end to end {fd.end_to_end_error:.2e}")
        print("suspects: " + (", ".join(result.suspects) if result.suspects else
                               ("none of the break switches explains it" if not args.no_suspects else "not ranked (--no-suspects)")))
    table = result.table()
    if not args.all:
        if fd is not None:
            near = (pl.col("step") == fd.step) & (pl.col("layer").eq_missing(fd.layer))
            table = pl.concat([table.filter(near), table.filter(~near & pl.col("stands_out")).head(10)])
        else:
            table = table.sort("local_error", descending=True, nulls_last=True).head(10)
    table = table.select("step", "capture", "kind", "local_error", "threshold", "end_to_end_error", "cosine", "head", "row", "stands_out")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=None, fmt_str_lengths=40):
        print(table)
    return 0


COMMANDS = {"inspect": cmd_inspect, "tokenize": cmd_tokenize, "generate": cmd_generate, "logits": cmd_logits,
            "trace": cmd_trace, "bench": cmd_bench, "diff": cmd_diff, "dump": cmd_dump, "compare": cmd_compare, "make-tiny": cmd_make_tiny,
            "make-synthetic": cmd_make_synthetic}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal or pipe that cannot encode a piece gets a stand-in
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # unreadable path, full disk, …
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}.", file=sys.stderr)
    except torch.OutOfMemoryError:
        print("error: the device ran out of memory; try --dtype bfloat16, a smaller model or --device cpu.", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
