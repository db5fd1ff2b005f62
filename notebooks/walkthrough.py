import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium", app_title="How a decoder works, by watching one")


@app.cell
def _():
    try:  # first: notebooks/workbench.py would shadow the `workbench` package (notebooks/_unshadow.py)
        import _unshadow  # noqa: F401
    except ModuleNotFoundError:  # loaded by its path, as the tests do: nothing shadows the package
        pass

    from dataclasses import replace

    import altair as alt
    import marimo as mo
    import polars as pl
    import torch
    import torch.nn.functional as F

    from workbench import bench, charts, lessons
    from workbench import trace as wtrace
    from workbench.lessons import visible
    from workbench.model import BREAKS, Model, apply_rope, break_config, breaks_that_apply, grouped_attention, rms_norm
    from workbench.quants import dequantize
    from workbench.session import Session

    # A tiny model's matrices are so small that a second thread costs more in synchronisation than it saves,
    # and one thread keeps the timings of section 5 steady on a busy machine.
    torch.set_num_threads(1)

    # Heavy runs wait for their button in the editor; headless (`python notebooks/walkthrough.py`) they just run.
    headless = not mo.running_in_notebook()
    return (BREAKS, F, Model, Session, alt, apply_rope, bench, break_config, breaks_that_apply, charts, dequantize,
            grouped_attention, headless, lessons, mo, pl, replace, rms_norm, torch, visible, wtrace)


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    # How a decoder works, by watching one

    A language model writes text one token at a time. Each step takes every token so far, runs it through a
    stack of identical blocks (attention, then a feed-forward network or a *mixture of experts*), and ends in
    one score per vocabulary entry — the **logits** — from which the next token is picked. This notebook
    follows one small model through that loop, using the workbench engine's own functions at every stage, so
    that each number you see is one the engine computes.

    The model is `tiny-qwen3moe`: the same architecture as Qwen3-30B-A3B (per-head QK-norm, grouped-query
    attention, a head width that is *not* hidden size ÷ heads, a mixture of experts), shrunk to 16 M
    parameters (17 MB) so that everything below runs in seconds on a CPU. It was **trained here**, from
    scratch, on the Python standard library: every module's docstrings (pydoc-style), the source of the
    top-level modules and the `help()` topics — 1.9 M tokens, 23 minutes on two CPU cores (`data/README.md`
    says how). Its validation loss is 4.0 nats per token, so it writes Python-*looking* code and
    docstring-*like* English: `def`, `return`, `self.`, argument lists, closing brackets in the right places,
    plausible identifiers — rarely a program that does anything. That is what good output looks like here;
    a broken engine (section 8) writes visibly worse, or subtly different, text.

    Sections: **1** what is in a GGUF file · **2** tokens · **3** one decode step by hand, and QK-norm over the whole
    projection · **4** the KV cache, and latent attention's cache · **5** cached vs uncached decoding · **6** the
    mixture of experts, a shared expert with its gate, and V3's routing · **7** what the heads read, when the answer
    appears, and gpt-oss's attention sinks and sliding windows · **8** breaking it on purpose.
    Sliders and text boxes along the way change what is shown; every cell below them follows. Reading it
    through takes about 20 minutes; the buttons (sweeps, the breaks) are optional.
    """)
    return


@app.cell(hide_code=True)
def _(mo):
    mo.accordion({"Glossary (the terms used below)": mo.md(r"""
    * **token, piece, id** — the unit the model reads and writes: a piece of text from a fixed vocabulary, and its
      number. **BPE merges** — how a byte-level BPE tokenizer is built: start from the 256 bytes, repeatedly
      merge the most frequent adjacent pair into a new token; the file lists the merges in order (section 2).
    * **logits** — one score per vocabulary entry; softmax turns them into the next token's probabilities.
    * **residual stream** — the vector per position that every block reads from and adds its output to.
    * **RMSNorm** — divide a vector by its root-mean-square, times a learned weight. **QK-norm** — the same,
      applied to each query and key head on its own (Qwen3, Gemma3), or to all heads of q and of k at once (OLMoE).
    * **RoPE** — rotary position embedding: q and k are rotated by angles proportional to the position.
    * **GQA** — grouped-query attention: several query heads share one key/value head.
    * **KV cache** — every earlier position's keys and values, kept so a decode step runs only the new token.
      **MLA** — multi-head latent attention (DeepSeek-V2/V3): every head's K and V are made from one shared latent
      row per position, which is all the cache holds, with one shared RoPE key (section 4).
    * **sliding window** — a layer that attends only to the last `sliding_window` positions (Gemma3, gpt-oss).
      **attention sink** — where a head puts attention when nothing is worth reading: key 0 in many trained models,
      a learned logit per head in gpt-oss (section 7).
    * **prefill / decode** — the prompt's positions in one batched forward, then one token per step.
    * **MoE, router, experts, top-k** — a feed-forward layer made of many small networks (experts); a linear
      router scores them and only the best k run for each token. **shared expert** — (Qwen2-MoE, DeepSeek) one more
      expert that every token goes through beside the routed ones; in Qwen2-MoE scaled by a sigmoid gate of its
      own (section 6).
    * **SwiGLU** — the feed-forward network used by each expert: down(silu(gate(x)) × up(x)).
    * **quant types, Q8_0, K-quants** — how GGUF stores weights in small blocks of low-bit integers with a
      scale per block; the K-quants (Q2_K … Q6_K) use 256-weight super-blocks with per-sub-block scales.
    * **probe, capture point** — a function the forward pass calls with its intermediate tensors by name
      (`blocks.0.attn.q_normed`, …). **trace frames** — the tables a session records from probes at every step:
      `tokens` (each step's token and timing), `kv` (cache bytes per layer), `qk` (q/k RMS per head before and
      after the norm), `routing` (experts and weights), `layers` (residual statistics), `equiv` (cached vs
      uncached logits).
    * **aprender** — a Rust inference engine whose KV-cache bugs this workbench grew out of (section 5 tells
      the story).
    """)})
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    **Try this** as you go: in section 2, a prompt of prose (`The history of the city`) and one of code
    (`def read_lines(path):`) — the token boxes show which strings the tokenizer learnt as one piece; in
    section 3, slide the position to 0 and watch the attention have only one key to read; in section 8, pick
    `rope-style-swap` and compare its text with the clean run's.
    """)
    return


@app.cell
def _(Model, mo):
    MODEL_NAME = "tiny-qwen3moe"
    with mo.status.spinner(title=f"Loading {MODEL_NAME} …"):
        model = Model.load(MODEL_NAME, device="cpu", weights="dequantized")
    cfg = model.config
    tok = model.tokenizer
    gguf = model.gguf
    mo.md(f"""
    Loaded **{MODEL_NAME}** from `{gguf.path}` in {model.info.seconds:.2f} s:
    {model.n_params / 1e6:.2f} M parameters, {gguf.size / 2**20:.2f} MiB on disk,
    {model.info.weight_bytes / 2**20:.2f} MiB as `{str(model.dtype).removeprefix('torch.')}` on `{model.device}`.
    The weights are loaded *dequantized* (every matrix a plain float tensor), so the cells below can multiply
    by them by hand; the engine's default on a CPU keeps them in the file's own blocks (`weights="blocks"`: a
    C++ kernel decodes each block to these very float32 values and multiplies in float32), which reads a
    quarter of the bytes per token and agrees with this to ~1e-6 of the largest logit.
    """)
    return MODEL_NAME, cfg, gguf, model, tok


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 1 · What is in a GGUF file

    A GGUF file is three things back to back: a **header of key–value metadata** (the architecture, every
    hyperparameter, the whole tokenizer), a **tensor table** (name, type, shape and offset of every weight),
    and the **tensor data**, aligned so that it can be memory-mapped and used without copying.
    `workbench.gguf_file.GGUFFile` parses and validates the first two; `workbench.config.ModelConfig` turns
    the metadata into one explicit set of hyperparameters. A few of the keys:
    """)
    return


@app.cell
def _(cfg, gguf, mo, pl):
    _arch = gguf.arch
    _wanted = ["general.architecture", "general.name", f"{_arch}.block_count", f"{_arch}.embedding_length",
               f"{_arch}.attention.head_count", f"{_arch}.attention.head_count_kv", f"{_arch}.attention.key_length",
               f"{_arch}.expert_count", f"{_arch}.expert_used_count", f"{_arch}.rope.freq_base",
               f"{_arch}.context_length", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id"]
    meta_table = pl.DataFrame(
        [{"key": k, "value": str(gguf.metadata[k]), "python type": type(gguf.metadata[k]).__name__}
         for k in _wanted if k in gguf.metadata])
    _n_tok = len(gguf.metadata.get("tokenizer.ggml.tokens", []))
    mo.vstack([
        mo.ui.table(meta_table, selection=None, page_size=meta_table.height),
        mo.md(f"""
        The file (GGUF v{gguf.version}) holds **{len(gguf.metadata)} keys** and **{len(gguf.tensors)} tensors**;
        the tensor data starts at byte {gguf.data_offset:,}. The largest keys are the tokenizer's: a list of
        {_n_tok:,} token strings, their types, and the BPE merges.

        Note `{_arch}.attention.key_length` = **{cfg.head_dim}**: each attention head is {cfg.head_dim} wide,
        although hidden ÷ heads = {cfg.hidden} ÷ {cfg.n_heads} = {cfg.hidden // cfg.n_heads}. An engine that
        derives head_dim from the hidden size gets this architecture wrong (section 8 does it on purpose).
        Keys the file leaves out get llama.cpp's default for the architecture; here:
        {", ".join(f"`{k}`" for k in cfg.defaulted) or "none"}.
        """),
    ])
    return (meta_table,)


@app.cell
def _(gguf, lessons, mo):
    tensor_table = lessons.tensor_table(gguf)
    mo.vstack([
        mo.md("The tensor table (shapes in PyTorch order, rows × columns; GGUF itself lists dimensions "
              "fastest-first). `blk.N.` is block N; `*_exps` tensors stack every expert's matrix along a first "
              "axis:"),
        mo.ui.table(tensor_table, selection=None, page_size=12),
    ])
    return (tensor_table,)


@app.cell
def _(alt, gguf, lessons, mo, tensor_table):
    quant_table = lessons.quant_table(gguf, tensor_table)
    _bars = alt.Chart(quant_table).mark_bar().encode(
        x=alt.X("type:N", sort=alt.EncodingSortField("bits per param")),
        y=alt.Y("bits per param:Q", title="bits per parameter"),
        color=alt.Color("type:N", legend=None),
        tooltip=["type", "tensors", "params", "bytes", alt.Tooltip("bits per param:Q", format=".3f"),
                 "block weights", "block bytes"],
    )
    _labels = _bars.mark_text(dy=-6).encode(text=alt.Text("bits per param:Q", format=".2f"), color=alt.value("#333"))
    _total_bits = 8 * tensor_table["bytes"].sum() / tensor_table["params"].sum()
    mo.vstack([
        mo.md(f"""
        **Quant types.** Every tensor has its own type. Quantized types store weights in *blocks*: Q8_0 keeps 32
        weights as 32 int8 plus one fp16 scale (34 bytes, 8.5 bits each); the K-quants (Q4_K, Q5_K, Q6_K, …)
        pack 256 weights in sub-blocks that each carry their own small scale. Norm weights (and here the router) stay F32. This file
        uses {quant_table.height} types{" — a random test model mixes many on purpose, so that every dequantizer is exercised" if quant_table.height > 4 else ""};
        over the whole file it averages **{_total_bits:.2f} bits per parameter** (float32 would be 32).
        """),
        quant_table,
        (_bars + _labels).properties(width=420, height=220, title="bits per parameter, by type"),
    ])
    return (quant_table,)


@app.cell
def _(gguf, mo):
    tensor_pick = mo.ui.dropdown(options=list(gguf.tensors), value="blk.0.attn_q.weight", label="tensor")
    mo.vstack([mo.md("Pick a tensor to see its weights after dequantization "
                     "(`workbench.quants.dequantize`, which the loader runs once on every tensor):"), tensor_pick])
    return (tensor_pick,)


@app.cell
def _(alt, dequantize, gguf, mo, pl, tensor_pick, torch):
    _info = gguf.tensors[tensor_pick.value]
    _raw = gguf.raw(_info.name)
    _values = dequantize(_raw, _info.ggml_type).float().flatten()
    _sample = _values[:: max(1, _values.numel() // 4000)]
    _hist = alt.Chart(pl.DataFrame({"value": _sample.tolist()})).mark_bar().encode(
        x=alt.X("value:Q", bin=alt.Bin(maxbins=60)), y=alt.Y("count():Q", title="weights"),
    ).properties(width=420, height=160, title=f"{_info.name} ({_info.type_name}): values (sample of {_sample.numel():,})")
    mo.vstack([
        mo.md(f"`{_info.name}`: {_raw.numel():,} bytes on disk → {_values.numel():,} values "
              f"(mean {float(_values.mean()):+.4f}, RMS {float(_values.pow(2).mean().sqrt()):.4f}, "
              f"{int(torch.unique(_values).numel()):,} distinct values)."),
        _hist,
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 2 · Tokens

    The model never sees characters. The tokenizer (`model.tokenizer`, built from the GGUF metadata) cuts the
    text into **pieces** from a fixed vocabulary and hands the model their **ids**. Edit the prompt: it is used
    by sections 2, 3, 4 and 7.
    """)
    return


@app.cell
def _():
    # Constants of their own: a cell that used them from the prompt's cell would re-run with every edit of it.
    DEFAULT_PROMPT = 'def area(width, height):\n    """Return the area of a rectangle."""\n    return'
    MAX_PROMPT = 200  # positions; keeps every section below fast and inside the context
    KINDS = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}
    return DEFAULT_PROMPT, KINDS, MAX_PROMPT


@app.cell
def _(DEFAULT_PROMPT, mo):
    prompt = mo.ui.text_area(value=DEFAULT_PROMPT, label="prompt", full_width=True, rows=3)
    prompt
    return (prompt,)


@app.cell
def _(DEFAULT_PROMPT, KINDS, MAX_PROMPT, charts, gguf, mo, pl, prompt, tok, visible, wtrace):
    _notes = []
    ids = tok.encode(prompt.value)
    if not ids:
        _notes.append(mo.callout(mo.md("The prompt is empty and this model adds no BOS token: using the default "
                                       "prompt instead."), kind="warn"))
        ids = tok.encode(DEFAULT_PROMPT)
    if len(ids) > MAX_PROMPT:
        _notes.append(mo.callout(mo.md(f"The prompt has {len(ids)} tokens; the sections below use its first "
                                       f"{MAX_PROMPT}."), kind="warn"))
        ids = ids[:MAX_PROMPT]
    pieces = [tok.piece(i) for i in ids]
    token_types = gguf.metadata.get("tokenizer.ggml.token_type") or [1] * tok.vocab_size
    prompt_tokens = pl.DataFrame({
        "position": list(range(len(ids))), "id": ids, "piece": [visible(p) for p in pieces],
        "bytes": [len(tok.token_bytes(i)) for i in ids], "kind": [KINDS.get(token_types[i], "?") for i in ids],
    })
    _bos = (f"This model's BOS token is id {tok.bos_id} (`{tok.piece(tok.bos_id)}`), and "
            + ("`encode` **adds it** at the front" if tok.add_bos else "`encode` does **not** add it "
               "(`tokenizer.ggml.add_bos_token` is false): the prompt starts with its first real piece")
            if tok.bos_id is not None else "This model has no BOS token")
    mo.vstack([
        *_notes,
        mo.md(f"**{len(ids)} tokens** for {len(prompt.value)} characters. {_bos}. Hover a box for its id:"),
        mo.Html(charts.token_html(pieces, ids, wtrace.empty("tokens"))),
    ])
    return ids, pieces, prompt_tokens, token_types


@app.cell
def _(alt, mo, prompt_tokens):
    _chart = alt.Chart(prompt_tokens).mark_bar().encode(
        x=alt.X("position:O"), y=alt.Y("bytes:Q", title="bytes of text"),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["normal", "byte", "control"], range=["#4c78a8", "#f58518", "#e45756"])),
        tooltip=["position", "id", "piece", "bytes", "kind"],
    ).properties(width=560, height=160, title="how much text each token carries")
    mo.vstack([
        mo.md("The more often a string occurred in the text the tokenizer was built from, the more likely it is "
              "one piece; everything else falls apart into shorter pieces, down to single bytes (so any text can "
              "be encoded). A leading space belongs to the piece after it (`·`)."),
        mo.hstack([prompt_tokens, _chart], justify="start", wrap=True),
    ])
    return


@app.cell
def _(KINDS, gguf, mo, pl, tok, token_types, visible):
    control_tokens = [(i, tok.piece(i)) for i, t in enumerate(token_types) if t == 3]
    _names = [p for _, p in control_tokens]
    _ctrl = "<|im_start|>" if "<|im_start|>" in _names else (_names[0] if _names else None)
    if _ctrl is None:
        _demo = mo.md("This vocabulary has no control tokens.")
        control_demo = None
    else:
        _after = "user\nhello" if _ctrl == "<|im_start|>" else "hello"
        _whole = tok.encode(_ctrl + _after)
        _broken = tok.encode(_ctrl[:-1] + " " + _after)  # one character short of the special string: plain text
        control_demo = {"text": _ctrl, "ids": _whole, "single": tok.piece(_whole[0]) == _ctrl}
        _demo = mo.vstack([
            mo.md(f"`{visible(_ctrl + _after)}` → ids `{_whole}`: the control string is **one token** (id {_whole[0]}), "
                  f"never split. Drop its last character and it is ordinary text again: `{visible(_ctrl[:-1] + ' ' + _after)}` → "
                  f"{len(_broken)} tokens: " + " | ".join(f"`{visible(tok.piece(i))}`" for i in _broken)),
        ])
    _template = gguf.metadata.get("tokenizer.chat_template")
    mo.vstack([
        mo.md(f"""
        **Control tokens.** Some vocabulary entries are not text at all but markers: end of text, the start and
        end of a chat turn. The tokenizer matches their exact strings before anything else and gives each one id.
        This vocabulary has {len(control_tokens)}: {", ".join(f"`{p}` ({i})" for i, p in control_tokens) or "none"}.
        Generation stops at any of the end-of-generation ids {sorted(tok.eos_ids)} (llama.cpp's set).
        """),
        _demo,
        mo.md(f"The file's chat template, which wraps each turn in these markers:\n```jinja\n{_template}\n```")
        if _template else mo.md("The file carries no chat template."),
        mo.accordion({"Every non-normal token": pl.DataFrame(
            {"id": [i for i, _ in control_tokens], "piece": [p for _, p in control_tokens],
             "kind": [KINDS[3]] * len(control_tokens)})}),
    ])
    return control_demo, control_tokens


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 3 · One decode step by hand

    Now the whole forward pass for **one token at one position**, written out with the engine's own
    building blocks — `rms_norm`, the fused `layer.wqkv` matrix, `apply_rope` with `model.rope_table`,
    `KVCache.write`, `grouped_attention`, the router and the experts — over a KV cache that the engine's
    `model.forward` filled with the positions before it (the *prefill*). At the end we ask `model.forward`
    for the same step and compare the logits.

    ```text
    id ─► embedding ─► [ RMSNorm ─► Q K V ─► QK-norm ─► RoPE ─► attention over the cache ─► + ]   × layers
                       [ RMSNorm ─► router ─► top-k experts (SwiGLU) ─► weighted sum       ─► + ]
                    ─► final RMSNorm ─► output matrix ─► logits ─► next token
    ```
    Choose which prompt position to decode (by default the last one, so the result is the first generated
    token), and which layer and head the charts below show.
    """)
    return


@app.cell
def _(breaks_that_apply, cfg, ids, mo):
    hand_break = mo.ui.dropdown(options=["none", *breaks_that_apply(cfg)], value="none", label="put a bug into this step")
    hand_pos = mo.ui.slider(start=0, stop=max(len(ids) - 1, 1), value=len(ids) - 1, label="position decoded by hand", show_value=True)
    hand_layer = mo.ui.slider(start=0, stop=max(cfg.n_layers - 1, 1), value=0, label="layer", show_value=True)
    hand_head = mo.ui.slider(start=0, stop=max(cfg.n_heads - 1, 1), value=0, label="query head", show_value=True)
    mo.vstack([
        mo.hstack([hand_pos, hand_layer, hand_head], justify="start", wrap=True),
        mo.hstack([hand_break, mo.md("— one of section 8's bugs, written into the step below: the attention "
                                     "pattern and the next-token chart then show what it does, beside the clean step.")],
                  justify="start"),
    ])
    return hand_break, hand_head, hand_layer, hand_pos


@app.cell
def _(F, apply_rope, break_config, cfg, grouped_attention, hand_break, hand_pos, ids, model, rms_norm, torch):
    # --- the decode step, by hand -------------------------------------------------------------------------
    def decode_by_hand(pos, breaks=frozenset()):
        """The next-token logits after position `pos`, one op at a time, with the engine's KV cache of the
        positions before it. `breaks`: the bugs of section 8 written in (as the engine's own switches do)."""
        c = break_config(cfg, breaks)  # the config with the config-shaped bugs in it (QK-norm off, RoPE, scale…)
        W, eps = model.weights, c.rms_eps
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        layers = []  # per layer: the intermediate tensors, for the charts below
        with torch.inference_mode():
            cache = model.new_cache(pos + 1)
            if pos > 0:  # prefill: the engine writes K and V of positions 0 … pos-1 into the cache
                model.forward(torch.tensor(ids[:pos]), 0, cache, last_only=True, breaks=breaks)
            x = W.embed(torch.tensor([ids[pos]])) * c.embed_scale  # [1, hidden]
            embedding = x
            for i, layer in enumerate(W.layers):
                r = {"resid_in": x}
                # attention: norm → one fused matmul for Q, K and V → split into heads
                h = rms_norm(x, layer.attn_norm, eps)
                qkv = h @ layer.wqkv
                if layer.bqkv is not None:
                    qkv = qkv + layer.bqkv
                q = qkv[:, :q_dim].view(1, c.n_heads, c.head_dim)
                k = qkv[:, q_dim:q_dim + kv_dim].view(1, c.n_kv_heads, c.head_dim)
                v = qkv[:, q_dim + kv_dim:].view(1, c.n_kv_heads, c.head_dim)
                # per-head QK-norm: each head's vector is RMS-normalised on its own, with a learned weight
                q_n, k_n = (rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)) if c.qk_norm else (q, k)
                # RoPE: rotate pairs of dims by angles that depend on the position
                cos, sin = model.rope_table(c.layer_rope_base(i), c.layer_rope_scale(i), pos + 1, c.rope_style, c.rope_dim)
                q_r = apply_rope(q_n, cos[pos:pos + 1], sin[pos:pos + 1], c.rope_style)
                k_r = apply_rope(k_n, cos[pos:pos + 1], sin[pos:pos + 1], c.rope_style)
                # the cache: store this position's K, V; get back every position's
                keys, values = cache.write(i, pos, k_r, v)  # [kv_heads, pos+1, head_dim]
                if "cache-off-by-one" in breaks and pos > 0:  # the bug: the step does not see its own key
                    keys, values = keys[:, :pos], values[:, :pos]
                att = grouped_attention(q_r, keys, values, None, c.attn_scale)  # [1, heads, head_dim]
                x = x + att.reshape(1, q_dim) @ layer.wo
                # mixture of experts: norm → router → softmax → top-k → renormalise → weighted experts
                h2 = rms_norm(x, layer.ffn_norm, eps)
                router_logits = (h2 @ layer.router).float()[0]  # [n_experts]
                router_probs = torch.softmax(router_logits, -1)
                top_p, top_e = router_probs.topk(c.n_experts_used)
                top_w = top_p / top_p.sum() if c.norm_topk else top_p
                if "moe-as-dense" in breaks:  # the bug: no router, expert 0 alone
                    top_e, top_w = torch.tensor([0]), torch.tensor([1.0])
                moe_out = torch.zeros_like(h2)
                for e, wt in zip(top_e.tolist(), top_w.tolist()):
                    gate, up = (h2 @ layer.experts.gate_up[e]).chunk(2, dim=-1)  # SwiGLU expert e
                    moe_out = moe_out + wt * ((F.silu(gate) * up) @ layer.experts.down[e])
                x = x + moe_out
                r.update(h=h, q=q, k=k, v=v, q_normed=q_n, k_normed=k_n, q_rope=q_r, k_rope=k_r, keys=keys, values=values,
                         att=att, h2=h2, router_logits=router_logits, router_probs=router_probs, top_e=top_e, top_p=top_p,
                         top_w=top_w, moe_out=moe_out, resid_post=x)
                layers.append(r)
            logits = (rms_norm(x, W.output_norm, eps) @ W.output).float()[0]  # [vocab]
        return layers, embedding, logits, c

    pos = min(hand_pos.value, len(ids) - 1)  # the position whose next token we compute
    hand_breaks = frozenset() if hand_break.value == "none" else frozenset({hand_break.value})
    hand, embedding, hand_logits, hand_cfg = decode_by_hand(pos, hand_breaks)
    hand_next = int(hand_logits.argmax())
    return decode_by_hand, embedding, hand, hand_breaks, hand_cfg, hand_logits, hand_next, pos


@app.cell
def _(decode_by_hand, hand, hand_breaks, hand_logits, pos):
    # The clean step, beside a broken one (the very same step when no bug is on).
    clean_hand, _, clean_logits, _ = decode_by_hand(pos) if hand_breaks else (hand, None, hand_logits, None)
    return clean_hand, clean_logits


@app.cell
def _(cfg, embedding, hand, ids, mo, pos, tok, visible):
    _h0 = hand[0]
    _group = cfg.n_heads // cfg.n_kv_heads
    mo.md(f"""
    **Embedding.** Token `{visible(tok.piece(ids[pos]))}` (id {ids[pos]}) at position {pos} is row {ids[pos]} of
    the embedding matrix: a vector of {cfg.hidden} numbers (RMS {float(embedding.pow(2).mean().sqrt()):.4f}).
    This vector — the *residual stream* — is what every block reads from and adds to.

    **RMSNorm** divides a vector by its root-mean-square and multiplies by a learned weight, so each block sees
    inputs of a fixed scale: RMS {float(_h0['resid_in'].pow(2).mean().sqrt()):.4f} → {float(_h0['h'].pow(2).mean().sqrt()):.4f}
    at layer 0.

    **Q, K, V.** One matmul with `layer.wqkv` [{cfg.hidden} × {(cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim}]
    gives {cfg.n_heads} query heads, {cfg.n_kv_heads} key heads and {cfg.n_kv_heads} value heads of {cfg.head_dim}
    dims each, side by side. Fewer K/V heads than query heads is **grouped-query attention** (GQA): query heads
    {", ".join(f"{g * _group}…{g * _group + _group - 1} → KV head {g}" for g in range(cfg.n_kv_heads))}. It divides
    the KV cache by {_group} (section 4).
    """)
    return


@app.cell
def _(alt, cfg, hand, hand_layer, lessons, mo, pl):
    qk_rms = lessons.qk_rms(hand[hand_layer.value], cfg.n_heads, cfg.n_kv_heads)
    _charts = [
        alt.Chart(qk_rms.filter(pl.col("tensor") == _name)).mark_bar().encode(
            x=alt.X("head:O"), xOffset=alt.XOffset("stage:N", sort=["pre", "post"]), y=alt.Y("rms:Q", title="RMS"),
            color=alt.Color("stage:N", sort=["pre", "post"], scale=alt.Scale(domain=["pre", "post"], range=["#bbbbbb", "#4c78a8"])),
            tooltip=["tensor", "stage", "head", alt.Tooltip("rms:Q", format=".4f")],
        ).properties(width=28 * _n, height=160, title=f"{_name}: {_n} heads")
        for _name, _n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads))
    ]
    _chart = alt.hconcat(*_charts).resolve_scale(y="shared").properties(
        title=f"layer {hand_layer.value}: per-head RMS before / after QK-norm")
    mo.vstack([
        mo.md(r"""
        **Per-head QK-norm** (Qwen3, Gemma3): every query and key head is RMS-normalised on its own
        (`rms_norm(q, layer.q_norm, eps)` on a [1, heads, head_dim] tensor normalises the last dim, one head at
        a time) before RoPE. Before the norm, head sizes vary with the input; after it, every head has been
        scaled to RMS 1 and multiplied by the learned per-dim weight, so its size no longer depends on how large
        the input was — which keeps the attention scores q·k in a bounded range. An engine that forgets it
        still runs, and writes different text (section 8).
        """),
        _chart,
    ])
    return (qk_rms,)


@app.cell
def _(alt, hand_layer, ids, lessons, mo, model, pl):
    # The claim above needs a view across positions: one forward over the whole prompt, q and k captured before
    # and after the norm at every position.
    qk_positions = lessons.qk_norm_across_positions(model, ids)
    qk_spread = lessons.qk_norm_spread(qk_positions)
    _layer = qk_positions.filter(pl.col("layer") == hand_layer.value)
    _dots = alt.Chart(_layer).mark_tick(thickness=1.5, opacity=0.6).encode(
        x=alt.X("head:O"), y=alt.Y("rms:Q", title="RMS of the head's vector"),
        color=alt.Color("stage:N", sort=["pre", "post"], scale=alt.Scale(domain=["pre", "post"], range=["#bbbbbb", "#4c78a8"])),
        xOffset=alt.XOffset("stage:N", sort=["pre", "post"]),
        tooltip=["tensor", "stage", "head", "position", alt.Tooltip("rms:Q", format=".4f")],
    ).properties(width=300, height=200).facet(column=alt.Column("tensor:N", sort=["q", "k"], title=None)).resolve_scale(
        x="independent").properties(
        title=f"layer {hand_layer.value}: each head's size at each of the {len(ids)} prompt positions (one tick each)")
    _row = {(r["tensor"], r["stage"]): r for r in qk_spread.iter_rows(named=True)}
    mo.vstack([
        mo.md(f"""
        **Across positions.** One token cannot show that the norm makes a head's size independent of the input:
        here are all {len(ids)} prompt positions at once (one forward, the engine's probe). Before the norm, q's
        head sizes range over **{_row[('q', 'pre')]['min']:.2f}–{_row[('q', 'pre')]['max']:.2f}** (×{_row[('q', 'pre')]['spread']:.1f})
        across positions, heads and layers; after it, **{_row[('q', 'post')]['min']:.2f}–{_row[('q', 'post')]['max']:.2f}**
        (×{_row[('q', 'post')]['spread']:.1f}) — what is left is the learned weight, the same at every position.
        For k: {_row[('k', 'pre')]['min']:.2f}–{_row[('k', 'pre')]['max']:.2f} before,
        {_row[('k', 'post')]['min']:.2f}–{_row[('k', 'post')]['max']:.2f} after.
        """),
        _dots,
    ])
    return qk_positions, qk_spread


@app.cell
def _(cfg, mo):
    # Of their own (no position, no layer): moving the sliders of section 3 leaves these where they are.
    rope_pos = mo.ui.slider(start=0, stop=cfg.context_length - 1, value=12, label="RoPE position", show_value=True)
    rope_pairs = mo.ui.slider(start=2, stop=max(cfg.rope_dim // 2, 3), value=min(4, cfg.rope_dim // 2), label="pairs drawn", show_value=True)
    mo.vstack([
        mo.md(f"""
        **RoPE** (rotary position embedding) tells attention where each token is, by rotating the query and key
        vectors: the {cfg.rope_dim} dims of a head form {cfg.rope_dim // 2} *pairs*, and pair i turns by the
        angle position × base^(−2i/{cfg.rope_dim}) (base {cfg.rope_base:g} here). The dot product of a rotated
        query and a rotated key then depends only on how far apart their positions are. Which dims form a pair
        is the **style**: *neox* pairs dim i with dim i + {cfg.rope_dim // 2} (split halves: Qwen, Gemma);
        *normal* pairs 2i with 2i+1 (adjacent: GGUF llama files). This model uses **{cfg.rope_style}**.
        Below, one query head (layer and head from the sliders above, after QK-norm) rotated both ways by
        `apply_rope`, with tables from `model.rope_table(base, scale, n, style)`. Slide the position: the
        fast pairs (small i) spin, the slow ones barely move.
        """),
        mo.hstack([rope_pos, rope_pairs], justify="start"),
    ])
    return rope_pairs, rope_pos


@app.cell
def _(cfg, hand, hand_head, hand_layer, lessons, model, rope_pairs, rope_pos):
    rope_vec = hand[hand_layer.value]["q_normed"][0, hand_head.value]  # one head, [head_dim]
    rotated, rope_angles = lessons.rope_turns(model, rope_vec, rope_pos.value, cfg.layer_rope_base(hand_layer.value),
                                              cfg.layer_rope_scale(hand_layer.value), cfg.rope_dim)
    rope_rows = lessons.rope_points(rope_angles, rope_pairs.value)
    return rope_angles, rope_rows, rope_vec, rotated


@app.cell
def _(alt, rope_pairs, rope_pos, rope_rows):
    _tooltip = ["pair", "dims", "when", alt.Tooltip("x:Q", format=".3f"), alt.Tooltip("y:Q", format=".3f")]
    _spokes = alt.Chart(rope_rows).mark_rule(strokeWidth=2).encode(
        x=alt.X("o:Q", title="first dim of the pair"), y=alt.Y("o:Q", title="second dim"), x2="x:Q", y2="y:Q",
        color=alt.Color("pair:N", scale=alt.Scale(scheme="category10")),
        strokeDash=alt.StrokeDash("when:N", sort=["after", "before"]), tooltip=_tooltip)
    _dots = alt.Chart(rope_rows).mark_point(filled=True, size=50).encode(
        x="x:Q", y="y:Q", color="pair:N", shape=alt.Shape("when:N", sort=["before", "after"]), tooltip=_tooltip)
    rope_planes = alt.layer(_spokes, _dots).properties(width=230, height=230).facet(
        column=alt.Column("style:N", sort=["neox", "normal"], title=None)).properties(
        title=f"the first {rope_pairs.value} pairs at position {rope_pos.value}, before (dashed) and after the "
              "rotation (hover for the dims)")
    return (rope_planes,)


@app.cell
def _(alt, cfg, hand, hand_head, hand_layer, lessons, mo, model, pl, rope_angles, rope_planes, rope_pos, rope_vec, rotated):
    # The angles unwrapped: measured at every position 0 … p and followed round, so a fast pair that has turned
    # several times shows its whole angle (mod 2π it would look like a slow one).
    _base, _scale = cfg.layer_rope_base(hand_layer.value), cfg.layer_rope_scale(hand_layer.value)
    rope_total = lessons.rope_unwrapped(model, rope_vec, rope_pos.value, _base, _scale, cfg.rope_dim, cfg.rope_style)
    _angles = alt.Chart(rope_total).mark_point(filled=True).encode(
        x=alt.X("pair:Q", title="pair i"), y=alt.Y("measured:Q", title="angle turned so far (rad, unwrapped)"),
        tooltip=["pair", alt.Tooltip("measured:Q", format=".4f"), alt.Tooltip("formula:Q", format=".4f")],
    ) + alt.Chart(rope_total).mark_line(color="#999", strokeDash=[3, 3]).encode(x="pair:Q", y="formula:Q")
    _p = rope_pos.value
    _style_gap = float((rotated["neox"] - rotated["normal"]).abs().max())
    _norm_kept = float((rotated[cfg.rope_style].norm() - rope_vec.norm()).abs())
    _unwrap_error = float((rope_total["measured"] - rope_total["formula"]).abs().max())
    # relative position: q at m + d against k at m gives the same score whatever m is
    rope_relative = lessons.rope_relative_check(model, rope_vec, hand[hand_layer.value]["k_normed"][0, hand_head.value // (cfg.n_heads // cfg.n_kv_heads)],
                                                _base, _scale, cfg.rope_style)
    _rel = rope_relative.group_by("offset").agg(pl.col("dot").min().alias("lo"), pl.col("dot").max().alias("hi")).sort("offset")
    _rel_text = "; ".join(f"offset {r['offset']}: {r['lo']:.4f} … {r['hi']:.4f}" for r in _rel.iter_rows(named=True))
    mo.vstack([
        rope_planes,
        _angles.properties(width=480, height=180, title=f"angle each pair has turned at position {_p}: measured from apply_rope (points) vs the formula (dashed)"),
        mo.md(f"""
        Pair 0 turns by 1 radian per position, so at position {_p} it has gone round {_p / 6.283:.1f} times; the last
        pairs have barely moved. Measured from `apply_rope`'s output position by position and followed round,
        every pair's angle is the formula's to {_unwrap_error:.1e} rad. Both styles turn pair i by the same angle
        (mod 2π: {lessons.angle_error(rope_angles):.1e} rad) and keep the vector's length (|Δ norm| = {_norm_kept:.1e}).
        What differs is *which dims* are paired, so the two results differ as vectors: max |neox − normal| =
        **{_style_gap:.4f}** at position {_p}
        {"(position 0 is not rotated at all, so the styles agree there — a style bug hides at position 0)" if _p == 0 else "(move the slider to 0: there the styles agree, which is why a style bug hides in a one-token test)"}.

        **Only the distance counts.** The score of this query head against its key head, q rotated to position
        m + d and k to position m, for three starts m: {_rel_text}. The same number for a given offset d, whatever
        m is (to rounding): attention sees how far apart two tokens are, not where they are.
        """),
    ])
    return rope_relative, rope_total


@app.cell
def _(alt, cfg, clean_hand, hand, hand_breaks, hand_cfg, hand_head, hand_layer, lessons, mo, pieces, pl, pos):
    _group = cfg.n_heads // cfg.n_kv_heads
    # The pattern grouped_attention does not return, recomputed from the same tensors; _check: how well it
    # reproduces grouped_attention's output.
    attention_pattern, _check = lessons.attention_pattern(hand[hand_layer.value], _group, hand_cfg.attn_scale, pieces)
    _n_keys = int(hand[hand_layer.value]["keys"].shape[1])
    if hand_breaks:  # the clean step's weights beside the broken step's, for the picked head
        _clean, _ = lessons.attention_pattern(clean_hand[hand_layer.value], _group, cfg.attn_scale, pieces)
        _both = pl.concat([attention_pattern.with_columns(pl.lit(f"with {next(iter(hand_breaks))}").alias("step")),
                           _clean.with_columns(pl.lit("clean").alias("step"))])
    else:
        _both = attention_pattern.with_columns(pl.lit("clean").alias("step"))
    # each key labelled with its position and token
    _labelled = attention_pattern.with_columns(
        (pl.col("key position").cast(pl.Utf8) + " " + pl.col("piece").str.slice(0, 10)).alias("key"))
    _order = _labelled.sort("key position")["key"].unique(maintain_order=True).to_list()
    _key_x = alt.X("key:O", sort=_order, title="key: position and token", axis=alt.Axis(labelAngle=-60, labelFontSize=9))
    _heat = alt.Chart(_labelled).mark_rect().encode(
        x=_key_x, y=alt.Y("head:O"), color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues")),
        tooltip=["head", "key position", "piece", alt.Tooltip("weight:Q", format=".3f")],
    ).properties(width=min(24 * (pos + 1), 640), height=22 * cfg.n_heads,
                 title=f"layer {hand_layer.value}: how much each query head reads from each cached position")
    _both = _both.with_columns((pl.col("key position").cast(pl.Utf8) + " " + pl.col("piece").str.slice(0, 10)).alias("key"))
    _steps = ["clean", *(f"with {b}" for b in hand_breaks)]  # clean blue, the bug red
    _sel = alt.Chart(_both.filter(pl.col("head") == hand_head.value)).mark_bar().encode(
        x=_key_x, xOffset=alt.XOffset("step:N", sort=_steps), y=alt.Y("weight:Q"),
        color=alt.Color("step:N", scale=alt.Scale(domain=_steps, range=["#4c78a8", "#e45756"]), title=None),
        tooltip=["step", "key position", "piece", alt.Tooltip("weight:Q", format=".3f")],
    ).properties(width=min(24 * (pos + 1), 640), height=120, title=f"head {hand_head.value} (reads KV head {hand_head.value // _group})")
    mo.vstack([
        mo.md(f"""
        **Attention over the cache.** The new query (one row per head) is compared with the {pos + 1} keys in the
        cache — {pos} written by the prefill, plus the one just written for position {pos} — scaled by
        {cfg.attn_scale:.4f} (= 1/√head_dim), softmaxed into weights, and used to average the cached values.
        {f"With the bug on, this step read {_n_keys} keys with a scale of {hand_cfg.attn_scale:.4f}: the red bars below are its weights, the blue ones the clean step's." if hand_breaks else ""}
        `grouped_attention` does it for all heads at once, each group of {_group} query heads against its shared KV
        head without copying it. The weights drawn here, recomputed from the same tensors, reproduce its output to
        {_check:.1e}.
        """),
        _heat, _sel,
    ])
    return (attention_pattern,)


@app.cell
def _(alt, cfg, hand, hand_layer, mo, pl):
    _r = hand[hand_layer.value]
    _chosen = dict(zip(_r["top_e"].tolist(), _r["top_w"].tolist()))
    routing_probs = pl.DataFrame({
        "expert": list(range(cfg.n_experts)), "probability": _r["router_probs"].tolist(),
        "chosen": [e in _chosen for e in range(cfg.n_experts)],
        "weight after renormalising": [_chosen.get(e, 0.0) for e in range(cfg.n_experts)],
    })
    _bars = alt.Chart(routing_probs).mark_bar().encode(
        x=alt.X("expert:O"), y=alt.Y("probability:Q", title="router probability"),
        color=alt.Color("chosen:N", scale=alt.Scale(domain=[True, False], range=["#e45756", "#bbbbbb"]), title=f"top-{cfg.n_experts_used}"),
        tooltip=["expert", alt.Tooltip("probability:Q", format=".4f"), alt.Tooltip("weight after renormalising:Q", format=".4f")],
    )
    _text = alt.Chart(routing_probs.filter(pl.col("chosen"))).mark_text(dy=-8, color="#e45756").encode(
        x="expert:O", y="probability:Q", text=alt.Text("weight after renormalising:Q", format=".2f"))
    _sum = float(_r["top_p"].sum())
    mo.vstack([
        mo.md(f"""
        **Mixture of experts.** After attention, the block's feed-forward part is not one network but
        {cfg.n_experts} small ones (*experts*). A linear **router** scores them, softmax turns the scores into
        probabilities, the **top {cfg.n_experts_used}** are kept, and {"their probabilities are **renormalised** to sum to 1 (Qwen3-MoE does)" if cfg.norm_topk else "their probabilities are used as they are"}.
        Only those experts run; their SwiGLU outputs are summed with those weights. At layer {hand_layer.value} the
        chosen experts hold {_sum:.3f} of the probability; the labels are the weights after renormalising.
        """),
        (_bars + _text).properties(width=420, height=180, title=f"layer {hand_layer.value}: router probabilities (labels: final weights)"),
    ])
    return (routing_probs,)


@app.cell
def _(alt, clean_logits, hand_breaks, hand_logits, hand_next, mo, pl, pos, tok, torch, visible):
    _probs = torch.softmax(hand_logits, -1)
    _p, _i = _probs.topk(10)
    next_candidates = pl.DataFrame({"id": _i.tolist(), "piece": [visible(tok.piece(t)) for t in _i.tolist()],
                                    "logit": hand_logits[_i].tolist(), "probability": _p.tolist()})
    _steps = ["clean", *(f"with {b}" for b in hand_breaks)]  # clean blue, the bug red
    _rows = next_candidates.with_columns(pl.lit(_steps[-1]).alias("step"))
    if hand_breaks:  # the same tokens' probabilities in the clean step
        _clean = torch.softmax(clean_logits, -1)
        _rows = pl.concat([_rows, next_candidates.with_columns(pl.Series("probability", _clean[_i].tolist()),
                                                               pl.Series("logit", clean_logits[_i].tolist()),
                                                               pl.lit("clean").alias("step"))])
    _chart = alt.Chart(_rows).mark_bar().encode(
        y=alt.Y("piece:N", sort=None, title=None), x=alt.X("probability:Q"), yOffset=alt.YOffset("step:N", sort=_steps),
        color=alt.Color("step:N", scale=alt.Scale(domain=_steps, range=["#4c78a8", "#e45756"]) if hand_breaks else
                        alt.Scale(domain=_steps, range=["#4c78a8"]), title=None),
        tooltip=["step", "id", "piece", alt.Tooltip("logit:Q", format=".3f"), alt.Tooltip("probability:Q", format=".4f")],
    ).properties(width=380, height=260, title=f"the 10 most likely tokens after position {pos}"
                 + (" with the bug (red); blue: the clean step's probability for the same tokens" if hand_breaks else ""))
    mo.vstack([
        mo.md(f"""
        **Logits → the next token.** After the last block, a final RMSNorm and the output matrix
        [{hand_logits.numel()} rows] give one logit per vocabulary entry; softmax makes them probabilities.
        Greedy decoding takes the largest: **`{visible(tok.piece(hand_next))}`** (id {hand_next},
        p = {float(_probs[hand_next]):.3f}). Sampling would draw from these probabilities instead.
        """),
        _chart,
    ])
    return (next_candidates,)


@app.cell
def _(hand, hand_breaks, hand_logits, ids, lessons, model, pos, torch):
    # --- the same step through the engine ----------------------------------------------------------------
    captured = {}

    def capture(name, tensor):  # a probe: model.forward calls it at every named capture point
        captured[name] = tensor.clone()

    _cache = model.new_cache(pos + 1)  # the engine with the same bug switched on (section 8), if one is
    if pos > 0:
        model.forward(torch.tensor(ids[:pos]), 0, _cache, last_only=True, breaks=hand_breaks)
    engine_logits = model.forward(torch.tensor(ids[pos:pos + 1]), pos, _cache, probe=capture, breaks=hand_breaks)[-1]
    # ... and the uncached way: the whole sequence from scratch, its last row
    full_logits = model.forward(torch.tensor(ids[:pos + 1]), 0, model.new_cache(pos + 1), last_only=True, breaks=hand_breaks)[-1]
    by_hand_vs_cached = float((hand_logits - engine_logits).abs().max())
    by_hand_vs_uncached = float((hand_logits - full_logits).abs().max())
    by_hand_max_diff = max(by_hand_vs_cached, by_hand_vs_uncached)
    same_next_token = int(hand_logits.argmax()) == int(engine_logits.argmax()) == int(full_logits.argmax())

    probe_check = lessons.probe_check(model, hand, captured, hand_breaks)  # every capture point, Model.moe on our input
    return (by_hand_max_diff, by_hand_vs_cached, by_hand_vs_uncached, captured, engine_logits, full_logits, probe_check,
            same_next_token)


@app.cell
def _(by_hand_max_diff, by_hand_vs_cached, by_hand_vs_uncached, engine_logits, hand_breaks, mo, pos, probe_check,
      same_next_token):
    by_hand_relative = by_hand_max_diff / float(engine_logits.abs().max())
    _bug = next(iter(hand_breaks)) if hand_breaks else None
    mo.vstack([
        mo.callout(mo.md(
            f"**`{_bug}` is on**, here and in the engine: the by-hand step and the engine's cached step, both with the "
            f"bug, agree to {by_hand_vs_cached:.1e}." + (
                f" The uncached path differs by {by_hand_vs_uncached:.2f}: this bug lives only in a cached decode step "
                "(an uncached forward sees every key), which is why cached ≢ uncached catches it."
                if _bug == "cache-off-by-one" and pos > 0 else
                " So does the uncached path: the bug is in both, and no comparison of the two can see it.")), kind="warn")
        if _bug else mo.md(""),
        mo.md(f"""
        **Check against the engine.** The engine runs the same step with `model.forward(token, pos, cache,
        probe=capture)` on a cache it prefilled itself, and once more uncached (the whole sequence from
        position 0, one batched forward). Largest difference between our logits and the engine's:
        **max |Δ| = {by_hand_max_diff:.2e}** (cached step: {by_hand_vs_cached:.1e}, uncached: {by_hand_vs_uncached:.1e})
        against max |logit| = {float(engine_logits.abs().max()):.3f}: **{by_hand_relative:.1e} of the largest
        logit**; same next token: **{same_next_token}**. That is float32 rounding, not a different computation:
        a float32 number carries about 7 significant digits (its relative step is 1.2e-7), every logit is the
        end of a chain of sums of hundreds of products, and a batched forward adds the same products in
        another order — differences of a few 1e-7 to 1e-6 *relative* to the numbers involved, which is what
        is measured here. A real bug shows as 1e-2 or more (section 8).

        The probe hands us the engine's tensors at its named capture points (TransformerLens-style names, the
        ones the app's panels and the Parquet traces are built from), so each stage can be compared on its own:
        """),
        mo.ui.table(probe_check, selection=None, page_size=probe_check.height),
    ])
    return (by_hand_relative,)


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ### QK-norm over the whole projection

    Above, each head of q and k is normed on its own (Qwen3, Gemma3: a weight of head_dim values), so after the
    norm every head's size is its weight's, whatever the input. OLMoE (`olmoe` in GGUF) norms the **whole
    projection** instead: one RMS over every value of a row of q (all heads together), with a weight of
    n_heads·head_dim values, before q is cut into heads. The whole row is divided by one number, so the heads keep
    their relative sizes and only their combined size is fixed. A port that reuses its per-head norm for OLMoE
    (the break `qk-norm-per-head`) forces every head to the same size instead, and nothing raises an error.
    Below, the bundled `tiny-olmoe`, whose weights are **random** (the numbers show the mechanism, not what
    training would make of it): one forward over a prompt with q captured before and after the norm
    (`blocks.{i}.attn.q`, `.attn.q_normed`), each head's RMS after the norm ÷ the norm's weight (what the norm
    itself sets), normed as OLMoE norms it and head by head.
    """)
    return


@app.cell
def _(Model, lessons):
    # OLMoE's QK-norm on the bundled random tiny olmoe (its weights are noise; the norm is the architecture's).
    olmoe = Model.load("tiny-olmoe", device="cpu", weights="dequantized")
    OLMOE_STEPS = 8
    olmoe_ids = olmoe.tokenizer.encode("The history of the city begins with a small village on the river.")[:16]
    olmoe_heads = lessons.qk_norm_whole_vs_per_head(olmoe, olmoe_ids)
    olmoe_summary = lessons.qk_whole_summary(olmoe_heads)
    olmoe_breaks = lessons.break_effects(olmoe, olmoe_ids, OLMOE_STEPS, ["qk-norm-per-head"])
    return OLMOE_STEPS, olmoe, olmoe_breaks, olmoe_heads, olmoe_ids, olmoe_summary


@app.cell
def _(OLMOE_STEPS, alt, mo, olmoe, olmoe_breaks, olmoe_heads, olmoe_summary, pl):
    _c = olmoe.config
    _row = {r["norm"]: r for r in olmoe_summary.iter_rows(named=True)}
    _whole, _per = _row["whole"], _row["per head"]
    _moved = olmoe_breaks.filter(pl.col("break") == "qk-norm-per-head").row(0, named=True)
    _relative = "max change of the heads' relative sizes"
    _ticks = alt.Chart(olmoe_heads.filter(pl.col("layer") == 0)).mark_tick(thickness=1.5, opacity=0.6).encode(
        x=alt.X("head:O"), y=alt.Y("rms after ÷ weight:Q", title="head's RMS after the norm ÷ weight"),
        color=alt.Color("norm:N", sort=["whole", "per head"], legend=None,
                        scale=alt.Scale(domain=["whole", "per head"], range=["#4c78a8", "#e45756"])),
        tooltip=["norm", "head", "position", alt.Tooltip("rms before:Q", format=".3f"),
                 alt.Tooltip("rms after:Q", format=".3f"), alt.Tooltip("rms after ÷ weight:Q", format=".4f")],
    ).properties(width=220, height=200).facet(column=alt.Column("norm:N", sort=["whole", "per head"], title=None)).properties(
        title=f"tiny-olmoe, layer 0: each head of q after the norm ÷ weight, at each of the "
              f"{olmoe_heads['position'].n_unique()} positions (one tick each)")
    _tokens = ("the same greedy tokens" if _moved["tokens differ from step"] is None
               else f"other greedy tokens from step {_moved['tokens differ from step']}")
    mo.vstack([
        mo.md(f"""
        Normed as OLMoE norms it ({_c.n_heads} heads × {_c.head_dim} = {_c.n_heads * _c.head_dim} values under one RMS),
        a head's RMS ÷ weight ranges over **{_whole['head RMS ÷ weight, min']:.2f}–{_whole['head RMS ÷ weight, max']:.2f}**
        across layers, positions and heads: the heads keep their relative sizes (to {_whole[_relative]:.0e}), and only
        each row's combined RMS ÷ weight is 1 (to {_whole['max |row RMS ÷ weight − 1|']:.0e}). Normed head by head,
        every head is forced to **{_per['head RMS ÷ weight, min']:.3f}–{_per['head RMS ÷ weight, max']:.3f}**, and the
        heads' relative sizes change by up to {_per[_relative]:.0%}. The attention then weighs heads it should not:
        on the clean run's tokens `qk-norm-per-head` moves the logits by **{_moved['relative max |Δlogit|']:.2f}** of the
        largest logit, the top token changes at {_moved['top token changes at']} of {_moved['of positions']} positions,
        and decoding {OLMOE_STEPS} tokens gives {_tokens}. The trace's `qk` frame (per-head RMS before and after the
        norm, the app's QK-norm panel) shows the same for an olmoe run.
        """),
        _ticks,
        olmoe_summary.with_columns(pl.exclude("norm").round(6)),
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 4 · The KV cache

    Look back at the attention step: the new query needed the **keys and values of every earlier position**.
    Those depend only on the earlier tokens, which never change — so instead of recomputing them at every
    step, an engine computes each position's K and V once and keeps them: the **KV cache**. A decode step then
    pushes only the newest token through the model and appends one row per layer to the cache.

    `workbench.cache.KVCache` preallocates, per layer, K and V as [KV heads × capacity × head_dim] and writes
    them by position. Its size per token is fixed by the config:
    """)
    return


@app.cell
def _(Session, cfg, ids, mo, model, pl):
    KV_STEPS = 24  # decoded on open; Step and Step ×8 below add more, up to KV_MORE
    KV_MORE = 200
    _element = model.weights.layers[0].wqkv.element_size()  # bytes per number in the cache: the compute dtype
    kv_bytes_per_token = cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * _element
    assert kv_bytes_per_token == cfg.kv_bytes_per_token(_element)
    kv_session = Session(model, ids, path="cached", context=min(cfg.context_length, len(ids) + KV_STEPS + KV_MORE))
    kv_rows = []  # one per step: positions held, bytes used, the formula's bytes

    def kv_step():
        kv_session.step()
        kv_rows.append({"positions": kv_session.cache.length, "bytes used": kv_session.cache.used_bytes,
                        "formula": kv_session.cache.length * kv_bytes_per_token})

    for _ in range(KV_STEPS):
        kv_step()
    kv_one, kv_eight = mo.ui.run_button(label="Step"), mo.ui.run_button(label="Step ×8")
    return KV_STEPS, kv_bytes_per_token, kv_eight, kv_one, kv_rows, kv_session, kv_step


@app.cell
def _(charts, ids, kv_eight, kv_one, kv_rows, kv_session, kv_step, mo, pl):
    # Step and Step ×8: the same session goes on, one token (one position per layer) at a time.
    _want = 1 if kv_one.value else 8 if kv_eight.value else 0
    _room = kv_session.capacity - len(kv_session.ids)
    for _ in range(min(_want, _room)):
        kv_step()
    kv_growth = pl.DataFrame(kv_rows)  # every step so far: the bytes held and the formula's
    kv_formula_holds = bool((kv_growth["bytes used"] == kv_growth["formula"]).all())
    _trace = kv_session.trace()
    _cache = kv_session.cache
    mo.vstack([
        mo.md(f"""
        {charts.kv_arithmetic(_trace.meta, _cache.length)}

        That is the arithmetic; the cache of a real run agrees. The prompt's {len(ids)} positions arrive at once
        (the prefill), then one per step: after {len(kv_rows)} steps the cache holds {_cache.length}
        positions = {_cache.used_bytes:,} bytes (formula holds at every step: **{kv_formula_holds}**)
        of the {_cache.capacity_bytes:,} bytes preallocated for its capacity of {_cache.capacity} positions.
        Layer 0's keys are a tensor of shape {list(_cache.keys[0].shape)} (KV heads × capacity × head_dim), of
        which the first {_cache.length} positions are written. Press **Step**: the newest token's K and V go in at
        position {_cache.length}, one row per layer and KV head; nothing before it is recomputed.
        """),
        mo.hstack([kv_one, kv_eight], justify="start"),
        mo.hstack([charts.kv_growth(_trace.kv, _trace.meta["primary_path"]), charts.kv_positions(_trace.kv, _trace.meta["primary_path"])],
                  justify="start", wrap=True),
        mo.md(f"_The cache is full ({_cache.capacity} positions): edit the prompt to start again._") if _room <= 0 else mo.md(""),
    ])
    return kv_formula_holds, kv_growth


@app.cell
def _(mo):
    kv_context = mo.ui.slider(steps=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], value=32768,
                              label="context (tokens)", show_value=True)
    kv_context
    return (kv_context,)


@app.cell
def _(alt, kv_context, mo, pl):
    # Qwen3-30B-A3B's published config: 48 layers, 32 query heads, 4 KV heads, head_dim 128; the cache in bf16.
    Q30 = {"layers": 48, "heads": 32, "kv_heads": 4, "head_dim": 128, "bytes": 2}
    qwen3_30b_kv_bytes_per_token = Q30["layers"] * Q30["kv_heads"] * Q30["head_dim"] * 2 * Q30["bytes"]
    qwen3_30b_kv_bytes_32k = qwen3_30b_kv_bytes_per_token * 32768
    _n = kv_context.value
    _at_n = qwen3_30b_kv_bytes_per_token * _n
    _no_gqa = _at_n * Q30["heads"] // Q30["kv_heads"]
    _rows = [{"context": c, "cache": label, "GiB": c * per / 2**30}
             for c in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
             for label, per in (("GQA: 4 KV heads (as built)", qwen3_30b_kv_bytes_per_token),
                                ("one KV head per query head (32)", qwen3_30b_kv_bytes_per_token * Q30["heads"] // Q30["kv_heads"]))]
    _chart = alt.Chart(pl.DataFrame(_rows)).mark_line(point=True).encode(
        x=alt.X("context:Q", scale=alt.Scale(type="log", base=2), title="context (tokens)"),
        y=alt.Y("GiB:Q", scale=alt.Scale(type="log"), title="KV cache, GiB (bf16)"), color=alt.Color("cache:N", title=None),
        tooltip=["context", "cache", alt.Tooltip("GiB:Q", format=".2f")],
    ).properties(width=420, height=200, title="Qwen3-30B-A3B: KV cache size by context length")
    mo.vstack([
        mo.md(f"""
        **At full size.** Qwen3-30B-A3B (published config: {Q30['layers']} layers, {Q30['kv_heads']} KV heads,
        head_dim {Q30['head_dim']}), cache in bf16 ({Q30['bytes']} bytes):
        {Q30['layers']} × {Q30['kv_heads']} × {Q30['head_dim']} × 2 × {Q30['bytes']} = **{qwen3_30b_kv_bytes_per_token:,} bytes
        per token** ({qwen3_30b_kv_bytes_per_token / 1024:.0f} KiB). A 32k context (32,768 tokens) takes
        **{qwen3_30b_kv_bytes_32k / 2**30:.2f} GiB**; at the slider's {_n:,} tokens, {_at_n / 2**30:.2f} GiB —
        and {_no_gqa / 2**30:.1f} GiB if each of its {Q30['heads']} query heads had its own K and V. The cache
        grows linearly with the context and, at long contexts, competes with the weights for memory: it is why
        GQA exists, and why engines quantize the cache.
        """),
        _chart,
    ])
    return Q30, qwen3_30b_kv_bytes_32k, qwen3_30b_kv_bytes_per_token


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ### Latent attention: what the cache holds

    GQA shrinks the cache by letting query heads share K and V. DeepSeek-V2 and V3 (`deepseek2` in GGUF) go
    further with **multi-head latent attention** (MLA): every head's K and V are made from one shared **latent**
    row per position (kv_lora_rank values: a down-projection of the token, normed) through two per-head
    matrices, `attn_k_b` and `attn_v_b`, and only the latent is cached, with one RoPE key of rope_dim values that
    every head shares (RoPE cannot be folded into the latent: its rotation depends on the position). Each head's
    q is split the same way: q_nope (the dims RoPE leaves alone) meets the latent's K, q_pe the shared RoPE key.
    An engine need not decompress K and V at all: q_nope · (attn_k_b · latent) = (q_nope · attn_k_b) · latent, so it
    takes q_nope into the latent space once ("absorbs" attn_k_b) and scores against the cached rows themselves;
    the output, a weighted sum of latents, goes through attn_v_b after. Below, the bundled `tiny-deepseek2`
    (V3's layout), whose weights are **random** (the numbers show the mechanism, not what training would make of
    it): a few decode steps with the cache's bytes from the session's `kv` frame, and attention computed both ways
    from the capture points `attn.q`, `.q_pe`, `.kv_latent` and `.k_pe`.
    """)
    return


@app.cell
def _(Model, lessons):
    # MLA on the bundled random tiny deepseek2 (its weights are noise; the cache's layout is the architecture's).
    deepseek = Model.load("tiny-deepseek2", device="cpu", weights="dequantized")
    MLA_STEPS = 8
    mla_ids = deepseek.tokenizer.encode("The history of the city begins with a small village on the river.")[:16]
    mla_trace = lessons.decode(deepseek, mla_ids, MLA_STEPS, path="cached").trace()
    mla_cache = lessons.latent_cache(mla_trace)
    mla_forms = lessons.latent_attention_forms(deepseek, mla_ids)
    mla_breaks = lessons.break_effects(deepseek, mla_ids, MLA_STEPS, ["skip-kv-a-norm"])
    return MLA_STEPS, deepseek, mla_breaks, mla_cache, mla_forms, mla_ids, mla_trace


@app.cell
def _(MLA_STEPS, charts, deepseek, mla_cache, mla_ids, mla_trace, mo, replace):
    _c = deepseek.config
    _last = mla_cache.row(-1, named=True)
    _element = mla_trace.meta["kv_element_size"]
    _nope = _c.head_dim - _c.rope_dim
    # DeepSeek-V3's published sizes through the engine's own formulas, the cache in bf16 (2 bytes)
    V3 = {"n_layers": 61, "n_heads": 128, "kv_lora_rank": 512, "rope_dim": 64, "head_dim": 128 + 64, "v_head_dim": 128}
    _v3 = replace(_c, **V3)
    v3_kv_bytes = {"MLA": _v3.kv_bytes_per_token(2), "MHA": _v3.mha_bytes_per_token(2)}
    _per_layer = {k: v // (2 * V3["n_layers"]) for k, v in v3_kv_bytes.items()}  # values per layer and token
    mo.vstack([
        mo.md(f"""
        **What the cache holds.** After the {len(mla_ids)} prompt positions and {MLA_STEPS} steps the cache holds
        {_last['positions']} positions in {_c.n_layers} layers, **{_last['cache bytes']:,} bytes** by the `kv` frame:
        **{_last['bytes per position and layer']:,.0f} B per position and layer**, one latent of {_c.kv_lora_rank} and one
        RoPE key of {_c.rope_dim} values, ({_c.kv_lora_rank} + {_c.rope_dim}) × {_element} bytes. An MHA cache of the
        same model would hold every head's K ({_c.head_dim} = {_nope} nope + {_c.rope_dim} rope) and V ({_c.v_head_dim}):
        {_c.n_heads} heads × ({_c.head_dim} + {_c.v_head_dim}) × {_element} bytes =
        **{_last['MHA bytes per position and layer']:,.0f} B** per position and layer,
        {_last['MHA bytes per position and layer'] / _last['bytes per position and layer']:.3g}× more ({_last['MHA bytes']:,} bytes
        here). The frame's V bytes are 0: V is read from the first {_c.kv_lora_rank} values of the same rows.

        **At full size.** DeepSeek-V3 (published config: {V3['n_layers']} layers, {V3['n_heads']} heads,
        kv_lora_rank {V3['kv_lora_rank']}, rope {V3['rope_dim']}, nope {V3['head_dim'] - V3['rope_dim']}, v_head_dim
        {V3['v_head_dim']}) caches {V3['kv_lora_rank']} + {V3['rope_dim']} = **{_per_layer['MLA']}** values per layer and
        token, where MHA would hold {V3['n_heads']} × ({V3['head_dim']} + {V3['v_head_dim']}) = **{_per_layer['MHA']:,}**:
        {_per_layer['MHA'] / _per_layer['MLA']:.1f}× fewer. In bf16 that is {v3_kv_bytes['MLA']:,} bytes per token
        ({v3_kv_bytes['MLA'] / 1024:.1f} KiB) against {v3_kv_bytes['MHA'] / 2**20:.2f} MiB, and a 32k context takes
        **{v3_kv_bytes['MLA'] * 32768 / 2**30:.2f} GiB** of latent cache where MHA would take
        {v3_kv_bytes['MHA'] * 32768 / 2**30:.0f} GiB (`ModelConfig.kv_bytes_per_token` and `mha_bytes_per_token` on
        V3's sizes): less than Qwen3-30B-A3B's GQA cache above, for a model over twenty times its size.
        """),
        charts.kv_growth(mla_trace.kv, "cached", mla_trace.meta["mha_bytes_per_token"]),
    ])
    return V3, v3_kv_bytes


@app.cell
def _(MLA_STEPS, deepseek, mla_breaks, mla_forms, mo, pl):
    _c = deepseek.config
    _worst = {k: float(mla_forms[k].max()) for k in mla_forms.columns if k != "layer"}
    _moved = mla_breaks.filter(pl.col("break") == "skip-kv-a-norm").row(0, named=True)
    _tokens = ("the same greedy tokens" if _moved["tokens differ from step"] is None
               else f"other greedy tokens from step {_moved['tokens differ from step']}")
    mo.vstack([
        mo.md(f"""
        **Absorbed = decompressed.** From the captured q, q_pe, latent and RoPE key of one forward over the prompt,
        `lessons.latent_attention_forms` computes attention MHA's way — every head's K = [latent · attn_k_b | k_pe]
        and V = attn_v_b · latent, decompressed at every position — and the absorbed way the engine runs. In all
        {_c.n_layers} layers the engine's `attn.pattern` agrees with the MHA form's softmax to
        **{_worst["max |MHA-form pattern − engine's|"]:.0e}** and with the absorbed form's to
        {_worst["max |absorbed pattern − engine's|"]:.0e}; the MHA form's Σ p·V with the engine's `attn.out` to
        {_worst["max |MHA-form Σ p·V − engine's attn.out|"]:.0e}: float32 rounding, the same attention. The price of
        absorbing: each head's score is a dot product over {_c.kv_lora_rank} + {_c.rope_dim} = {_c.kv_lora_rank + _c.rope_dim}
        values where MHA's is over {_c.head_dim} (on V3: 576 against 192), more arithmetic for far fewer bytes to read —
        the right trade for decoding, where reading the cache is the cost.

        **Its porting bug.** An engine that skips the latent's RMSNorm (`attn_kv_a_norm`; break `skip-kv-a-norm`)
        caches the raw down-projection: on the clean run's tokens the logits move by
        **{_moved['relative max |Δlogit|']:.2f}** of the largest logit, the top token changes at
        {_moved['top token changes at']} of {_moved['of positions']} positions, and decoding {MLA_STEPS} tokens gives {_tokens}.
        """),
        mla_forms.with_columns(pl.exclude("layer").map_elements(lambda v: f"{v:.1e}", return_dtype=pl.String)),
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 5 · Cached vs uncached

    Without a cache, every step must run the **whole sequence** through the model again to rebuild the keys
    and values, so a step at position n costs about what a prefill of n tokens costs: the time per token
    **grows** with the position. With the cache, a step runs one token; only the attention (one dot product
    per cached position) grows, which at these lengths is small next to the matmuls.

    `Session(model, ids, path="both")` runs both paths side by side: the cached path chooses each token, and
    the uncached path is run on the same tokens (teacher-forced), timing each and recording how far their
    logits are apart — a cache that is correct changes the speed, never the result.
    """)
    return


@app.cell
def _(cfg, mo):
    speed_prompt = mo.ui.slider(start=8, stop=min(384, cfg.context_length - 64), step=8, value=16,
                                label="prompt tokens", show_value=True)
    speed_steps = mo.ui.slider(start=32, stop=256, step=16, value=128, label="decode steps", show_value=True)
    mo.hstack([speed_prompt, speed_steps], justify="start")
    return speed_prompt, speed_steps


@app.cell
def _(Session, bench, cfg, mo, model, speed_prompt, speed_steps):
    SPEED_WARMUP = 2  # decode steps left out of the comparison: the first ones pay one-off costs (allocation, caches)
    SPEED_MORE = 64  # how far Step ×16 may go past the slider's steps
    speed_ids = bench.bench_prompt(model, speed_prompt.value)  # fixed English text, exactly this many tokens
    speed_session = Session(model, speed_ids, path="both", timing_repeats=3,
                            context=min(cfg.context_length, len(speed_ids) + speed_steps.value + SPEED_MORE + 1))
    with mo.status.progress_bar(total=speed_steps.value, title="Decoding on both paths", remove_on_exit=True) as _bar:
        for _ in range(speed_steps.value):  # end-of-text does not stop us here: equal lengths, comparable timings
            speed_session.step()
            _bar.update()
    speed_trace = speed_session.trace()  # as decoded on open: what the claims below are measured on
    speed_more = mo.ui.run_button(label="Step ×16")
    return SPEED_WARMUP, speed_ids, speed_more, speed_session, speed_trace


@app.cell
def _(SPEED_WARMUP, charts, lessons, speed_trace):
    speedup_measured = charts.speedup(speed_trace.tokens)
    equiv_worst = float((speed_trace.equiv["max_abs_diff"] / speed_trace.equiv["max_abs_logit"]).max())
    equiv_argmax_all = bool(speed_trace.equiv["argmax_equal"].all())
    speed_growth = lessons.cost_growth(speed_trace.tokens, SPEED_WARMUP)  # per path: ms early, ms late, their ratio
    return equiv_argmax_all, equiv_worst, speed_growth, speedup_measured


@app.cell
def _(SPEED_WARMUP, charts, equiv_argmax_all, equiv_worst, lessons, mo, pl, speed_growth, speed_more, speed_session,
      speed_trace, speedup_measured):
    # Step ×16: the same session goes on (the curves grow to the right); the claims were measured on open.
    _shown = speed_trace
    if speed_more.value:
        for _ in range(min(16, speed_session.capacity - len(speed_session.ids))):
            speed_session.step()
        _shown = speed_session.trace()
    _g = {r["path"]: r for r in speed_growth.iter_rows(named=True)}
    _u, _c = _g["uncached"], _g["cached"]
    mo.vstack([
        mo.md(f"""
        Measured on open, steps {SPEED_WARMUP + 1}… (the first {SPEED_WARMUP} decode steps pay one-off costs and are
        left out): an **uncached** step cost {_u['ms early']:.1f} ms at position {_u['position early']} and
        {_u['ms late']:.1f} ms at position {_u['position late']} — **{_u['ratio']:.1f}×** for
        {_u['position late'] / _u['position early']:.1f}× the tokens; a **cached** step {_c['ms early']:.1f} →
        {_c['ms late']:.1f} ms (**{_c['ratio']:.1f}×**). (Each figure is the median of 4 steps, each step the best
        of up to 3 runs.) The uncached cost grows less than the tokens do because every step also pays a fixed
        cost — Python around each layer, one small matmul per chosen expert — that does not grow with the
        sequence; on a model this small it is a large share. The part that grows is what the cache removes.
        Press **Step ×16** to watch both curves go on.
        """),
        speed_more,
        mo.hstack([charts.step_latency(_shown.tokens), charts.equivalence(_shown.equiv, _shown.meta["equiv_tolerance"])], justify="start", wrap=True),
        mo.hstack([
            mo.stat(value=charts.fmt_speedup(speedup_measured), label="cached / uncached", caption="tokens/s, last 8 steps", bordered=True),
            mo.stat(value=f"{equiv_worst:.1e}", label="worst max|Δlogit| / max|logit|", caption=f"threshold {speed_trace.meta['equiv_tolerance']:g}", bordered=True),
            mo.stat(value="yes" if equiv_argmax_all else "no", label="same argmax at every step", bordered=True),
            speed_growth.select("path", pl.col("position early"), pl.col("ms early"), pl.col("position late"), pl.col("ms late"), "ratio"),
        ], justify="start", wrap=True),
    ])
    return


@app.cell
def _(mo):
    SWEEP_STEPS = 8
    sweep_button = mo.ui.run_button(label="Run the sweep")
    mo.vstack([
        mo.md(f"""
        Read the left chart from left to right: the uncached path's cost per token rises with the position (it
        recomputes more and more), the cached one stays flat; the diamond is the cached path's prefill, which
        runs the whole prompt once. The right chart is the correctness half: per step, the largest logit
        difference between the two paths relative to the largest logit, under the fp32 threshold (dashed), with
        the same argmax (green). Timings on a small CPU model are noisy (other programs, the Python overhead of
        every step); the trend is the point, not any single number.

        **The speedup depends on the context.** An uncached step at position n costs about a prefill of n tokens,
        a cached step about one token, so their ratio grows with n. `workbench.bench.run` — what
        `workbench bench` prints — at several prompt lengths ({SWEEP_STEPS} steps each; best of two runs; "expected"
        is the arithmetic from the measured prefill rate; a few seconds):
        """),
        sweep_button,
    ])
    return SWEEP_STEPS, sweep_button


@app.cell
def _(SWEEP_STEPS, cfg, headless, lessons, mo, model, sweep_button):
    mo.stop(not (sweep_button.value or headless), mo.md("*Press **Run the sweep** to measure.*"))
    _sizes = [n for n in (16, 64, 128, 256, 448) if n + SWEEP_STEPS + 1 <= cfg.context_length]
    with mo.status.progress_bar(total=len(_sizes), title="workbench.bench.run at several prompt lengths",
                                remove_on_exit=True) as _bar:
        speed_sweep = lessons.speed_sweep(model, _sizes, SWEEP_STEPS, on_size=_bar.update)
    return (speed_sweep,)


@app.cell
def _(alt, mo, pl, speed_sweep):
    SEED_BEFORE, SEED_AFTER = 0.5, 9.6  # tok/s, the aprender engine on Qwen3-Coder-30B-A3B, before/after its KV cache
    _ms = alt.Chart(speed_sweep).mark_line(point=True).encode(
        x=alt.X("prompt tokens:Q"), y=alt.Y("ms per token:Q", scale=alt.Scale(type="log"), title="ms per generated token"),
        color=alt.Color("path:N", scale=alt.Scale(domain=["cached", "uncached"], range=["#1f77b4", "#ff7f0e"])),
        tooltip=["prompt tokens", "path", alt.Tooltip("ms per token:Q", format=".2f"), alt.Tooltip("tokens/s:Q", format=".1f")],
    ).properties(width=300, height=180, title="cost per token vs context (workbench.bench.run)")
    _ratio = speed_sweep.filter(pl.col("path") == "cached").unpivot(
        index="prompt tokens", on=["speedup", "expected speedup"], variable_name="kind", value_name="x")
    _sp = alt.Chart(_ratio).mark_line(point=True).encode(
        x=alt.X("prompt tokens:Q"), y=alt.Y("x:Q", title="cached / uncached"),
        strokeDash=alt.StrokeDash("kind:N", title=None, sort=["speedup", "expected speedup"], scale=alt.Scale(domain=["speedup", "expected speedup"], range=[[1, 0], [4, 3]])),
        tooltip=["prompt tokens", "kind", alt.Tooltip("x:Q", format=".1f")],
    ).properties(width=300, height=180, title="the speedup grows with the context")
    _measured = _ratio.filter(pl.col("kind") == "speedup").sort("prompt tokens")
    _first, _last = _measured.row(0), _measured.row(-1)
    mo.vstack([
        mo.hstack([_ms, _sp], justify="start", wrap=True),
        mo.md(f"""
        Here the ratio goes from about {_first[2] or float('nan'):.1f}× at {_first[0]} tokens to {_last[2] or float('nan'):.1f}× at {_last[0]}.

        **The seed result.** This is the measurement that started the workbench: the aprender engine decoded
        Qwen3-Coder-30B-A3B at **{SEED_BEFORE} tok/s** without a KV cache and **{SEED_AFTER} tok/s** with one —
        **{SEED_AFTER / SEED_BEFORE:.0f}×**. Same mechanism, at full size: each uncached step re-ran every earlier
        token through 48 layers. The number is not a constant of the model; as above, it depends on how long the
        context was, and on how much cheaper a batched prefill token is than a decode step on that machine.
        """),
    ])
    return SEED_AFTER, SEED_BEFORE


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 6 · Mixture of experts

    In section 3 the router chose experts for one token at one layer. Over a whole run, the choices differ per
    token and per layer, and they are the whole point of an MoE: the model has many experts' worth of
    parameters but runs only a few per token (Qwen3-30B-A3B: 30 B parameters, 3 B active). Below, two prompts
    — code and prose — are decoded for a few steps with probes on, and the `routing` frame of each trace
    (one row per step × position × layer × rank: the expert and its weight) shows who did the work.
    """)
    return


@app.cell
def _(mo):
    code_prompt = mo.ui.text_area(value="import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return [line.rstrip() for line in f]\n",
                                  label="code prompt", rows=4, full_width=True)
    prose_prompt = mo.ui.text_area(value="The history of the city begins with a small village on the river. Over the "
                                         "centuries it grew into a market town, and later into a busy port.",
                                   label="prose prompt", rows=4, full_width=True)
    mo.hstack([code_prompt, prose_prompt], widths="equal")
    return code_prompt, prose_prompt


@app.cell
def _(DEFAULT_PROMPT, MAX_PROMPT, code_prompt, lessons, mo, model, prose_prompt, tok):
    MOE_STEPS = 24
    moe_traces, moe_sessions = {}, {}
    for _name, _text in (("code", code_prompt.value), ("prose", prose_prompt.value)):
        _ids = (tok.encode(_text) or tok.encode(DEFAULT_PROMPT))[:MAX_PROMPT]
        _s = lessons.decode(model, _ids, MOE_STEPS, path="cached", probes=True)
        moe_sessions[_name], moe_traces[_name] = _s, _s.trace()
    # Load per expert: the share of all (token, rank) picks at each layer, prompt and generated tokens alike.
    expert_load = lessons.expert_load(moe_traces)
    moe_layer = mo.ui.slider(start=0, stop=max(model.config.n_layers - 1, 1), value=0, label="layer", show_value=True)
    return MOE_STEPS, expert_load, moe_layer, moe_sessions, moe_traces


@app.cell
def _(alt, cfg, expert_load, lessons, mo, moe_layer, moe_sessions, moe_traces, pl, tok, visible):
    _layer = min(moe_layer.value, cfg.n_layers - 1)
    _t, _s = moe_traces["code"], moe_sessions["code"]
    _per_token = _t.routing.filter(pl.col("layer") == _layer).with_columns(
        pl.col("position").map_elements(lambda p: visible(tok.piece(_s.ids[p])), return_dtype=pl.String).alias("piece"))
    _per_token = _per_token.with_columns((pl.col("position").cast(pl.Utf8) + " " + pl.col("piece").str.slice(0, 8)).alias("token"))
    _heat = alt.Chart(_per_token).mark_rect().encode(
        x=alt.X("token:O", sort=_per_token.sort("position")["token"].unique(maintain_order=True).to_list(),
                title="position and token", axis=alt.Axis(labelAngle=-70, labelFontSize=8)), y=alt.Y("expert:O"),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="oranges"), title="weight"),
        tooltip=["position", "piece", "expert", "rank", alt.Tooltip("weight:Q", format=".3f"),
                 alt.Tooltip("router_entropy:Q", format=".3f")],
    ).properties(width=620, height=16 * cfg.n_experts,
                 title=f"code prompt, layer {_layer}: the {cfg.n_experts_used} experts each position went to "
                       f"(prompt: 0–{len(_s.prompt_ids) - 1}; hover for the piece)")
    _load = alt.Chart(expert_load.filter(pl.col("layer") == _layer)).mark_bar().encode(
        x=alt.X("expert:O"), xOffset=alt.XOffset("prompt:N"), y=alt.Y("share:Q", title="share of picks"),
        color=alt.Color("prompt:N", scale=alt.Scale(domain=["code", "prose"], range=["#4c78a8", "#f58518"])),
        tooltip=["prompt", "expert", "picks", alt.Tooltip("share:Q", format=".3f")],
    ).properties(width=420, height=180, title=f"layer {_layer}: load per expert, code vs prose")
    _summary = lessons.load_summary(expert_load, cfg.n_experts)
    mo.vstack([
        moe_layer,
        _heat,
        mo.hstack([_load, mo.vstack([mo.md("**Per prompt and layer**"), _summary])], justify="start", wrap=True),
    ])
    return


@app.cell
def _(alt, cfg, expert_load, lessons, mo):
    _uniform = 1 / cfg.n_experts
    _top_gap = lessons.largest_load_gap(expert_load)
    _shares = alt.Chart(expert_load).mark_rect().encode(
        x=alt.X("expert:O"), y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues", domain=[0, float(expert_load["share"].max())]),
                        title="share of picks", legend=alt.Legend(format=".2f")),
        tooltip=["prompt", "layer", "expert", "picks", alt.Tooltip("share:Q", format=".3f")],
    ).properties(width=300, height=120).facet(column=alt.Column("prompt:N", title=None)).properties(
        title="share of each layer's picks per expert, both prompts on one scale")
    mo.vstack([
        mo.md(f"""
        With perfectly even routing every expert would get {_uniform:.3f} of the picks. The largest difference
        between the two prompts is at layer {_top_gap['layer']}, expert {_top_gap['expert']}: {_top_gap['code']:.3f} of
        the code picks vs {_top_gap['prose']:.3f} of the prose picks.
        """) if _top_gap else mo.md(""),
        _shares,
    ])
    return


@app.cell
def _(alt, lessons, mo, model, pl, tok):
    # Do experts specialise? Usage of two kinds of text compared with a baseline of the same kind, and with a
    # control: the same prompts through a random router (which can only tell texts apart by chance).
    _prompts = {"code": [tok.encode(t) for t in lessons.CODE_PROMPTS], "prose": [tok.encode(t) for t in lessons.PROSE_PROMPTS]}
    specialisation = lessons.specialisation(model, _prompts)  # the random router: the mean over 5 seeds
    _long = specialisation.unpivot(index="layer", variable_name="comparison", value_name="distance")
    _order = ["within a kind", "across kinds", "within a kind, random router", "across kinds, random router"]
    _bars = alt.Chart(_long).mark_bar().encode(
        x=alt.X("layer:O"), xOffset=alt.XOffset("comparison:N", sort=_order),
        y=alt.Y("distance:Q", scale=alt.Scale(domain=[0, 1]), title="usage distance (total variation, 0 … 1)"),
        color=alt.Color("comparison:N", sort=_order, scale=alt.Scale(domain=_order, range=["#9ecae9", "#4c78a8", "#ffbf79", "#f58518"])),
        tooltip=["layer", "comparison", alt.Tooltip("distance:Q", format=".3f")],
    ).properties(width=420, height=200, title="how differently two texts use the experts, per layer")
    _mean = {c: float(specialisation[c].mean()) for c in _order}
    specialisation_gap = {"trained": _mean["across kinds"] - _mean["within a kind"],
                          "random": _mean["across kinds, random router"] - _mean["within a kind, random router"]}
    mo.vstack([
        mo.md(f"""
        **Do the experts specialise?** A difference between one code and one prose prompt means little on its
        own: two code prompts differ too, and even a router of random numbers sends different texts to different
        experts. So: {len(lessons.CODE_PROMPTS)} code and {len(lessons.PROSE_PROMPTS)} prose prompts (standard-library code;
        English prose), each prompt's share of picks per expert and layer, and the distance between two
        prompts' shares (total variation: 0 = the same experts in the same proportions, 1 = no expert in common).
        Averaged over layers, with the trained router: **{_mean['within a kind']:.2f}** between prompts of the same
        kind, **{_mean['across kinds']:.2f}** between code and prose — a gap of **{specialisation_gap['trained']:.2f}**.
        With the router swapped for random matrices of the same size (`lessons.random_router`, the mean of 5):
        {_mean['within a kind, random router']:.2f} within, {_mean['across kinds, random router']:.2f} across — a gap
        of {specialisation_gap['random']:.2f}. So even a random router sends code and prose to different experts:
        the two kinds of text reach the router as different vectors, and any linear scoring splits them. The
        trained router splits them {"more" if specialisation_gap['trained'] > specialisation_gap['random'] else "less"} than that,
        by {abs(specialisation_gap['trained'] - specialisation_gap['random']):.2f}{": that extra is what training taught it, the experts' specialisation" if specialisation_gap['trained'] > specialisation_gap['random'] else ""}.
        Without the control, all of the {specialisation_gap['trained']:.2f} would have been credited to training —
        which is why a claim about routing needs a baseline of the same kind and a random-router control.
        """),
        mo.hstack([_bars, specialisation.with_columns(pl.exclude("layer").round(3))], justify="start", wrap=True),
    ])
    return specialisation, specialisation_gap


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ### A shared expert and its gate

    Qwen1.5-MoE and Qwen2-MoE (`qwen2moe` in GGUF) add one more expert beside the routed ones: a **shared
    expert** that every token goes through, whatever the router says, scaled by a gate of its own. With x the
    normed residual, g one learned vector per layer and σ the sigmoid,
    ffn_out = Σ_k w_k · expert_k(x) + σ(x·g) · shared(x) — and unlike Qwen3's, the top-k weights w_k are not
    renormalised. Below, the bundled `tiny-qwen2moe`, whose weights are **random** (the numbers show the
    mechanism, not what training would make of it): a few greedy tokens with probes on, the gate at every layer
    and position (the `shared` trace frame, capture point `blocks.{i}.moe.shared_gate`), and each layer's MoE
    output split into its two parts.
    """)
    return


@app.cell
def _(Model, lessons):
    # The shared expert on the bundled random tiny qwen2moe (its weights are noise; the gate is the architecture's).
    qwen2moe = Model.load("tiny-qwen2moe", device="cpu", weights="dequantized")
    SHARED_STEPS = 8
    shared_ids = qwen2moe.tokenizer.encode("The history of the city begins with a small village on the river.")[:16]
    _session = lessons.decode(qwen2moe, shared_ids, SHARED_STEPS, path="cached", probes=True)
    shared_trace = _session.trace()
    shared_share = lessons.shared_expert_share(qwen2moe, _session.ids)  # the prompt and the tokens it wrote
    shared_breaks = lessons.break_effects(qwen2moe, shared_ids, SHARED_STEPS, lessons.SHARED_BREAKS)
    return SHARED_STEPS, qwen2moe, shared_breaks, shared_ids, shared_share, shared_trace


@app.cell
def _(alt, charts, lessons, mo, pl, shared_share, shared_trace):
    _summary = lessons.shared_summary(shared_share)
    _gates = shared_trace.shared["gate"]
    _check = float(shared_share["max |gated shared + routed − ffn_out|"].max())
    _scatter = alt.Chart(shared_share).mark_point(filled=True).encode(
        x=alt.X("gate:Q", scale=alt.Scale(domain=[0, 1]), title="gate σ(x·g)"),
        y=alt.Y("shared share:Q", scale=alt.Scale(domain=[0, 1]), title="shared expert's share of ffn_out"),
        color=alt.Color("layer:N"),
        tooltip=["layer", "position", alt.Tooltip("gate:Q", format=".3f"), alt.Tooltip("shared share:Q", format=".3f"),
                 alt.Tooltip("gated shared norm:Q", format=".3f"), alt.Tooltip("routed norm:Q", format=".3f")],
    ).properties(width=260, height=200, title="the gate and the share it buys, per layer and position")
    mo.vstack([
        mo.md(f"""
        The gate ranges from **{_gates.min():.2f}** to **{_gates.max():.2f}** over the {shared_trace.shared.height}
        (position, layer) cells of the run: it is per token, so the shared expert counts for more at some tokens
        than at others. What it buys is the **share** of the MoE output that comes from the shared expert,
        ‖σ(x·g)·shared(x)‖ / (‖σ(x·g)·shared(x)‖ + ‖Σ_k w_k·expert_k(x)‖): here between
        **{shared_share['shared share'].min():.2f}** and **{shared_share['shared share'].max():.2f}**, on average
        **{shared_share['shared share'].mean():.2f}** — not the gate itself, since it also depends on how large each
        part's output is. The two parts are recomputed from the captured MoE input (`lessons.shared_expert_share`)
        and add up to the engine's `ffn_out` {"exactly" if _check == 0 else f"to {_check:.0e}"}.
        """),
        mo.hstack([charts.shared_gate(shared_trace.shared, "cached", charts.sequence_pieces(shared_trace.meta, shared_trace.tokens)),
                   _scatter], justify="start", wrap=True),
        _summary.with_columns(pl.exclude("layer").round(3)),
    ])
    return


@app.cell
def _(SHARED_STEPS, mo, pl, shared_breaks, shared_share):
    _row = {r["break"]: r for r in shared_breaks.iter_rows(named=True)}
    _dropped, _ungated = _row["shared-expert-dropped"], _row["shared-expert-ungated"]

    def _tokens(r):
        return ("the same greedy tokens" if r["tokens differ from step"] is None
                else f"other greedy tokens from step {r['tokens differ from step']}")

    mo.vstack([
        mo.md(f"""
        **Its two porting bugs.** An engine that knows routed experts but not this one leaves it out
        (`shared-expert-dropped`); one that loads it but misses the gate adds it with weight 1
        (`shared-expert-ungated`). Both change every token's MoE output at every layer, and neither raises anything.
        On the clean run's tokens the logits move by **{_dropped['relative max |Δlogit|']:.2f}** (dropped) and
        **{_ungated['relative max |Δlogit|']:.2f}** (ungated) of the largest logit, the top token changes at
        {_dropped['top token changes at']} and {_ungated['top token changes at']} of {_dropped['of positions']} positions,
        and decoding {SHARED_STEPS} tokens gives {_tokens(_dropped)} (dropped) and {_tokens(_ungated)} (ungated).
        Dropping takes σ(x·g)·shared(x) away, ungating adds (1 − σ(x·g))·shared(x): the larger the gate (its mean
        is {shared_share['gate'].mean():.2f} here), the more dropping costs against ungating.
        The clean run against itself: {_row['clean']['relative max |Δlogit|']:g}. Section 8's model has no shared
        expert, so these two are run here; against another engine's dump of a qwen2moe model, `workbench compare`
        has both among its suspects.
        """),
        mo.ui.table(shared_breaks.with_columns(pl.col("relative max |Δlogit|").round(4)), selection=None,
                    wrapped_columns=["text (generated)"]),
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ### V3 routing: sigmoid scores, a bias to choose, groups

    DeepSeek-V3's router differs from Qwen's at every step. An expert's **score** is the sigmoid of its router
    logit, not a softmax over the experts (the scores need not sum to 1). A learned **bias** per expert
    (`exp_probs_b`, trained to even out the experts' load) is added to the scores only to *choose*: it never weighs
    an expert's output. The experts come in **groups**; a group scores the sum of its 2 best biased scores, and the
    top-k are chosen only within the best few groups (V3: 8 groups of 32 experts, 4 used, top-8; it bounds how
    many devices one token's experts live on). The chosen experts' weights are their *unbiased* scores,
    renormalised to sum to 1 and × a routed scaling factor (2.5 on V3); a shared expert, ungated, runs beside them
    for every token. Below, `tiny-deepseek2` again (**random** weights; 8 experts in 4 groups of 2, 2 groups used,
    top-2, × 2.5), every step written out from the captured router logits (`lessons.v3_routing`) and held to the
    engine's choice and weights.
    """)
    return


@app.cell
def _(MLA_STEPS, deepseek, lessons, mla_ids):
    v3_routes = lessons.v3_routing(deepseek, mla_ids)
    v3_changes = lessons.v3_choice_changes(v3_routes)
    v3_token = lessons.v3_example(v3_routes)
    v3_breaks = lessons.break_effects(deepseek, mla_ids, MLA_STEPS, ["probs-bias-in-weights", "no-group-limit", "no-routed-scaling"])
    return v3_breaks, v3_changes, v3_routes, v3_token


@app.cell
def _(deepseek, mla_ids, mo, pl, v3_breaks, v3_changes, v3_token, visible):
    _c = deepseek.config
    _layer, _pos = int(v3_token["layer"][0]), int(v3_token["position"][0])
    _kept = sorted(set(v3_token.filter(pl.col("group kept"))["group"].to_list()))
    _chosen = v3_token.filter(pl.col("chosen"))
    _plain = v3_token.filter(pl.col("plain top-k"))["expert"].to_list()
    _biased = v3_token.filter(pl.col("biased top-k"))["expert"].to_list()
    _group_scores = dict(v3_token.select("group", "group score").unique().iter_rows())
    _surviving = ", ".join(f"{_group_scores[g]:.3f}" for g in _kept)
    _out = v3_token.filter(pl.col("biased top-k") & ~pl.col("group kept"))  # chosen but for the group limit
    _why = "".join(f"; expert {r['expert']} is out with its group {r['group']}, whose score {r['group score']:.3f} is "
                   f"below the surviving groups' ({_surviving})" for r in _out.iter_rows(named=True))
    _n = int(v3_changes["positions"].sum())
    _row = {r["break"]: r for r in v3_breaks.iter_rows(named=True)}
    mo.vstack([
        mo.md(f"""
        **One token, one layer.** Position {_pos} (`{visible(deepseek.tokenizer.piece(mla_ids[_pos]))}`) at layer {_layer}:
        the groups that survive are {", ".join(map(str, _kept))} of {_c.n_expert_groups}; the chosen experts are
        {" and ".join(f"**{e}** (weight {w:.3f})" for e, w in zip(_chosen["expert"], _chosen["weight"]))}, their unbiased
        scores renormalised and × {_c.routed_scale:g}, so the weights sum to {_c.routed_scale:g}. The plain top-{_c.n_experts_used}
        of the scores would be experts {", ".join(map(str, _plain))}, of the biased scores over every group
        {", ".join(map(str, _biased))}{_why}.
        """),
        v3_token.select("expert", "group", "score", "bias", "biased score", "group score", "group kept", "chosen",
                        "plain top-k", "weight", "engine weight").with_columns(pl.col(pl.Float64).round(4)),
        mo.md(f"""
        **Over the prompt.** Of the {_n} (position, MoE layer) pairs, the bias alone changes the chosen experts at
        **{int(v3_changes['the bias changes it'].sum())}**, the group limit changes them again at
        **{int(v3_changes['the groups change it'].sum())}**, and the choice differs from the plain top-{_c.n_experts_used}
        of the scores at **{int(v3_changes['chosen ≠ plain top-k'].sum())}**. The weights written out here agree with the
        engine's to {float(v3_changes["max |weight − engine's|"].max()):.0e}. Its porting bugs, on the clean run's tokens
        (relative max |Δlogit|): the bias leaking into the weights (`probs-bias-in-weights`)
        {_row['probs-bias-in-weights']['relative max |Δlogit|']:.2f}, choosing among all experts (`no-group-limit`)
        {_row['no-group-limit']['relative max |Δlogit|']:.2f}, the scaling factor left out (`no-routed-scaling`)
        {_row['no-routed-scaling']['relative max |Δlogit|']:.2f}.
        """),
        v3_changes.with_columns(pl.col("max |weight − engine's|").map_elements(lambda v: f"{v:.1e}", return_dtype=pl.String)),
        mo.ui.table(v3_breaks.with_columns(pl.col("relative max |Δlogit|").round(4)), selection=None,
                    wrapped_columns=["text (generated)"]),
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 7 · What the heads read, and when the answer appears

    Section 3 drew one step's attention, recomputed by hand. Over a run the engine can record it itself:
    `Session(..., attention=True)` keeps, at every step, the newest token's weights over every key, per layer
    and head (the `attention` frame), and `lens=True` reads each layer's residual stream through the final
    norm and the output matrix — the **logit lens**: the token each layer would predict if the model stopped
    there (the `lens` frame). Below, the prompt of section 2, decoded for a few steps with both on.
    """)
    return


@app.cell
def _(cfg, ids, lessons, mo, model):
    LOOK_STEPS = 12
    look_session = lessons.decode(model, ids, LOOK_STEPS, path="cached", attention=True, lens=True)
    look_trace = look_session.trace()
    look_layer = mo.ui.slider(start=0, stop=max(cfg.n_layers - 1, 1), value=0, label="layer", show_value=True)
    look_head = mo.ui.slider(start=0, stop=max(cfg.n_heads - 1, 1), value=0, label="head", show_value=True)
    return LOOK_STEPS, look_head, look_layer, look_session, look_trace


@app.cell
def _(cfg, charts, lessons, look_head, look_layer, look_trace, mo, pl):
    _att = look_trace.frames["attention"]
    _step = int(_att["step"].max())
    _pieces = charts.sequence_pieces(look_trace.meta, look_trace.tokens, "cached")
    attention_shares = lessons.attention_shares(_att, _step)
    _sink = max(attention_shares.iter_rows(named=True), key=lambda r: r["on key 0"])
    _n_prev = int(attention_shares["heads reading the previous token most"].sum())
    _n_self = int(attention_shares["heads reading itself most"].sum())
    _n_all = cfg.n_heads * cfg.n_layers
    _window = cfg.sliding_window if getattr(cfg, "sliding_window", None) else None
    mo.vstack([
        mo.md(f"""
        **Which positions each head reads.** At the last step (position {int(_att["key"].max())}), each head of a layer
        spreads its weight over the {int(_att["key"].max()) + 1} keys. Two habits are common in large trained models: heads that
        put most of their weight on **key 0** — an *attention sink*, a place to park attention when nothing in
        particular is needed — and heads that read the **previous token**, which is how a model copies and
        continues. Measured here, at the last step: the strongest pull of key 0 is at layer {_sink['layer']},
        **{_sink['on key 0']:.2f}** of the weight on average ({_sink['heads reading key 0 most']} of {cfg.n_heads} heads read
        it most); **{_n_prev}** of the {_n_all} heads read the previous token most, and **{_n_self}** the newest token
        itself. {"So this small model, trained on 256-token windows, has no strong sink: its heads spread over the content instead." if _sink['on key 0'] < 0.2 else "This model has a sink."}
        {"Gemma3's local layers would add a third pattern: keys beyond their sliding window get exactly 0 (grey in the heads chart)." if _window is None else f"This model's local layers see only the last {_window} keys: the rest are exactly 0 (grey)."}
        The charts are the engine's own record (`attention` frame), not a recomputation.
        Pick a layer and head:
        """),
        mo.hstack([look_layer, look_head], justify="start"),
        charts.attention_over_keys(_att, _step, look_layer.value, look_head.value, _pieces, "cached"),
        charts.attention_heads(_att, _step, look_layer.value, "cached", _pieces),
        attention_shares.with_columns(pl.col("on key 0", "on itself", "on the previous token").round(3)),
    ])
    return (attention_shares,)


@app.cell
def _(Model, alt, charts, lessons, mo, pl):
    # Gemma3's sliding window, on the bundled random tiny gemma3 (its weights are noise; its mask is the
    # architecture's): local layers read only the last `sliding_window` positions, the global ones all.
    gemma = Model.load("tiny-gemma3", device="cpu", weights="dequantized")
    _gc = gemma.config
    _ids = gemma.tokenizer.encode("The history of the city begins with a small village on the river.")[:12]
    _trace = lessons.decode(gemma, _ids, 8, path="cached", attention=True).trace()
    _att = _trace.frames["attention"]
    _step = int(_att["step"].max())
    _local = next(i for i in range(_gc.n_layers) if _gc.is_local_layer(i))
    _global = next(i for i in range(_gc.n_layers) if not _gc.is_local_layer(i))
    _pieces = charts.sequence_pieces(_trace.meta, _trace.tokens, "cached")
    _last = _att.filter(pl.col("step") == _step)
    window_zeros = {layer: int(_last.filter((pl.col("layer") == layer) & (pl.col("weight") == 0)).select("key").n_unique())
                    for layer in (_local, _global)}
    _n_keys = int(_last["key"].max()) + 1  # the newest token's position + 1 (the last generated one is not fed yet)
    window_facts = {"window": _gc.sliding_window, "keys": _n_keys, "local": _local, "global": _global, "zeros": window_zeros}
    mo.vstack([
        mo.md(f"""
        **A sliding window** (Gemma3, gpt-oss, Mistral): some layers see only the most recent positions. Here the
        bundled *random* tiny gemma3 ({_gc.n_layers} layers, window {_gc.sliding_window}; layers
        {", ".join(str(i) for i in range(_gc.n_layers) if _gc.is_local_layer(i))} local, {_global} global), decoded to
        position {_n_keys - 1}: on local layer {_local} the newest token's weight on the
        **{window_zeros[_local]}** oldest keys is exactly 0 — it sees the last {_gc.sliding_window} positions, itself
        included — while global layer {_global} reads all {_n_keys} ({window_zeros[_global]} zeros). Its weights are
        random, so *which* keys it prefers means nothing; the grey is the architecture. An engine that forgets the
        window (or is off by one at its edge) gives a local layer keys it should not see — invisible until the
        sequence is longer than the window.
        """),
        mo.hstack([charts.attention_heads(_att, _step, _local, "cached", _pieces).properties(title=f"local layer {_local}"),
                   charts.attention_heads(_att, _step, _global, "cached", _pieces).properties(title=f"global layer {_global}")],
                  justify="start", wrap=True),
    ])
    return (window_facts,)


@app.cell
def _(cfg, charts, lessons, look_trace, mo, tok, visible):
    _lens = look_trace.frames["lens"]
    answer_layers = lessons.answer_layer(_lens)
    _decode = answer_layers.filter(answer_layers["step"] > 0)
    _early = int((_decode["from layer"] < cfg.n_layers - 1).sum())
    mo.vstack([
        mo.md(f"""
        **When does the answer appear?** Each cell is the token one layer would predict next, coloured by its
        probability; the top row is the model's real output. Read a column from the bottom up: early layers
        guess common tokens, and from some layer on the guess is the final answer. Over the {_decode.height} decode
        steps here the final token was already the top guess before the last layer at **{_early}** of them
        (the layer where it appears, per step: {", ".join(f"`{visible(tok.piece(r['token_id']))}` from layer {r['from layer']}" for r in _decode.head(6).iter_rows(named=True))}{", …" if _decode.height > 6 else ""}).
        With {cfg.n_layers} layers there is not much depth to watch; the same chart on a 30-layer model
        (the app's Logit lens tab) shows the answer forming over many.
        """),
        charts.lens_grid(_lens, "prob", tok.piece, "cached"),
    ])
    return (answer_layers,)


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ### Attention sinks and sliding windows

    The sink above is key 0, which a trained model learns to use as one. gpt-oss (`gpt-oss` in GGUF) is given one
    instead: every head h has a learned **sink logit** s_h that joins each of its softmaxes as one more key with no
    value, so the weights over the real keys j are exp(q·k_j/√d) / (Σ_j' exp(q·k_j'/√d) + exp(s_h)). They sum to
    1 − the sink's **share**, exp(s_h) / (the same sum): attention paid to nothing, which a head that has nothing
    worth reading can spend there instead of on some token. Its layers also alternate: the even ones slide, seeing
    only the last `sliding_window` positions (128 in the released models), the odd ones see every position. Below,
    the bundled `tiny-gpt-oss` (window 4), whose weights are **random** (the numbers show the mechanism, not what
    training would make of it): a prompt decoded a few tokens with the `attention` frame on, and one forward over
    the same tokens with the capture points `attn.q_rope`, `.k_rope`, `.pattern` and `.sink_share`.
    """)
    return


@app.cell
def _(Model, lessons):
    # Sinks and sliding windows on the bundled random tiny gpt-oss (its weights are noise; both are the architecture's).
    gptoss = Model.load("tiny-gpt-oss", device="cpu", weights="dequantized")
    SINK_STEPS = 6
    sink_ids = gptoss.tokenizer.encode("The history of the city begins with a small village on the river.")[:12]
    _session = lessons.decode(gptoss, sink_ids, SINK_STEPS, path="cached", attention=True)
    sink_trace = _session.trace()
    sink_first = len(sink_ids) - 1  # step 0's newest token: the prompt's last; the last token written is not fed yet
    sink_frame = lessons.sink_attention(gptoss, _session.ids[:-1], sink_first)
    sink_summary = lessons.sink_summary(sink_frame)
    sink_breaks = lessons.break_effects(gptoss, sink_ids, SINK_STEPS, lessons.SINK_BREAKS)
    return SINK_STEPS, gptoss, sink_breaks, sink_first, sink_frame, sink_ids, sink_summary, sink_trace


@app.cell
def _(alt, charts, gptoss, mo, pl, sink_first, sink_frame, sink_summary, sink_trace):
    _c = gptoss.config
    _recorded = charts.sink_share_table(sink_trace.attention, "cached").with_columns(
        (pl.col("step") + sink_first).alias("position"))  # step s's newest token sits at sink_first + s
    _joined = sink_frame.join(_recorded, on=["position", "layer", "head"], suffix=" (frame)")
    sink_recorded_gap = float((_joined["sink share"] - _joined["sink share (frame)"]).abs().max())
    _mean = dict(sink_frame.group_by("layer kind").agg(pl.col("sink share").mean()).iter_rows())
    _worst = {k: float(sink_summary[k].max()) for k in ("max |Σ pattern + share − 1|", "max |share − written out|")}
    _pattern = float(sink_frame["max |pattern − written out|"].max())
    _why = (f"the sink competes with only {_c.sliding_window} keys there, against up to {int(sink_frame['keys'].max())} on a "
            "full layer" if _mean["sliding"] > _mean["full"] else "the random sink logits differ by more than the number "
            "of keys each competes with")
    _heat = alt.Chart(sink_frame.with_columns(pl.format("layer {} · head {}", "layer", "head").alias("row"))).mark_rect().encode(
        x=alt.X("position:O", title="newest token's position"), y=alt.Y("row:N", sort=None, title=None),
        color=alt.Color("sink share:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]), title="sink share",
                        legend=alt.Legend(format=".1f")),
        tooltip=["position", "layer", "layer kind", "head", alt.Tooltip("sink share:Q", format=".3f"),
                 alt.Tooltip("Σ pattern:Q", format=".3f")],
    ).properties(width=180, height=12 * _c.n_layers * _c.n_heads, title="the sink's share at each step")
    mo.vstack([
        mo.md(f"""
        **The sink's share.** Over the {sink_frame['position'].n_unique()} steps (the newest token at positions
        {sink_first}–{int(sink_frame['position'].max())}), each head's sink takes between
        **{sink_frame['sink share'].min():.2f}** and **{sink_frame['sink share'].max():.2f}** of its softmax: on average
        **{_mean['sliding']:.2f}** on the sliding layers and **{_mean['full']:.2f}** on the full ones ({_why}).

        **Pattern + sink = 1.** Written out from the captured q and k (after RoPE) and the layer's sink logits
        (`lessons.sink_attention`: a softmax over [q·k/√{_c.head_dim} for every key the layer lets the token see, s_h]),
        the last column is the share and the rest the pattern: the engine's Σ pattern + that share is 1 to
        {_worst['max |Σ pattern + share − 1|']:.0e} at every layer, head and step; the share agrees with the engine's
        `attn.sink_share` to {_worst['max |share − written out|']:.0e} and the pattern with `attn.pattern` to
        {_pattern:.0e}. The session's `attention` frame, recorded while decoding through the cache (what the app's
        Attention tab draws; its layer × head panel is the chart on the right), gives the same shares as 1 − Σ weights,
        to {sink_recorded_gap:.0e}.
        """),
        mo.hstack([_heat, charts.sink_shares(sink_trace.attention, int(sink_trace.attention["step"].max()), "cached")],
                  justify="start", wrap=True),
        sink_summary.with_columns(pl.col("share min", "share mean", "share max", "weight beyond the window").round(3),
                                  pl.col("max |Σ pattern + share − 1|", "max |share − written out|").map_elements(
                                      lambda v: f"{v:.1e}", return_dtype=pl.String)),
    ])
    return (sink_recorded_gap,)


@app.cell
def _(SINK_STEPS, charts, gptoss, mo, pl, sink_breaks, sink_frame, sink_trace):
    _c = gptoss.config
    _last = sink_frame.filter(pl.col("position") == pl.col("position").max())
    _sliding, _full = (_last.filter(pl.col("layer kind") == kind) for kind in ("sliding", "full"))
    _local = [i for i in range(_c.n_layers) if _c.is_local_layer(i)]
    _global = [i for i in range(_c.n_layers) if not _c.is_local_layer(i)]
    _row = {r["break"]: r for r in sink_breaks.iter_rows(named=True)}
    _dropped, _window = _row["sinks-dropped"], _row["no-sliding-window"]
    _step = int(sink_trace.attention["step"].max())
    _pieces = charts.sequence_pieces(sink_trace.meta, sink_trace.tokens, "cached")

    def _tokens(r):
        return ("the same greedy tokens" if r["tokens differ from step"] is None
                else f"other greedy tokens from step {r['tokens differ from step']}")

    _texts = (f"{_tokens(_dropped)} with either" if _tokens(_dropped) == _tokens(_window)
              else f"{_tokens(_dropped)} (sinks dropped) and {_tokens(_window)} (no window)")
    _n_masked = int(_full["keys masked"].max())
    _full_masked = f"{_n_masked} keys are" if _n_masked else "no key is"
    mo.vstack([
        mo.md(f"""
        **Sliding and full layers.** At the last step the newest token (position {int(_last['position'][0])}) has
        {int(_last['keys'][0])} keys. On the sliding layers ({", ".join(map(str, _local))}) every head gives exactly 0 to
        the **{int(_sliding['keys masked'].max())}** oldest — it sees the last {_c.sliding_window} positions, itself
        included — so its weight beyond the window is exactly {_sliding['weight beyond the window'].max():g}; on the full
        layers ({", ".join(map(str, _global))}) {_full_masked} masked and a head puts on average
        **{_full['weight beyond the window'].mean():.2f}** of its weight on keys {_c.sliding_window} or more positions back.
        The sink takes its share from every key alike; the window takes everything from the far ones.

        **Its two porting bugs.** An engine that leaves the sink logits out (`sinks-dropped`) makes every head's
        weights sum to 1 again, the sink's share spread over the keys in proportion; one that misses the alternating
        pattern (`no-sliding-window`) lets the even layers read every key. On the clean run's tokens the logits move
        by **{_dropped['relative max |Δlogit|']:.2f}** (sinks dropped) and **{_window['relative max |Δlogit|']:.2f}** (no
        window) of the largest logit, the top token changes at {_dropped['top token changes at']} and
        {_window['top token changes at']} of {_dropped['of positions']} positions, and decoding {SINK_STEPS} tokens gives
        {_texts}. Neither raises anything, and the window bug cannot show before a sequence is longer than the window
        ({_c.sliding_window} positions here, 128 in the released models). The clean run against itself:
        {_row['clean']['relative max |Δlogit|']:g}. Against another engine's dump of a gpt-oss model,
        `workbench compare` has both among its suspects.
        """),
        mo.hstack([charts.attention_heads(sink_trace.attention, _step, _local[0], "cached", _pieces).properties(
                       title=f"sliding layer {_local[0]}"),
                   charts.attention_heads(sink_trace.attention, _step, _global[0], "cached", _pieces).properties(
                       title=f"full layer {_global[0]}")], justify="start", wrap=True),
        mo.ui.table(sink_breaks.with_columns(pl.col("relative max |Δlogit|").round(4)), selection=None,
                    wrapped_columns=["text (generated)"]),
    ])
    return


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## 8 · Break it on purpose

    Every switch in `workbench.model.BREAKS` puts one known bug into the forward pass — each one a bug class
    that real engines shipped; the ones that change something on this model (`breaks_that_apply`: the
    shared-expert bugs need a model with a shared expert) are run here. They all still produce text, and none raises an error: that is what makes them
    hard. Below, each is run for a few steps on the prompt of section 2 (both paths, probes on) beside a clean
    run, and two questions are answered:

    * **Where does it first differ from a clean run?** `workbench.trace.diff(broken, clean)` compares the two
      traces frame by frame; the earliest difference, in the order the forward pass computes things
      (step, then layer: `qk` → `routing` → `layers`, then the logits in `tokens`), points at the stage.
    * **Does an invariant catch it with no clean run at hand?** Cached ≡ uncached (`equiv`), top-k weights
      summing to 1 and more than one expert in use (`routing`), post-norm RMS different from pre-norm (`qk`).
      RoPE and head_dim mistakes break no internal invariant: both paths share them. Those need a reference
      (a clean run, or llama.cpp with `--reference llama.cpp`).
    """)
    return


@app.cell
def _(mo):
    break_button = mo.ui.run_button(label="Run the clean run and every break")
    break_button
    return (break_button,)


@app.cell
def _(BREAKS, break_button, breaks_that_apply, headless, ids, lessons, mo, model, pl):
    mo.stop(not (break_button.value or headless), mo.md("*Press the button to run them (a few seconds).*"))
    BREAK_STEPS = 12
    applying = breaks_that_apply(model.config)

    def run_broken(breaks):
        return lessons.decode(model, ids, BREAK_STEPS, path="both", probes=True, breaks=frozenset(breaks))

    with mo.status.progress_bar(total=len(applying) + 1, title="Clean run and one run per break", remove_on_exit=True) as _bar:
        clean_session = run_broken(())
        clean_trace = clean_session.trace()
        _bar.update()
        break_runs = {}
        for _name in applying:
            _s = run_broken((_name,))
            break_runs[_name] = (_s, _s.trace())
            _bar.update()
    break_report = pl.DataFrame([lessons.break_row(_name, BREAKS[_name], _run, (clean_session, clean_trace), len(ids))
                                 for _name, _run in break_runs.items()])
    return BREAK_STEPS, applying, break_report, break_runs, clean_session, clean_trace, run_broken


@app.cell
def _(BREAK_STEPS, break_report, clean_session, ids, mo, model, visible):
    mo.vstack([
        mo.md(f"The clean run writes (greedy, {BREAK_STEPS} tokens, pieces separated by |): "
              f"`{'|'.join(visible(model.tokenizer.piece(t)) for t in clean_session.ids[len(ids):])}`"),
        mo.ui.table(break_report.select("break", "text (generated)", "tokens differ from step", "first difference vs clean",
                                        "invariant that fires"), selection=None, wrapped_columns=["text (generated)", "first difference vs clean", "invariant that fires"]),
        mo.md("""
        Read the `first difference` column as a pointer into the forward pass. Within a block the capture
        points come in this order: `qk` (Q and K before and after the norm, *before* RoPE), then the MoE router
        (`routing`), then the block's output (`layers`). So `qk` at layer 0 points at the QK-norm itself; the
        router at layer 0 with `qk` unchanged points at what lies between them — RoPE, the attention scale, the
        cache — or at the router itself when its weights or expert ids are what changed. Step 1 instead of
        step 0 means the prefill was right and only the cached decode steps are wrong. The text may or may not
        change within a few steps: a bug that leaves the first tokens alone is still a bug, which is why the
        probes compare numbers, not text.
        """),
    ])
    return


@app.cell
def _(applying, mo):
    break_pick = mo.ui.dropdown(options=applying, value="cache-off-by-one", label="look closer at")
    break_pick
    return (break_pick,)


@app.cell
def _(alt, break_pick, break_report, break_runs, charts, clean_trace, mo, pl):
    _s, _t = break_runs[break_pick.value]
    _row = break_report.filter(pl.col("break") == break_pick.value).row(0, named=True)
    # Residual RMS of each layer's output, broken vs clean, cached path: where the two runs part ways.
    _l = (_t.layers.filter(pl.col("path") == "cached").select("step", "layer", pl.col("resid_rms").alias("broken"))
          .join(clean_trace.layers.filter(pl.col("path") == "cached").select("step", "layer", pl.col("resid_rms").alias("clean")),
                on=["step", "layer"]).with_columns(((pl.col("broken") - pl.col("clean")).abs() / pl.col("clean")).clip(1e-9).alias("relative gap")))
    _gap = alt.Chart(_l).mark_line(point=True).encode(
        x=alt.X("step:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y("relative gap:Q", scale=alt.Scale(type="log")),
        color=alt.Color("layer:O"), tooltip=["step", "layer", alt.Tooltip("broken:Q", format=".4f"), alt.Tooltip("clean:Q", format=".4f")],
    ).properties(width=320, height=180, title="|resid RMS broken − clean| / clean, per layer")
    _panels = [_gap, charts.equivalence(_t.equiv, _t.meta["equiv_tolerance"])]
    if _row["alarm frame"] == "routing" or break_pick.value in ("moe-as-dense", "no-topk-renorm"):
        _panels += [charts.routing_heatmap(_t.routing, _t.meta["primary_path"]), charts.routing_last_token(_t.routing, _t.meta["primary_path"])]
    if break_pick.value == "skip-qk-norm" or _row["alarm frame"] == "qk":
        # one colour scale for both: equal values look equal
        _panels.append(alt.hconcat(
            charts.qk_heatmap(_t.qk, 0, "q", path=_t.meta["primary_path"]).properties(title=f"{break_pick.value}: q RMS at step 0"),
            charts.qk_heatmap(clean_trace.qk, 0, "q", path=clean_trace.meta["primary_path"]).properties(title="clean run, for comparison"),
        ).resolve_scale(color="shared"))
    mo.vstack([
        mo.md(f"""
        **{break_pick.value}** — {_row['what it does']}. First difference from the clean run:
        **{_row['first difference vs clean']}**. Invariant: **{_row['invariant that fires']}**.
        """),
        mo.hstack(_panels, justify="start", wrap=True),
    ])
    return


@app.cell
def _(alt, break_pick, cfg, decode_by_hand, ids, lessons, mo, model, pieces, pl):
    # Each break's own signature: what to look for when an engine is suspected of it. The three that no internal
    # invariant catches (both paths share them) get a chart of their own.
    _name = break_pick.value
    _group = cfg.n_heads // cfg.n_kv_heads
    break_signature = None
    if _name in ("rope-style-swap", "rope-base-10k"):
        break_signature = lessons.rope_difference_by_position(model, ids, frozenset({_name}))
        _chart = alt.Chart(break_signature).mark_line(point=True).encode(
            x=alt.X("position:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y("relative difference:Q"),
            tooltip=["position", alt.Tooltip("relative difference:Q", format=".4f")],
        ).properties(width=420, height=180, title=f"layer 0: |q after RoPE, {_name} − clean| / |clean|, per position")
        _v = break_signature["relative difference"].to_list()
        _text = (f"Exactly **{_v[0]:.0e}** at position 0 (never rotated), then {_v[1]:.2f} at position 1 and "
                 f"{_v[-1]:.2f} at position {len(_v) - 1}. " + (
                     "The wrong pairs are rotated from the first turn on: the difference is large at once — any test "
                     "with two or more tokens against a reference shows it; a one-token test never does."
                     if _name == "rope-style-swap" else
                     f"The fast pairs turn the same with either base (pair 0 turns 1 rad per position whatever the "
                     f"base), only the slow ones differ, by position × (10000^(−2i/d) − {cfg.rope_base:g}^(−2i/d)): the "
                     "error starts small and grows with the position — a short test against a reference may pass."))
    elif _name == "head-dim-from-hidden":
        _pos = len(ids) - 1
        _broken, _, _, _c = decode_by_hand(_pos, frozenset({_name}))
        _clean, _, _, _ = decode_by_hand(_pos)
        _ent = [lessons.attention_entropy(lessons.attention_pattern(layers[0], _group, c.attn_scale, pieces)[0])
                .with_columns(pl.lit(label).alias("step")) for layers, c, label in ((_clean, cfg, "clean"), (_broken, _c, _name))]
        break_signature = pl.concat(_ent)
        _chart = alt.Chart(break_signature).mark_bar().encode(
            x=alt.X("head:O"), xOffset=alt.XOffset("step:N"), y=alt.Y("entropy:Q", title="attention entropy (nats)"),
            color=alt.Color("step:N", scale=alt.Scale(range=["#4c78a8", "#e45756"]), title=None),
            tooltip=["step", "head", alt.Tooltip("entropy:Q", format=".3f")],
        ).properties(width=420, height=180, title=f"layer 0, position {_pos}: how spread each head's attention is")
        _means = break_signature.group_by("step").agg(pl.col("entropy").mean()).sort("step")
        _m = dict(zip(_means["step"].to_list(), _means["entropy"].to_list()))
        _text = (f"head_dim taken as hidden ÷ heads = {cfg.hidden // cfg.n_heads} instead of the file's {cfg.head_dim}: the "
                 f"scores are scaled by 1/√{cfg.hidden // cfg.n_heads} = {_c.attn_scale:.3f} instead of {cfg.attn_scale:.3f}, "
                 f"and RoPE turns only the first {_c.rope_dim} of each head's {cfg.head_dim} dims. Larger scores make a sharper "
                 f"softmax: the mean attention entropy over layer 0's heads falls from {_m['clean']:.2f} to {_m[_name]:.2f} nats. "
                 "The tensors keep their shapes, so nothing crashes.")
    else:
        _chart, _text = None, {
            "skip-qk-norm": "Its signature is the QK panel above: post-norm RMS equal to pre-norm RMS, head by head.",
            "no-topk-renorm": "Its signature is in the routing frame: the chosen experts' weights sum to less than 1.",
            "moe-as-dense": "Its signature is the routing heat map above: one expert for every token, at every layer.",
            "cache-off-by-one": "Its signature is the equivalence chart above: cached ≠ uncached from the first decode step "
                                "(step 1), never at the prefill.",
        }.get(_name, "")
    mo.vstack([mo.md(f"**Its signature.** {_text}"), _chart if _chart is not None else mo.md("")])
    return (break_signature,)


@app.cell(hide_code=True)
def _(mo):
    mo.md(r"""
    ## Where to go next

    * `marimo run notebooks/workbench.py` (or `make run`): the same engine as an app — step decoding token by
      token and watch every panel of this notebook update live, on this model or any GGUF file, with any
      break switched on.
    * `workbench trace tiny-qwen3moe --prompt "…" --steps 32 --out run.parquet`, then `workbench diff a.parquet
      b.parquet`: the traces and the diff of section 8, from the command line.
    * `workbench bench smollm2-135m`: section 5 on a real 135 M-parameter model.
    * `workbench/model.py` is the forward pass of section 3 in one file; read it next.
    """)
    return


@app.cell
def _(by_hand_max_diff, break_report, equiv_worst, mla_cache, mla_forms, mo, olmoe_summary, qwen3_30b_kv_bytes_32k,
      shared_breaks, shared_share, sink_breaks, sink_frame, sink_recorded_gap, sink_summary, speed_growth,
      speedup_measured, v3_changes, v3_kv_bytes):
    # A one-line summary for headless runs (`python notebooks/walkthrough.py`); silent in the editor.
    if not mo.running_in_notebook():
        _alarms = ", ".join(f"{r['break']}→{r['alarm frame'] or r['first frame']}@{r['alarm step'] if r['alarm frame'] else r['first step']}"
                            for r in break_report.iter_rows(named=True))
        _mla_forms = float(mla_forms["max |MHA-form pattern − engine's|"].max())
        print(f"walkthrough: by-hand vs engine max|Δlogit| = {by_hand_max_diff:.2e}; "
              f"cached/uncached = {speedup_measured or float('nan'):.1f}x, worst relative Δ = {equiv_worst:.1e}; "
              f"step cost late/early: " + ", ".join(f"{r['path']} {r['ratio']:.1f}x" for r in speed_growth.iter_rows(named=True))
              + "; "
              f"Qwen3-30B-A3B KV @32k = {qwen3_30b_kv_bytes_32k / 2**30:.2f} GiB; breaks: {_alarms}; "
              f"shared expert (tiny-qwen2moe): gate {shared_share['gate'].min():.2f}–{shared_share['gate'].max():.2f}, "
              f"mean share {shared_share['shared share'].mean():.2f}, relative max|Δlogit| "
              + ", ".join(f"{r['break']} {r['relative max |Δlogit|']:.2f}" for r in shared_breaks.iter_rows(named=True)
                          if r["break"] != "clean")
              + "; whole-row QK-norm (tiny-olmoe): head RMS ÷ weight "
              + ", ".join(f"{r['norm']} {r['head RMS ÷ weight, min']:.2f}–{r['head RMS ÷ weight, max']:.2f}"
                          for r in olmoe_summary.iter_rows(named=True))
              + f"; MLA (tiny-deepseek2): {mla_cache['bytes per position and layer'][-1]:.0f} vs MHA "
              f"{mla_cache['MHA bytes per position and layer'][-1]:.0f} B per position and layer, engine vs MHA-form "
              f"pattern {_mla_forms:.0e}, "
              f"DeepSeek-V3 {v3_kv_bytes['MLA']:,} vs {v3_kv_bytes['MHA']:,} B per token (bf16); V3 routing: "
              f"choice ≠ plain top-k at {int(v3_changes['chosen ≠ plain top-k'].sum())} of {int(v3_changes['positions'].sum())}; "
              f"sinks (tiny-gpt-oss): share {sink_frame['sink share'].min():.2f}–{sink_frame['sink share'].max():.2f}, "
              f"written out to {float(sink_summary['max |share − written out|'].max()):.0e}, attention frame to "
              f"{sink_recorded_gap:.0e}, relative max|Δlogit| "
              + ", ".join(f"{r['break']} {r['relative max |Δlogit|']:.2f}" for r in sink_breaks.iter_rows(named=True)
                          if r["break"] != "clean"))
    return


if __name__ == "__main__":
    app.run()
