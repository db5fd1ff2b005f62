"""workbench/lessons.py's walkthrough helpers, each held to an independent computation or an invariant: QK-norm
across positions, expert usage and specialisation (with a random-router control), the RoPE facts, and the
families' own lessons (a shared expert, whole-row QK-norm, MLA's cache and absorbed attention, V3's routing,
gpt-oss's attention sinks and sliding windows) against the files' tensors as gguf-py dequantizes them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import load_model

from workbench import lessons

GGUF = Path(__file__).resolve().parent.parent / "data" / "tiny-qwen3moe.gguf"  # the bundled trained model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while these tests run, as the notebook sets: on the tiny model a second thread costs more in
    synchronisation than it saves, and on a busy 2-core machine it made each forward ~50× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    if not GGUF.exists():
        pytest.skip(f"{GGUF} is absent")
    return load_model(GGUF)


@pytest.fixture(scope="module")
def prompts(model) -> dict[str, list[list[int]]]:
    tok = model.tokenizer
    return {"code": [tok.encode(t) for t in lessons.CODE_PROMPTS], "prose": [tok.encode(t) for t in lessons.PROSE_PROMPTS]}


def _captured(model, ids: list[int], points: tuple[str, ...], breaks: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The tensors at the given capture points (name suffixes) of one uncached forward, copied."""
    seen: dict[str, torch.Tensor] = {}

    def probe(name: str, x: torch.Tensor) -> None:
        if name.endswith(points):
            seen[name] = x.detach().clone()

    model.forward(torch.tensor(ids), 0, model.new_cache(len(ids)), probe, breaks=breaks)
    return seen


# ---- QK-norm across positions -----------------------------------------------------------------------------

def test_default_prompts_are_short(prompts):
    for many in prompts.values():
        assert 2 <= len(many) <= 3
        assert all(40 <= len(ids) <= 80 for ids in many)


def test_post_norm_rms_is_the_weight_times_the_unit_vector(model, prompts):
    """Recompute post from pre with torch (x / rms(x) × weight, in float64) and compare per layer, head, position."""
    ids = prompts["prose"][0]
    frame = lessons.qk_norm_across_positions(model, ids)
    c = model.config
    assert frame.height == c.n_layers * (c.n_heads + c.n_kv_heads) * 2 * len(ids)
    pre = _captured(model, ids, (".attn.q", ".attn.k"))
    rows = []
    for i, layer in enumerate(model.weights.layers):
        for tensor, weight in (("q", layer.q_norm), ("k", layer.k_norm)):
            x = pre[f"blocks.{i}.attn.{tensor}"].double()  # [T, heads, head_dim]
            unit = x / (x.pow(2).mean(-1, keepdim=True) + c.rms_eps).sqrt()
            for stage, t in (("pre", x), ("post", unit * weight.double())):
                rms = t.pow(2).mean(-1).sqrt()  # [T, heads]
                rows += [{"layer": i, "head": h, "tensor": tensor, "stage": stage, "position": p, "expected": float(rms[p, h])}
                         for p in range(rms.shape[0]) for h in range(rms.shape[1])]
    joined = frame.join(pl.DataFrame(rows), on=["layer", "head", "tensor", "stage", "position"], how="full")
    assert joined.height == frame.height and joined["rms"].null_count() == 0 and joined["expected"].null_count() == 0
    assert float(((joined["rms"] - joined["expected"]).abs() / joined["expected"]).max()) < 1e-5


def test_the_norm_narrows_the_spread(model, prompts):
    frame = lessons.qk_norm_across_positions(model, prompts["code"][0])
    spread = lessons.qk_norm_spread(frame)
    assert spread.columns == ["tensor", "stage", "min", "max", "spread"]
    assert spread.select("tensor", "stage").rows() == [("q", "pre"), ("q", "post"), ("k", "pre"), ("k", "post")]
    for tensor in ("q", "k"):
        part = frame.filter(pl.col("tensor") == tensor)
        by_stage = {r["stage"]: r for r in spread.filter(pl.col("tensor") == tensor).iter_rows(named=True)}
        for stage, r in by_stage.items():
            rms = part.filter(pl.col("stage") == stage)["rms"]
            assert (r["min"], r["max"]) == (rms.min(), rms.max())
            assert r["spread"] == pytest.approx(r["max"] / r["min"])
        assert by_stage["post"]["spread"] < by_stage["pre"]["spread"]


# ---- expert usage and specialisation ----------------------------------------------------------------------

def test_usage_counts_the_top_k_picks(model, prompts):
    """Shares sum to 1 per layer and equal an independent count of the engine's top-k ids."""
    ids = prompts["code"][1]
    usage = lessons.expert_usage(model, ids)
    sums = usage.group_by("layer").agg(pl.col("share").sum(), pl.col("picks").sum())
    assert sums.height == model.config.n_layers
    assert all(abs(s - 1) < 1e-12 for s in sums["share"])
    assert set(sums["picks"]) == {len(ids) * model.config.n_experts_used}
    picked = _captured(model, ids, (".moe.topk_ids",))
    for i in range(model.config.n_layers):
        counts = torch.bincount(picked[f"blocks.{i}.moe.topk_ids"].flatten(), minlength=model.config.n_experts)
        mine = dict(usage.filter(pl.col("layer") == i).select("expert", "share").iter_rows())
        expected = (counts.double() / counts.sum()).tolist()
        assert all(math.isclose(mine.get(e, 0.0), expected[e], abs_tol=1e-12) for e in range(model.config.n_experts))


def test_usage_distance_is_total_variation(model, prompts):
    a, b = lessons.expert_usage(model, prompts["code"][0]), lessons.expert_usage(model, prompts["prose"][0])
    assert lessons.usage_distance(a, a)["distance"].to_list() == [0.0] * model.config.n_layers
    ab, ba = lessons.usage_distance(a, b), lessons.usage_distance(b, a)
    assert ab["distance"].to_list() == pytest.approx(ba["distance"].to_list())
    n = model.config.n_experts
    for layer, d in ab.iter_rows():  # numpy over dense share vectors, an expert one usage lacks at 0
        dense = [np.zeros(n), np.zeros(n)]
        for vec, usage in zip(dense, (a, b)):
            for e, share in usage.filter(pl.col("layer") == layer).select("expert", "share").iter_rows():
                vec[e] = share
        assert d == pytest.approx(0.5 * np.abs(dense[0] - dense[1]).sum())
        assert 0 <= d <= 1
    disjoint = pl.DataFrame({"layer": [0, 0], "expert": [1, 2], "share": [0.5, 0.5]})
    other = pl.DataFrame({"layer": [0], "expert": [3], "share": [1.0]})
    assert lessons.usage_distance(disjoint, other)["distance"].to_list() == [pytest.approx(1.0)]


def test_random_router_is_temporary(model, prompts):
    ids = prompts["prose"][1]
    layers = model.weights.layers
    before = [layer.router.clone() for layer in layers]
    objects = [layer.router for layer in layers]
    trained = lessons.expert_usage(model, ids)
    with lessons.random_router(model, seed=3):
        for layer, orig in zip(layers, before):
            r = layer.router
            assert r.shape == orig.shape and r.dtype == orig.dtype and r.device == orig.device
            assert not torch.equal(r, orig)
            assert float(r.std()) == pytest.approx(float(orig.std()), rel=0.1)
        assert max(lessons.usage_distance(trained, lessons.expert_usage(model, ids))["distance"]) > 0
    assert all(layer.router is o and torch.equal(layer.router, b) for layer, o, b in zip(layers, objects, before))
    with pytest.raises(RuntimeError, match="inside"), lessons.random_router(model, seed=3):
        raise RuntimeError("an error inside")
    assert all(layer.router is o and torch.equal(layer.router, b) for layer, o, b in zip(layers, objects, before))
    with lessons.random_router(model, seed=3):
        again = [layer.router.clone() for layer in layers]
    with lessons.random_router(model, seed=3):  # seeded: the same matrices each time
        assert all(torch.equal(layer.router, g) for layer, g in zip(layers, again))


def test_specialisation(model, prompts):
    small = prompts  # the default prompts, three of each kind
    frame = lessons.specialisation(model, small, seeds=(0, 1))
    columns = ["across kinds", "within a kind", "across kinds, random router", "within a kind, random router"]
    assert frame.columns == ["layer", *columns]
    assert frame["layer"].to_list() == list(range(model.config.n_layers))
    values = frame.select(columns)
    assert values.null_count().sum_horizontal().item() == 0
    assert all(0 <= v <= 1 for col in values.iter_columns() for v in col)
    # the across and within columns from usage_distance on each pair, independently averaged
    usage = {(kind, j): lessons.expert_usage(model, ids) for kind, many in small.items() for j, ids in enumerate(many)}
    across = [lessons.usage_distance(usage[x], usage[y])["distance"].to_numpy()
              for x, y in itertools.combinations(usage, 2) if x[0] != y[0]]
    within = [lessons.usage_distance(usage[x], usage[y])["distance"].to_numpy()
              for x, y in itertools.combinations(usage, 2) if x[0] == y[0]]
    assert frame["across kinds"].to_numpy() == pytest.approx(np.mean(across, axis=0))
    assert frame["within a kind"].to_numpy() == pytest.approx(np.mean(within, axis=0))


# ---- RoPE -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["neox", "normal"])
def test_unwrapped_angle_is_the_formula(model, style):
    c = model.config
    vec = torch.randn(c.head_dim, generator=torch.Generator().manual_seed(1))
    pos = 200
    frame = lessons.rope_unwrapped(model, vec, pos, c.rope_base, c.rope_scale, c.rope_dim, style)
    assert frame.columns == ["pair", "measured", "formula"] and frame.height == c.rope_dim // 2
    expected = [pos * c.rope_scale * c.rope_base ** (-2 * i / c.rope_dim) for i in range(c.rope_dim // 2)]
    assert frame["formula"].to_list() == pytest.approx(expected)
    assert sum(f > 2 * math.pi for f in expected) >= 3  # pairs that went round more than once
    assert float((frame["measured"] - frame["formula"]).abs().max()) < 1e-3


@pytest.mark.parametrize("style", ["neox", "normal"])
def test_dot_depends_on_the_offset_only(model, style):
    c = model.config
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(c.head_dim, generator=g), torch.randn(c.head_dim, generator=g)
    frame = lessons.rope_relative_check(model, q, k, c.rope_base, c.rope_scale, style)
    assert frame.columns == ["offset", "start", "dot"] and frame.height == 9
    assert frame.filter((pl.col("offset") == 0) & (pl.col("start") == 0))["dot"].item() == pytest.approx(float(q.double() @ k.double()), rel=1e-5)
    per_offset = frame.group_by("offset").agg(pl.col("dot").min().alias("lo"), pl.col("dot").max().alias("hi"))
    for _, lo, hi in per_offset.iter_rows():
        assert hi - lo <= 1e-4 * max(abs(lo), abs(hi))
    assert per_offset["lo"].n_unique() == 3  # and the offset does change it


# ---- attention shares and the logit lens's answer layer ---------------------------------------------------

def test_attention_shares_on_a_pattern_written_out():
    import polars as pl

    # one layer, two heads, keys 0..3 at step 5: head 0 reads key 0 most, head 1 the previous token (key 2)
    weights = {0: [0.7, 0.1, 0.1, 0.1], 1: [0.1, 0.1, 0.6, 0.2]}
    frame = pl.DataFrame([{"step": 5, "path": "cached", "layer": 0, "head": h, "key": k, "weight": w}
                          for h, ws in weights.items() for k, w in enumerate(ws)])
    row = lessons.attention_shares(frame, 5).row(0, named=True)
    assert row["on key 0"] == pytest.approx(0.4) and row["on itself"] == pytest.approx(0.15)
    assert row["on the previous token"] == pytest.approx(0.35)
    assert row["heads reading key 0 most"] == 1 and row["heads reading the previous token most"] == 1
    assert row["heads reading itself most"] == 0


def test_answer_layer_is_where_the_final_top1_appears_and_stays():
    import polars as pl

    ids = {0: [5, 7, 7, 7], 1: [7, 5, 9, 9], 2: [1, 2, 3, 4]}  # per step, the top-1 of layers 0..3
    frame = pl.DataFrame([{"step": s, "path": "cached", "layer": n, "token_id": t, "prob": 0.5, "entropy": 1.0,
                           "kl_to_final": 0.0} for s, ts in ids.items() for n, t in enumerate(ts)])
    got = {r["step"]: (r["token_id"], r["from layer"]) for r in lessons.answer_layer(frame).iter_rows(named=True)}
    assert got == {0: (7, 1), 1: (9, 2), 2: (4, 3)}  # step 1: 7 at layer 0 does not count, it does not stay


# ---- a shared expert and its gate (tiny-qwen2moe, random weights) -----------------------------------------

@pytest.fixture(scope="module")
def qwen2moe(tiny_paths):
    return load_model(tiny_paths["qwen2moe"])


@pytest.fixture(scope="module")
def qwen2moe_ids(qwen2moe) -> list[int]:
    return qwen2moe.tokenizer.encode("The history of the city begins with a small village on the river.")[:12]


def test_shared_share_is_the_files_shared_expert_against_the_rest(qwen2moe, qwen2moe_ids, tiny_paths):
    """The gate, both parts' norms and the share recomputed in numpy from the captured MoE input and output and the
    file's own tensors (gguf-py's dequantize): gate = σ(x·g), shared = down(silu(gate·x) ⊙ up·x), routed =
    ffn_out − gate·shared."""
    import gguf as gguf_py

    from workbench.dump import ours

    ids = qwen2moe_ids
    frame = lessons.shared_expert_share(qwen2moe, ids)
    c = qwen2moe.config
    assert frame.height == c.n_layers * len(ids)
    assert frame.select("layer", "position").rows() == [(i, p) for i in range(c.n_layers) for p in range(len(ids))]
    assert float(frame["max |gated shared + routed − ffn_out|"].max()) < 1e-5
    reader = gguf_py.GGUFReader(tiny_paths["qwen2moe"])
    tensors = {t.name: gguf_py.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    dump = ours(qwen2moe, ids, len(ids), names=["blocks.*.ffn_norm", "blocks.*.ffn_out"])
    for i in range(c.n_layers):
        x = dump.tensors[(0, f"blocks.{i}.ffn_norm")].double().numpy()  # [T, hidden]
        out = dump.tensors[(0, f"blocks.{i}.ffn_out")].double().numpy()
        gate = 1 / (1 + np.exp(-(x @ tensors[f"blk.{i}.ffn_gate_inp_shexp.weight"])))  # [T]
        g, u = x @ tensors[f"blk.{i}.ffn_gate_shexp.weight"].T, x @ tensors[f"blk.{i}.ffn_up_shexp.weight"].T
        shared = gate[:, None] * ((g / (1 + np.exp(-g)) * u) @ tensors[f"blk.{i}.ffn_down_shexp.weight"].T)
        s, r = np.linalg.norm(shared, axis=-1), np.linalg.norm(out - shared, axis=-1)
        mine = frame.filter(pl.col("layer") == i)
        assert mine["gate"].to_numpy() == pytest.approx(gate, rel=1e-5)
        assert mine["gated shared norm"].to_numpy() == pytest.approx(s, rel=1e-4)
        assert mine["routed norm"].to_numpy() == pytest.approx(r, rel=1e-4)
        assert mine["shared share"].to_numpy() == pytest.approx(s / (s + r), rel=1e-4)
    assert 0 < frame["gate"].min() and frame["gate"].max() < 1
    assert 0 < frame["shared share"].min() and frame["shared share"].max() < 1


def test_shared_summary_is_per_layer(qwen2moe, qwen2moe_ids):
    frame = lessons.shared_expert_share(qwen2moe, qwen2moe_ids)
    summary = lessons.shared_summary(frame)
    assert summary["layer"].to_list() == list(range(qwen2moe.config.n_layers))
    for row in summary.iter_rows(named=True):
        mine = frame.filter(pl.col("layer") == row["layer"])
        assert (row["gate min"], row["gate max"]) == (mine["gate"].min(), mine["gate"].max())
        assert row["share mean"] == pytest.approx(mine["shared share"].mean())


def test_the_shared_expert_breaks_move_the_logits_and_the_clean_run_does_not(qwen2moe, qwen2moe_ids):
    """The clean run against itself moves nothing; dropping the shared expert or adding it ungated moves the logits
    (checked here by a forward of our own with the break on, on the clean run's tokens) and the top tokens."""
    steps = 4
    frame = lessons.break_effects(qwen2moe, qwen2moe_ids, steps, lessons.SHARED_BREAKS)
    assert frame["break"].to_list() == ["clean", *lessons.SHARED_BREAKS]
    rows = {r["break"]: r for r in frame.iter_rows(named=True)}
    clean = rows["clean"]
    assert clean["relative max |Δlogit|"] == 0 and clean["top token changes at"] == 0
    assert clean["tokens differ from step"] is None and clean["of positions"] == len(qwen2moe_ids) + steps
    tokens = lessons.decode(qwen2moe, qwen2moe_ids, steps).ids
    reference = qwen2moe.forward(torch.tensor(tokens), 0, qwen2moe.new_cache(len(tokens)))
    for name in lessons.SHARED_BREAKS:
        moved = qwen2moe.forward(torch.tensor(tokens), 0, qwen2moe.new_cache(len(tokens)), breaks=frozenset({name}))
        expected = float((moved - reference).abs().max() / reference.abs().max())
        assert rows[name]["relative max |Δlogit|"] == pytest.approx(expected) and expected > 0.05, name
        assert rows[name]["top token changes at"] == int((moved.argmax(-1) != reference.argmax(-1)).sum()) > 0, name


# ---- the families' own lessons: file tensors via gguf-py ---------------------------------------------------

PROSE = "The history of the city begins with a small village on the river."


def _file_tensor(path: Path, name: str) -> np.ndarray:
    """A tensor of the file, dequantized by gguf-py (not the engine), float64, in PyTorch order."""
    from gguf.quants import dequantize

    from workbench.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    info = gguf.tensors[name]
    return dequantize(gguf.raw(name).numpy(), info.ggml_type).reshape(info.shape).astype(np.float64)


def _rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt((x**2).mean(-1))


# ---- QK-norm over the whole projection (tiny-olmoe, random weights) ---------------------------------------

@pytest.fixture(scope="module")
def olmoe(tiny_paths):
    return load_model(tiny_paths["olmoe"])


def test_whole_and_per_head_qk_norm_recomputed_from_the_files_weight(olmoe, tiny_paths):
    """Each head's RMS before the norm, after it and after it ÷ weight, both norms, recomputed in numpy from the
    captured q of each run (the per-head one's q differs from layer 1 on: layer 0's output does) and the file's
    attn_q_norm (gguf-py): whole = q_row / rms(q_row) · w, per head = q_h / rms(q_h) · w_h."""
    ids = olmoe.tokenizer.encode(PROSE)[:12]
    frame = lessons.qk_norm_whole_vs_per_head(olmoe, ids)
    c = olmoe.config
    T, H, D = len(ids), c.n_heads, c.head_dim
    assert frame.height == 2 * c.n_layers * T * H
    for norm, breaks in (("whole", frozenset()), ("per head", frozenset({"qk-norm-per-head"}))):
        q_all = _captured(olmoe, ids, (".attn.q",), breaks)
        for i in range(c.n_layers):
            q = q_all[f"blocks.{i}.attn.q"].double().numpy()  # [T, H, D]
            w = _file_tensor(tiny_paths["olmoe"], f"blk.{i}.attn_q_norm.weight").reshape(H, D)  # [H·D] per head
            if norm == "whole":
                row = q.reshape(T, H * D)
                normed = (row / np.sqrt((row**2).mean(-1, keepdims=True) + c.rms_eps)).reshape(T, H, D) * w
                assert np.ptp(_rms(normed / w), axis=-1).min() > 0.01  # whole-row: the heads differ in every row
            else:
                normed = q / np.sqrt((q**2).mean(-1, keepdims=True) + c.rms_eps) * w
            mine = frame.filter((pl.col("norm") == norm) & (pl.col("layer") == i)).sort("position", "head")
            assert mine["rms before"].to_numpy() == pytest.approx(_rms(q).flatten(), rel=1e-5)
            assert mine["rms after"].to_numpy() == pytest.approx(_rms(normed).flatten(), rel=1e-5)
            assert mine["rms after ÷ weight"].to_numpy() == pytest.approx(_rms(normed / w).flatten(), rel=1e-5)


def test_whole_qk_summary_holds_the_row_and_only_per_head_the_heads(olmoe):
    frame = lessons.qk_norm_whole_vs_per_head(olmoe, olmoe.tokenizer.encode(PROSE)[:12])
    summary = {r["norm"]: r for r in lessons.qk_whole_summary(frame).iter_rows(named=True)}
    assert list(summary) == ["whole", "per head"]
    for norm, r in summary.items():
        part = frame.filter(pl.col("norm") == norm)
        assert (r["head RMS ÷ weight, min"], r["head RMS ÷ weight, max"]) == (part["rms after ÷ weight"].min(),
                                                                             part["rms after ÷ weight"].max())
        assert r["max |row RMS ÷ weight − 1|"] < 1e-4  # both norms fix the row's combined size
    whole, per_head = summary["whole"], summary["per head"]
    assert whole["max change of the heads' relative sizes"] < 1e-5 and per_head["max change of the heads' relative sizes"] > 0.05
    assert per_head["head RMS ÷ weight, min"] == pytest.approx(1, abs=1e-4) == per_head["head RMS ÷ weight, max"]
    assert whole["head RMS ÷ weight, min"] < 0.95 and whole["head RMS ÷ weight, max"] > 1.05


def test_break_effects_of_the_per_head_norm_are_a_forward_with_the_break(olmoe):
    ids, steps = olmoe.tokenizer.encode(PROSE)[:8], 2
    row = lessons.break_effects(olmoe, ids, steps, ["qk-norm-per-head"]).row(1, named=True)
    tokens = torch.tensor(lessons.decode(olmoe, ids, steps).ids)
    clean = olmoe.forward(tokens, 0, olmoe.new_cache(len(tokens)))
    moved = olmoe.forward(tokens, 0, olmoe.new_cache(len(tokens)), breaks=frozenset({"qk-norm-per-head"}))
    assert row["break"] == "qk-norm-per-head"
    expected = float((moved - clean).abs().max() / clean.abs().max())
    assert row["relative max |Δlogit|"] == pytest.approx(expected) and expected > 0.01


# ---- latent attention and V3 routing (tiny-deepseek2, random weights) -------------------------------------

@pytest.fixture(scope="module")
def deepseek(tiny_paths):
    return load_model(tiny_paths["deepseek2"])


def test_latent_cache_is_the_formula_and_the_cache_tensors(deepseek):
    """Bytes per position and layer from the kv frame = (kv_lora_rank + rope) × 4 = what model.new_cache(n) holds
    per position (one row of keys; the values a view of them); the MHA column = n_heads × (head_dim + v) × 4, from
    the config, 8 × (96 + 64) × 4 = 5,120 B on the tiny file against the latent's 640."""
    c = deepseek.config
    ids = deepseek.tokenizer.encode(PROSE)[:10]
    frame = lessons.latent_cache(lessons.decode(deepseek, ids, 4, path="cached").trace())
    assert frame["positions"].to_list() == [len(ids), len(ids) + 1, len(ids) + 2, len(ids) + 3]  # prefill, then 3 fed
    n = 32
    cache = deepseek.new_cache(n)
    for keys, values in zip(cache.keys, cache.values):
        assert keys.shape == (1, n, c.kv_lora_rank + c.rope_dim) and values.data_ptr() == keys.data_ptr()
    per_position_layer = cache.capacity_bytes // (n * c.n_layers)
    assert per_position_layer == (c.kv_lora_rank + c.rope_dim) * 4
    mha = c.n_heads * (c.head_dim + c.v_head_dim) * 4
    for r in frame.iter_rows(named=True):
        assert r["cache bytes"] == r["positions"] * c.n_layers * per_position_layer
        assert r["bytes per position and layer"] == per_position_layer
        assert r["MHA bytes"] == r["positions"] * c.n_layers * mha and r["MHA bytes per position and layer"] == mha


def test_absorbed_attention_is_mha_with_decompressed_kv(deepseek, tiny_paths):
    """The lesson's two forms agree with the engine's pattern and output; and, independently, the MHA form written in
    numpy from the captured q, latent and RoPE key with the file's attn_k_b (gguf-py) gives the engine's pattern."""
    ids = deepseek.tokenizer.encode(PROSE)[:10]
    frame = lessons.latent_attention_forms(deepseek, ids)
    c = deepseek.config
    assert frame["layer"].to_list() == list(range(c.n_layers))
    for column in frame.columns[1:]:
        assert float(frame[column].max()) < 1e-5, column
    t = _captured(deepseek, ids, (".attn.q", ".attn.q_pe", ".attn.kv_latent", ".attn.k_pe", ".attn.pattern"))
    T, nope = len(ids), c.head_dim - c.rope_dim
    for i in range(c.n_layers):
        q, q_pe, latent, k_pe = (t[f"blocks.{i}.attn.{p}"].double().numpy() for p in ("q", "q_pe", "kv_latent", "k_pe"))
        wk_b = _file_tensor(tiny_paths["deepseek2"], f"blk.{i}.attn_k_b.weight")  # [H, lora, nope]
        k_nope = np.einsum("sl,hln->shn", latent, wk_b)
        # the file's q·k scale: 1/√(nope + rope), × YaRN's mscale² where the file scales RoPE with YaRN
        scores = (np.einsum("thn,shn->ths", q[..., :nope], k_nope) + np.einsum("thr,sr->ths", q_pe, k_pe)) * c.attn_scale
        scores = np.where(np.triu(np.ones((T, T), dtype=bool), 1)[:, None], -np.inf, scores)
        mha = np.exp(scores - scores.max(-1, keepdims=True))
        mha /= mha.sum(-1, keepdims=True)
        assert np.abs(mha - t[f"blocks.{i}.attn.pattern"].double().numpy()).max() < 1e-5, i


def test_v3_routing_written_out_in_numpy_from_the_file(deepseek, tiny_paths):
    """Every column of the lesson's router against numpy from the captured ffn_norm and the file's ffn_gate_inp and
    exp_probs_b (gguf-py): sigmoid scores, + bias, a group's 2 best, the 2 best of 4 groups, top-2 within them,
    unbiased weights renormalised × 2.5; and the engine's own choice and weights."""
    ids = deepseek.tokenizer.encode(PROSE)[:12]
    frame = lessons.v3_routing(deepseek, ids)
    c = deepseek.config
    T, E = len(ids), c.n_experts
    moe_layers = [i for i in range(c.n_layers) if c.is_moe_layer(i)]
    assert frame.height == len(moe_layers) * T * E
    x_all = _captured(deepseek, ids, (".ffn_norm", ".moe.topk_ids", ".moe.topk_weights"))
    for i in moe_layers:
        x = x_all[f"blocks.{i}.ffn_norm"].double().numpy()
        scores = 1 / (1 + np.exp(-(x @ _file_tensor(tiny_paths["deepseek2"], f"blk.{i}.ffn_gate_inp.weight").T)))
        biased = scores + _file_tensor(tiny_paths["deepseek2"], f"blk.{i}.exp_probs_b.bias")
        group_score = np.sort(biased.reshape(T, 4, 2), -1)[..., -2:].sum(-1)  # [T, 4]
        kept = np.zeros((T, 4), dtype=bool)
        np.put_along_axis(kept, np.argsort(-group_score, -1)[:, :2], True, -1)
        kept = np.repeat(kept, 2, -1)
        chosen = np.argsort(-np.where(kept, biased, -np.inf), -1)[:, :2]
        mine = frame.filter(pl.col("layer") == i).sort("position", "expert")
        assert mine["score"].to_numpy() == pytest.approx(scores.flatten(), rel=1e-5)
        assert mine["biased score"].to_numpy() == pytest.approx(biased.flatten(), abs=1e-6)
        assert mine["group score"].to_numpy() == pytest.approx(np.repeat(group_score, 2, -1).flatten(), abs=1e-6)
        assert mine["group kept"].to_list() == kept.flatten().tolist()
        got = mine.filter(pl.col("chosen")).group_by("position").agg(pl.col("expert").sort()).sort("position")["expert"].to_list()
        assert got == np.sort(chosen, -1).tolist()
        assert got == x_all[f"blocks.{i}.moe.topk_ids"].sort(-1).values.tolist()  # the engine's choice
        weights = np.take_along_axis(scores, chosen, -1)
        weights = weights / weights.sum(-1, keepdims=True) * 2.5
        expected = np.zeros((T, E))
        np.put_along_axis(expected, chosen, weights, -1)
        assert mine["weight"].to_numpy() == pytest.approx(expected.flatten(), abs=1e-6)
        assert mine["engine weight"].to_numpy() == pytest.approx(expected.flatten(), abs=1e-5)
        plain = np.zeros((T, E), dtype=bool)
        np.put_along_axis(plain, np.argsort(-scores, -1)[:, :2], True, -1)
        assert mine["plain top-k"].to_list() == plain.flatten().tolist()


def test_v3_choice_changes_and_the_example_token(deepseek):
    """The counts per layer, recounted from the frame's sets; the example is a token the groups change (the first)."""
    frame = lessons.v3_routing(deepseek, deepseek.tokenizer.encode(PROSE)[:12])
    changes = lessons.v3_choice_changes(frame)
    assert changes["layer"].to_list() == sorted(frame["layer"].unique().to_list())
    for r in changes.iter_rows(named=True):
        sets = {}
        for t in frame.filter(pl.col("layer") == r["layer"]).partition_by("position", maintain_order=True):
            sets[t["position"][0]] = tuple(frozenset(t.filter(pl.col(k))["expert"]) for k in ("chosen", "plain top-k", "biased top-k"))
        assert r["positions"] == len(sets)
        assert r["chosen ≠ plain top-k"] == sum(ch != pl_ for ch, pl_, _ in sets.values())
        assert r["the bias changes it"] == sum(b != pl_ for _, pl_, b in sets.values())
        assert r["the groups change it"] == sum(ch != b for ch, _, b in sets.values())
        assert r["max |weight − engine's|"] < 1e-5
    assert int(changes["chosen ≠ plain top-k"].sum()) > 0
    example = lessons.v3_example(frame)
    assert example.height == deepseek.config.n_experts and example["layer"].n_unique() == example["position"].n_unique() == 1
    if int(changes["the groups change it"].sum()):
        assert example.filter(pl.col("chosen"))["expert"].to_list() != example.filter(pl.col("biased top-k"))["expert"].to_list()
    assert example["weight"].sum() == pytest.approx(deepseek.config.routed_scale)


# ---- attention sinks and sliding windows (tiny-gpt-oss, random weights) -----------------------------------

@pytest.fixture(scope="module")
def gptoss(tiny_paths):
    return load_model(tiny_paths["gpt-oss"])


def test_sink_attention_written_out_in_numpy_from_the_file(gptoss, tiny_paths):
    """Every column of the lesson against numpy from the captured q and k after RoPE and the file's attn_sinks
    (gguf-py): a softmax over [q·k/√d for each key 0 ≤ query − key (< 4 on the even layers), the head's sink
    logit]; its last column is the share, the rest the pattern, whose keys 4 or more back are exactly 0 on the
    sliding layers and carry weight on the full ones."""
    ids, first = gptoss.tokenizer.encode(PROSE)[:10], 3
    frame = lessons.sink_attention(gptoss, ids, first)
    c = gptoss.config
    T, H, window = len(ids), c.n_heads, c.sliding_window
    assert (window, [c.is_local_layer(i) for i in range(c.n_layers)]) == (4, [True, False] * (c.n_layers // 2))
    assert frame.height == c.n_layers * (T - first) * H
    t = _captured(gptoss, ids, (".attn.q_rope", ".attn.k_rope"))
    delta = np.arange(T)[:, None] - np.arange(T)[None, :]  # query − key position
    for i in range(c.n_layers):
        q = t[f"blocks.{i}.attn.q_rope"].double().numpy()  # [T, H, D]
        k = np.repeat(t[f"blocks.{i}.attn.k_rope"].double().numpy(), H // c.n_kv_heads, axis=1)  # [T, H, D]
        seen = (delta >= 0) & ((delta < window) if i % 2 == 0 else True)  # [T, keys]
        scores = np.where(seen[:, None], np.einsum("thd,shd->ths", q, k) / math.sqrt(c.head_dim), -np.inf)
        sinks = np.broadcast_to(_file_tensor(tiny_paths["gpt-oss"], f"blk.{i}.attn_sinks.weight")[None, :, None], (T, H, 1))
        logits = np.concatenate((scores, sinks), -1)
        full = np.exp(logits - logits.max(-1, keepdims=True))
        full /= full.sum(-1, keepdims=True)  # [T, H, keys + 1]
        pattern, share = full[first:, :, :-1], full[first:, :, -1]
        mine = frame.filter(pl.col("layer") == i).sort("position", "head")
        assert set(mine["layer kind"]) == {"sliding" if i % 2 == 0 else "full"}
        assert mine["sink share"].to_numpy() == pytest.approx(share.flatten(), abs=1e-6)
        assert mine["sink share, written out"].to_numpy() == pytest.approx(share.flatten(), abs=1e-9)
        assert mine["Σ pattern"].to_numpy() == pytest.approx(pattern.sum(-1).flatten(), abs=1e-6)
        assert float(mine["max |pattern − written out|"].max()) < 1e-6
        positions = np.arange(first, T)
        masked = np.repeat(np.maximum(positions + 1 - window, 0) if i % 2 == 0 else 0 * positions, H)
        assert mine["keys masked"].to_list() == masked.tolist() and mine["keys"].to_list() == np.repeat(positions + 1, H).tolist()
        beyond = np.where((delta >= window)[first:, None], pattern, 0).sum(-1).flatten()
        assert mine["weight beyond the window"].to_numpy() == pytest.approx(beyond, abs=1e-6)
        assert (beyond.max() == 0) if i % 2 == 0 else (beyond[-H:].min() > 0)
    assert 0.01 < frame["sink share"].min() and frame["sink share"].max() < 1


def test_sink_summary_is_per_layer(gptoss):
    frame = lessons.sink_attention(gptoss, gptoss.tokenizer.encode(PROSE)[:10], 3)
    summary = lessons.sink_summary(frame)
    assert summary["layer"].to_list() == list(range(gptoss.config.n_layers))
    for row in summary.iter_rows(named=True):
        mine = frame.filter(pl.col("layer") == row["layer"])
        last = mine.filter(pl.col("position") == 9)
        assert (row["share min"], row["share max"]) == (mine["sink share"].min(), mine["sink share"].max())
        assert row["share mean"] == pytest.approx(mine["sink share"].mean())
        assert row["max |Σ pattern + share − 1|"] < 1e-6 and row["max |share − written out|"] < 1e-6
        assert (row["keys (last position)"], row["keys masked"]) == (10, 6 if row["layer kind"] == "sliding" else 0)
        assert row["weight beyond the window"] == pytest.approx(last["weight beyond the window"].mean())


def test_the_sink_breaks_move_the_logits(gptoss):
    """Dropping the sinks or the window is a forward with the break on, on the clean run's tokens: both move the logits."""
    ids, steps = gptoss.tokenizer.encode(PROSE)[:10], 2
    frame = lessons.break_effects(gptoss, ids, steps, lessons.SINK_BREAKS)
    rows = {r["break"]: r for r in frame.iter_rows(named=True)}
    assert list(rows) == ["clean", "sinks-dropped", "no-sliding-window"] and rows["clean"]["relative max |Δlogit|"] == 0
    tokens = torch.tensor(lessons.decode(gptoss, ids, steps).ids)
    clean = gptoss.forward(tokens, 0, gptoss.new_cache(len(tokens)))
    for name in lessons.SINK_BREAKS:
        moved = gptoss.forward(tokens, 0, gptoss.new_cache(len(tokens)), breaks=frozenset({name}))
        expected = float((moved - clean).abs().max() / clean.abs().max())
        assert rows[name]["relative max |Δlogit|"] == pytest.approx(expected) and expected > 0.01, name
