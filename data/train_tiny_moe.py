"""Train the tiny qwen3moe model shipped as data/tiny-qwen3moe.gguf, on CPU, from the Python standard library.

    .venv/bin/python data/train_tiny_moe.py --seed 0 --steps 1100 --aux-coef 0.001   # the shipped file (~23 min)

1. Corpus (nothing downloaded): docstrings of every stdlib module parsed with `ast` (no imports), rendered
   pydoc-style; the `pydoc_data.topics` help texts; the source code of the top-level stdlib modules (Lib/*.py).
   Documents are grouped by module (topic); every 20th group is held out for validation.
2. Tokenizer: byte-level BPE trained with HF `tokenizers` on the training split, pre-tokenized with exactly
   llama.cpp's "qwen2" regex (taken from workbench.tokenizer), 4095 byte/merge tokens + <|endoftext|>.
3. Model: qwen3moe math (the same as workbench/model.py), AdamW + cosine LR, Switch load-balancing loss.
4. Export with GGUFWriter: names/order/metadata by workbench/tiny.py (tensor_plan, write_metadata); Q8_0 matrices,
   F32 norms and router. Then checks: engine logits == training-model logits (with the Q8_0-rounded
   weights), tokenizer ids == llama.cpp's, engine greedy == llama.cpp greedy, validation loss, routing stats.

Deterministic given --seed (single thread). Everything it measures is printed and written to --report (JSON).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: keep to one core as well

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from workbench.tiny import TinySpec, Vocab, tensor_plan, write_metadata  # noqa: E402
from workbench.tokenizer import PRE_BY_NAME, Tokenizer, bytes_to_unicode  # noqa: E402

T = GGMLQuantizationType
# feed_forward_length: HF intermediate_size = 4 × 256, unused (no dense layers)
SPEC = TinySpec(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, rope_base=1e6, rms_eps=1e-6, tied_output=False,
                n_experts=16, n_experts_used=4, expert_ffn=256, hidden=256, ffn=1024, vocab_size=4096, context=512)
HIDDEN, VOCAB, CONTEXT, SEQ = SPEC.hidden, SPEC.vocab_size, SPEC.context, 256
EOT = "<|endoftext|>"
PRE = "qwen2"
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "lib2to3", "ensurepip",
             "__pycache__", "unittest", "__phello__"}
VAL_EVERY = 20
VAL_SLICE = (8, SEQ)  # the recorded validation loss: 8 windows of 256 tokens, evenly spaced in the val stream


# --- corpus ------------------------------------------------------------------------------------------

def _render_docstrings(module: str, tree: ast.Module) -> str:
    """pydoc-style text of every docstring in a module: a header line (name and signature), then the text."""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if isinstance(child, ast.ClassDef):
                    bases = ", ".join(ast.unparse(b) for b in child.bases)
                    head = f"class {name}({bases})" if bases else f"class {name}"
                else:
                    head = f"{name}({ast.unparse(child.args)})"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{head}\n    " + doc.replace("\n", "\n    "))
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(tree, module + ".")
    return "\n\n".join(parts)


def build_corpus() -> list[dict]:
    """Documents [{group, kind, text}] in a fixed order: stdlib modules by path, then pydoc topics by name."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", "lib-dynload")))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / name
            rel = path.relative_to(stdlib)
            source = path.read_text(encoding="utf-8", errors="replace")
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            text = _render_docstrings(module, tree)
            if text:
                docs.append(dict(group=f"module:{module}", kind="docstrings", text=text))
            if len(rel.parts) == 1:  # top-level modules: their source code too
                docs.append(dict(group=f"module:{module}", kind="source", text=source))
    for key in sorted(pydoc_data.topics.topics):
        docs.append(dict(group=f"topic:{key}", kind="topic", text=pydoc_data.topics.topics[key]))
    groups = list(dict.fromkeys(d["group"] for d in docs))
    val_groups = set(groups[VAL_EVERY - 1 :: VAL_EVERY])
    for d in docs:
        d["split"] = "val" if d["group"] in val_groups else "train"
    return docs


# --- tokenizer ---------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str]) -> dict:
    """Byte-level BPE on `texts` → the GGUF tokenizer metadata (gpt2 model, qwen2 pre-tokenizer)."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    # The same pre-tokenizer workbench.tokenizer builds for tokenizer.ggml.pre = "qwen2" (llama.cpp's regex).
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_BY_NAME[PRE].regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]  # ids 0..255 are the bytes, then merges in rank order
    known = set(tokens)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
    tokens.append(EOT)
    assert len(tokens) == VOCAB, len(tokens)
    eot = tokens.index(EOT)
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": PRE, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(TokenType.CONTROL if t == EOT else TokenType.NORMAL) for t in tokens],
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": eot, "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.padding_token_id": eot, "tokenizer.ggml.add_bos_token": False, "_hf": hf,
    }


# --- model -------------------------------------------------------------------------------------------

def init_params(seed: int) -> dict[str, torch.Tensor]:
    """Parameters named as the GGUF tensors, in GGUF's numpy (= torch [out, in]) shapes."""
    g = torch.Generator().manual_seed(seed)
    s = SPEC
    q_dim, kv_dim, f, e = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.expert_ffn, s.n_experts
    out_std = 0.02 / math.sqrt(2 * s.n_layers)

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    p = {"token_embd.weight": normal(VOCAB, HIDDEN)}
    for i in range(s.n_layers):
        b = f"blk.{i}."
        p |= {
            b + "attn_norm.weight": torch.ones(HIDDEN), b + "attn_q.weight": normal(q_dim, HIDDEN),
            b + "attn_k.weight": normal(kv_dim, HIDDEN), b + "attn_v.weight": normal(kv_dim, HIDDEN),
            b + "attn_q_norm.weight": torch.ones(s.head_dim), b + "attn_k_norm.weight": torch.ones(s.head_dim),
            b + "attn_output.weight": normal(HIDDEN, q_dim, std=out_std), b + "ffn_norm.weight": torch.ones(HIDDEN),
            b + "ffn_gate_inp.weight": normal(e, HIDDEN), b + "ffn_gate_exps.weight": normal(e, f, HIDDEN),
            b + "ffn_up_exps.weight": normal(e, f, HIDDEN), b + "ffn_down_exps.weight": normal(e, HIDDEN, f, std=out_std),
        }
    p |= {"output_norm.weight": torch.ones(HIDDEN), "output.weight": normal(VOCAB, HIDDEN)}
    return {k: v.requires_grad_() for k, v in p.items()}


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Split-half (neox) RoPE of x [B, T, heads, d] at positions 0..T-1."""
    t, d = x.shape[1], x.shape[-1]
    inv = base ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def moe(h: torch.Tensor, p: dict, b: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [N, hidden] → (output, Switch load-balancing loss, expert ids [N, k]); softmax → top-k → renormalise."""
    s = SPEC
    probs = torch.softmax((h @ p[b + "ffn_gate_inp.weight"].T).float(), -1)
    w, ids = probs.topk(s.n_experts_used, -1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    tok = order // s.n_experts_used
    counts = torch.bincount(flat, minlength=s.n_experts)
    xs = h[tok].split(counts.tolist())
    gate, up, down = p[b + "ffn_gate_exps.weight"], p[b + "ffn_up_exps.weight"], p[b + "ffn_down_exps.weight"]
    ys = torch.cat([(F.silu(x @ gate[e].T) * (x @ up[e].T)) @ down[e].T for e, x in enumerate(xs)])
    out = torch.zeros_like(h).index_add_(0, tok, ys * w.flatten()[order, None])
    aux = s.n_experts * (counts.float() / flat.numel() * probs.mean(0)).sum()
    return out, aux, ids


def forward(p: dict, ids: torch.Tensor, route: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, vocab] and the mean load-balancing loss; the same math as workbench.model.Model.forward."""
    s, eps = SPEC, SPEC.rms_eps
    B, L = ids.shape
    x = p["token_embd.weight"][ids]
    aux = x.new_zeros(())
    for i in range(s.n_layers):
        b = f"blk.{i}."
        h = F.rms_norm(x, (HIDDEN,), p[b + "attn_norm.weight"], eps)
        q = (h @ p[b + "attn_q.weight"].T).view(B, L, s.n_heads, s.head_dim)
        k = (h @ p[b + "attn_k.weight"].T).view(B, L, s.n_kv_heads, s.head_dim)
        v = (h @ p[b + "attn_v.weight"].T).view(B, L, s.n_kv_heads, s.head_dim)
        q = rope(F.rms_norm(q, (s.head_dim,), p[b + "attn_q_norm.weight"], eps), s.rope_base)
        k = rope(F.rms_norm(k, (s.head_dim,), p[b + "attn_k_norm.weight"], eps), s.rope_base)
        # GQA: query heads h·g .. h·g+g-1 share KV head h (repeat_interleave), as llama.cpp and the engine group them.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(B, L, -1) @ p[b + "attn_output.weight"].T
        m, a_l, e_ids = moe(F.rms_norm(x, (HIDDEN,), p[b + "ffn_norm.weight"], eps).view(B * L, HIDDEN), p, b)
        if route is not None:
            route.append(e_ids)
        x = x + m.view(B, L, HIDDEN)
        aux = aux + a_l / s.n_layers
    return F.rms_norm(x, (HIDDEN,), p["output_norm.weight"], eps) @ p["output.weight"].T, aux


# --- export ------------------------------------------------------------------------------------------

def qtype_of(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    return T.F32 if len(shape) == 1 or "ffn_gate_inp" in name else T.Q8_0


def export(p: dict, tok_meta: dict, path: Path) -> None:
    """GGUFWriter, with the keys and the tensor order of workbench.tiny's qwen3moe (the convert_hf_to_gguf layout)."""
    w = GGUFWriter(path, "qwen3moe")
    vocab = Vocab(PRE, tok_meta["tokenizer.ggml.tokens"], tok_meta["tokenizer.ggml.token_type"],
                  tok_meta["tokenizer.ggml.merges"], bos_id=tok_meta["tokenizer.ggml.bos_token_id"],
                  eos_id=tok_meta["tokenizer.ggml.eos_token_id"], pad_id=tok_meta["tokenizer.ggml.padding_token_id"])
    write_metadata(w, "qwen3moe", SPEC, vocab, "tiny-qwen3moe-stdlib", LlamaFileType.MOSTLY_Q8_0)
    for name, shape, _kind, _layer in tensor_plan("qwen3moe", SPEC):
        t = p[name].detach().float().numpy()
        assert t.shape == shape, (name, t.shape, shape)
        qt = qtype_of(name, t.shape)
        w.add_tensor(name, t if qt == T.F32 else quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stored_values(p: dict) -> dict[str, torch.Tensor]:
    """The parameters as the file stores them (Q8_0 round trip of every matrix)."""
    out = {}
    for k, v in p.items():
        t = v.detach().float().numpy()
        qt = qtype_of(k, t.shape)
        out[k] = torch.from_numpy(t if qt == T.F32 else dequantize(quantize(t, qt), qt).reshape(t.shape)).float()
    return out


# --- training ----------------------------------------------------------------------------------------

def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(p: dict, windows: torch.Tensor) -> float:
    losses = []
    for chunk in windows.split(8):
        logits, _ = forward(p, chunk[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return float(sum(losses) / (windows.shape[0] * (windows.shape[1] - 1)))


def train(p: dict, train_ids: torch.Tensor, val_windows: torch.Tensor, args, log: list) -> float:
    decay = [v for k, v in p.items() if v.ndim >= 2 and "ffn_gate_inp" not in k]
    no_decay = [v for k, v in p.items() if not (v.ndim >= 2 and "ffn_gate_inp" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    run_ce = run_aux = 0.0
    n_run = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (args.batch,), generator=g)
        batch = torch.stack([train_ids[s : s + SEQ + 1] for s in starts.tolist()])
        # bf16 autocast (fp32 master weights, fp32 softmax/loss): ~1.45x the fp32 speed on this CPU (AVX512-BF16).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, aux = forward(p, batch[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        run_ce, run_aux, n_run = run_ce + ce.item(), run_aux + aux.item(), n_run + 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or (args.measure and done == args.measure):
            elapsed = time.perf_counter() - t0
            val = eval_loss(p, val_windows) if not args.measure else float("nan")
            row = dict(step=done, train=run_ce / n_run, val=val, aux=run_aux / n_run, lr=lr_at(step, args),
                       seconds=round(elapsed, 1), tokens=done * args.batch * SEQ)
            log.append(row)
            print(f"step {done:5d}  train {row['train']:.4f}  val {val:.4f}  aux {row['aux']:.4f}  "
                  f"lr {row['lr']:.2e}  {elapsed:7.1f} s  {done * args.batch * SEQ / elapsed:6.0f} tok/s", flush=True)
            run_ce = run_aux = 0.0
            n_run = 0
        if args.measure and done == args.measure:
            print(f"measure: {done / (time.perf_counter() - t0):.3f} steps/s at batch {args.batch}x{SEQ}")
            break
    return time.perf_counter() - t0


# --- checks after export ----------------------------------------------------------------------------

def engine_val_loss(model, windows: np.ndarray) -> float:
    """The recorded number: mean next-token cross-entropy (nats) of the workbench engine over the windows
    (each window run alone from position 0; predictions 1..255 of every window)."""
    total, n = 0.0, 0
    for w in windows:
        ids = torch.tensor(w, dtype=torch.long)
        logits = model.forward(ids, 0, model.new_cache(len(ids)))
        total += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
        n += len(ids) - 1
    return total / n


def routing_picks(model, windows) -> np.ndarray:
    """Expert pick counts [layers, experts] over every token of `windows`, from workbench's StepProbe."""
    from workbench.probes import StepProbe

    s = SPEC
    counts = np.zeros((s.n_layers, s.n_experts), dtype=np.int64)
    for w in windows:
        probe = StepProbe(slice(None))
        ids = torch.tensor(w, dtype=torch.long)
        model.forward(ids, 0, model.new_cache(len(ids)), probe=probe)
        for _row, layer, _rank, expert, _weight, _ent in probe.collect().routing:
            counts[layer, expert] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.001)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast in training")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--measure", type=int, default=0, help="time this many steps, print steps/s and stop")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-qwen3moe.gguf")
    ap.add_argument("--val-out", type=Path, default=ROOT / "data" / "tiny-qwen3moe-val.npy")
    ap.add_argument("--report", type=Path, default=Path("/tmp/tiny-qwen3moe-report.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "python": sys.version.split()[0],
                    "torch": torch.__version__}

    docs = build_corpus()
    tok_meta = train_tokenizer([d["text"] for d in docs if d["split"] == "train"])
    hf = tok_meta.pop("_hf")
    tokenizer = Tokenizer.from_metadata(tok_meta)
    eot = tok_meta["tokenizer.ggml.eos_token_id"]
    streams: dict[str, list[int]] = {"train": [], "val": []}
    sizes: dict = {}
    token_id = {t: i for i, t in enumerate(tok_meta["tokenizer.ggml.tokens"])}
    hf_ids = lambda text: [token_id[t] for t in hf.encode(text).tokens]  # the trained tokenizer, in our ids
    hf_mismatch = 0
    for d in docs:
        ids = tokenizer.encode(d["text"])
        hf_mismatch += ids != hf_ids(d["text"])
        streams[d["split"]] += ids + [eot]
        key = f"{d['split']}/{d['kind']}"
        z = sizes.setdefault(key, dict(docs=0, bytes=0, tokens=0))
        z["docs"] += 1
        z["bytes"] += len(d["text"].encode())
        z["tokens"] += len(ids) + 1
    report["corpus"] = sizes
    report["groups"] = {s: len({d["group"] for d in docs if d["split"] == s}) for s in ("train", "val")}
    train_ids = torch.tensor(streams["train"], dtype=torch.long)
    val_all = torch.tensor(streams["val"], dtype=torch.long)
    n_win, win = VAL_SLICE
    stride = len(val_all) // n_win
    val_slice = torch.stack([val_all[j * stride : j * stride + win] for j in range(n_win)])
    # Validation during training: 32 windows of 257 evenly over the val stream (the slice above is a subset).
    val_windows = torch.stack([val_all[j : j + SEQ + 1] for j in torch.linspace(0, len(val_all) - SEQ - 2, 32).long().tolist()])
    print(f"corpus {json.dumps(sizes)}; train {len(train_ids)} tokens, val {len(val_all)} tokens; "
          f"prep {time.perf_counter() - t_start:.1f} s", flush=True)

    p = init_params(args.seed)
    log: list = []
    train_seconds = train(p, train_ids, val_windows, args, log)
    if args.measure:
        return
    report.update(log=log, train_seconds=train_seconds)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(p, tok_meta, args.out)
    np.save(args.val_out, val_slice.numpy().astype(np.int32))

    from workbench.model import Model

    model = Model.load(args.out, device="cpu", dtype="float32")
    c = model.config
    assert (c.arch, c.n_experts, c.n_experts_used, c.head_dim) == ("qwen3moe", 16, 4, 64) and c.head_dim != c.hidden // c.n_heads
    # 1. Engine logits on the file == training-model logits with the stored (Q8_0-rounded) weights.
    stored = stored_values(p)
    seq = val_slice[0]
    with torch.no_grad():
        ours_train = forward(stored, seq[None])[0][0]
    ours_engine = model.forward(seq, 0, model.new_cache(len(seq)))
    rel = float((ours_train - ours_engine).abs().max() / ours_engine.abs().max())
    report["engine_vs_training_rel_max_diff"] = rel
    print(f"engine vs training model (stored weights): max |Δ| / max |logit| = {rel:.2e}")
    assert rel < 1e-4, rel
    # 2. The recorded validation loss (engine), the training model's on the same slice (fp32 and stored weights).
    report["val_loss_engine"] = engine_val_loss(model, val_slice.numpy())
    with torch.no_grad():
        ce = lambda q: float(F.cross_entropy(forward(q, val_slice[:, :-1])[0].flatten(0, 1), val_slice[:, 1:].flatten()))
        report["val_loss_training_fp32"], report["val_loss_training_stored"] = ce(p), ce(stored)
    report["val_loss_full_split_training_fp32"] = eval_loss(p, torch.stack(val_all[: len(val_all) // (SEQ + 1) * (SEQ + 1)].split(SEQ + 1)))
    print(f"val loss (engine, fixed slice) {report['val_loss_engine']:.6f}")
    # 3. Tokenizer: workbench == llama.cpp == the trained HF tokenizer on validation documents and odd strings.
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(args.out), n_ctx=CONTEXT, n_threads=1, logits_all=False, verbose=False)
    samples = [d["text"] for i, d in enumerate(docs) if d["split"] == "val" or i % 10 == 0] + [
        "Ünïcödé — “quotes” 数字 12345 6789\r\n\ttabs  and   spaces\n\n\n", "x=1;y=[2,3]\n    return f'{x!r}'  # ok",
        "emoji 🐍🐍 and <|endoftext|> inside", "   leading spaces", "I'm we'll they're DON'T 3.14159e-10"]
    tok_equal = tok_n = hf_equal = 0
    for text in samples:
        a = tokenizer.encode(text)
        b = llm.tokenize(text.encode(), add_bos=False, special=True)
        tok_equal += a == b
        tok_n += len(a)
        hf_equal += ("<|endoftext|>" in text) or a == hf_ids(text)  # HF's model has no special token
    report["tokenizer_check"] = dict(texts=len(samples), identical_llama_cpp=tok_equal, identical_hf=hf_equal,
                                     tokens=tok_n, hf_stream_mismatch=hf_mismatch)
    print(f"tokenizer: {tok_equal}/{len(samples)} texts identical to llama.cpp, {hf_equal} to HF ({tok_n} tokens)")
    # 4. Greedy decoding: engine (cached and uncached) vs llama.cpp, 16 steps from a few prompts.
    from workbench.reference import ReferenceEngine
    from workbench.session import Session

    agree = {}
    for prompt in ('"""Return the', "def __init__(self, ", "The with statement is used to", "import os\nimport sys\n\n"):
        ids = tokenizer.encode(prompt)
        ref = ReferenceEngine("llama.cpp", model, CONTEXT)
        ref_ids = list(ids)
        for _ in range(16):
            ref_ids.append(int(ref.logits_after(ref_ids).argmax()))
        paths = {}
        for path in ("cached", "uncached"):
            sess = Session(model, ids, path=path, context=len(ids) + 16)
            for _ in range(16):
                sess.step()
            paths[path] = sess.ids[len(ids):]
        agree[prompt] = dict(cached=paths["cached"], uncached=paths["uncached"], llama_cpp=ref_ids[len(ids):],
                             same_cached_uncached=paths["cached"] == paths["uncached"],
                             same_llama_cpp=paths["cached"] == ref_ids[len(ids):],
                             text=tokenizer.decode(paths["cached"]))
        print(f"greedy {prompt!r}: cached==uncached {paths['cached'] == paths['uncached']}, "
              f"==llama.cpp {agree[prompt]['same_llama_cpp']}: {tokenizer.decode(paths['cached'])!r}")
    report["greedy_16"] = agree
    sess = Session(model, tokenizer.encode('"""Return the'), context=64)
    list(sess.generate(40))
    report["sample_40"] = '"""Return the' + tokenizer.decode(sess.ids[len(sess.prompt_ids):])
    # 5. Routing: expert load entropy per layer over the fixed slice; most-picked experts on code vs prose.
    picks = routing_picks(model, val_slice.numpy())
    share = picks / picks.sum(1, keepdims=True)
    report["load_entropy_norm"] = [float(-(s * np.log(np.where(s > 0, s, 1))).sum() / math.log(SPEC.n_experts)) for s in share]
    report["load_share"] = share.round(4).tolist()
    samples_by_kind = {}
    for kind, kinds in (("code", ("source",)), ("prose", ("topic", "docstrings"))):
        text_ids = []
        for d in docs:
            if d["split"] == "val" and d["kind"] in kinds and len(text_ids) < 4 * SEQ:
                text_ids += tokenizer.encode(d["text"])[:SEQ]
        windows = [text_ids[j : j + SEQ] for j in range(0, 4 * SEQ, SEQ)]
        counts = routing_picks(model, windows)
        sh = counts / counts.sum(1, keepdims=True)
        samples_by_kind[kind] = dict(tokens=sum(map(len, windows)), share=sh.round(4).tolist(),
                                     top3=[[(int(e), round(float(sh[i, e]), 3)) for e in np.argsort(-sh[i])[:3]]
                                           for i in range(SPEC.n_layers)])
    report["code_vs_prose"] = samples_by_kind
    report["file_bytes"] = args.out.stat().st_size
    import hashlib

    report["sha256"] = hashlib.sha256(args.out.read_bytes()).hexdigest()
    report["val_npy_sha256"] = hashlib.sha256(args.val_out.read_bytes()).hexdigest()
    report["wall_seconds"] = time.perf_counter() - t_start
    args.report.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "greedy_16", "load_share", "code_vs_prose")},
                     indent=1, ensure_ascii=False))
    for kind, r in samples_by_kind.items():
        print(kind, r["top3"])


if __name__ == "__main__":
    main()
