import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="GGUF decode workbench")


@app.cell
def _():
    try:  # first: this file would shadow the `workbench` package (notebooks/_unshadow.py says when and why)
        import _unshadow  # noqa: F401
    except ModuleNotFoundError:  # loaded by its path, as the tests do: nothing shadows the package
        pass

    import html
    import io
    import os

    import altair as alt
    import marimo as mo
    import polars as pl
    import torch

    from workbench import app_state, charts
    from workbench.loading import default_threads, describe_weights, set_threads
    from workbench.model import BREAKS, Model
    from workbench.models import DEFAULT_MODEL, bundled_names
    from workbench.session import Sampling, Session
    from workbench.trace import Trace
    return (BREAKS, DEFAULT_MODEL, Model, Sampling, Session, Trace, alt, app_state, bundled_names, charts,
            default_threads, describe_weights, html, io, mo, os, set_threads, torch)


@app.cell
def _(mo):
    mo.md("""
    # GGUF decode workbench
    Load a GGUF model, step decoding one token at a time, and watch the KV cache grow, the per-head
    query/key statistics before and after QK-norm, which experts the router picks, and the tokens/s of the
    KV-cached path beside the uncached path that recomputes the whole sequence every step.
    """)
    return


@app.cell
def _(DEFAULT_MODEL, bundled_names, default_threads, mo, os, torch):
    FILE = "a GGUF file…"
    model_choice = mo.ui.dropdown(options=[*bundled_names(), FILE], value=DEFAULT_MODEL, label="model")
    model_path = mo.ui.text(placeholder="/path/to/model.gguf", label="file", full_width=True)
    load_button = mo.ui.run_button(label="Load file")
    _devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    device = mo.ui.dropdown(options=_devices, value="auto", label="device")
    dtype = mo.ui.dropdown(options=["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype")
    weights = mo.ui.dropdown(options=["auto", "dequantized", "quantized"], value="auto", label="weights")
    threads = mo.ui.number(start=1, stop=max(os.cpu_count() or 1, default_threads()), step=1, value=default_threads(),
                           label="CPU threads")
    return FILE, device, dtype, load_button, model_choice, model_path, threads, weights


@app.cell
def helpers(html, mo):
    def error_callout(title, message, kind="danger"):
        """A callout: a bold title and one sentence, both as plain text (a message may hold `<`, `_` or `*`)."""
        return mo.callout(mo.Html(f"<p><strong>{html.escape(title)}</strong> {html.escape(message)}</p>"), kind=kind)

    # This tab's model: the models themselves live in app_state.MODELS, one copy per server process for every
    # tab; this keeps the one the tab shows, so that a failed load keeps it.
    get_model, set_model = mo.state(None)
    return error_callout, get_model, set_model


@app.cell
def _(default_threads, threads):
    # torch keeps its CPU thread count per OS thread and every tab's kernel is its own thread, so the count is
    # applied (set_threads) right before each load and each step of this tab.
    thread_count = int(threads.value) if threads.value else default_threads()
    return (thread_count,)


@app.cell
def load_model(FILE, Model, app_state, device, dtype, get_model, load_button, mo, model_choice, model_path, set_model,
               set_threads, thread_count, weights):
    _source = model_path.value.strip() if model_choice.value == FILE else model_choice.value
    model, load_error = get_model(), None  # with "a GGUF file…": wait for a path and a click on "Load file"
    if model_choice.value != FILE or (load_button.value and _source):
        try:
            set_threads(thread_count)
            with mo.status.progress_bar(total=1, title=f"Loading {_source}", remove_on_exit=True) as _bar:
                def _progress(done, total):
                    _bar.total = total
                    _bar.update(increment=done - _bar.current, subtitle=f"layer {min(done, total - 1)} of {total - 1}")

                with app_state.device_turn(device.value):
                    model = app_state.MODELS.get(
                        app_state.model_key(_source, device.value, dtype.value, weights.value),
                        lambda: Model.load(_source, device.value, dtype.value, progress=_progress, weights=weights.value))
            set_model(model)
        except Exception as _exc:  # anything at all: the tab keeps the model it had
            load_error = app_state.describe_error(_exc)
    return load_error, model


@app.cell
def model_card(FILE, app_state, describe_weights, device, dtype, error_callout, load_button, load_error, mo, model, model_choice,
               model_path, thread_count, threads, weights):
    def _card(m):
        c, info = m.config, m.info
        types = sorted({t.type_name for t in m.gguf.tensors.values()})
        rows = {
            "file": m.gguf.path.name, "arch": c.arch, "parameters": f"{m.n_params / 1e6:.1f} M",
            "quant types": ", ".join(types), "file size": f"{m.gguf.size / 2**20:.1f} MiB",
            "layers × hidden": f"{c.n_layers} × {c.hidden}",
            "heads / KV heads × head_dim": f"{c.n_heads} / {c.n_kv_heads} × {c.head_dim}",
            "context": f"{c.context_length:,}", "experts": f"{c.n_experts_used} of {c.n_experts}" if c.is_moe else "dense",
            "QK-norm": "yes" if c.qk_norm else "no", "RoPE": f"{c.rope_style}, base {c.rope_base:g}",
            "device / dtype": f"{info.device} / {str(info.dtype).removeprefix('torch.')}",
            "weights": describe_weights(info.weights, info.dtype), "CPU threads": f"{thread_count} (this tab's loads and steps)",
            "load": f"{info.seconds:.2f} s", "weights on device": f"{info.weight_bytes / 2**20:.1f} MiB",
            "shared": f"one copy in this server process for every tab ({app_state.MODELS.alive()} model(s) in memory)",
        }
        def _cell(v):  # a `|` in a value (max |logit|) would end its table cell
            return str(v).replace("|", "\\|")

        return mo.md("| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows.items()))

    _controls = mo.hstack([model_choice, device, dtype, weights, threads], justify="start")
    _file_row = mo.hstack([model_path, load_button], justify="start") if model_choice.value == FILE else None
    _notes = []
    if load_error:
        _notes.append(error_callout("Could not load the model.", f"{load_error} The model loaded before is kept."))
    _card_view = _card(model) if model is not None else mo.md("_No model loaded yet._")
    mo.vstack([v for v in (_controls, _file_row, *_notes, mo.accordion({"Model card": _card_view}, lazy=False)) if v is not None])
    return


@app.cell
def _(BREAKS, mo):
    prompt = mo.ui.text_area(value="def fibonacci(n):\n    ", label="prompt", full_width=True, rows=3)
    temperature = mo.ui.number(start=0, stop=5, step=0.1, value=0, label="temperature")
    top_k = mo.ui.number(start=0, stop=1000, step=1, value=0, label="top-k")
    top_p = mo.ui.number(start=0.01, stop=1, step=0.01, value=1, label="top-p")
    seed = mo.ui.number(start=0, stop=2**31 - 1, step=1, value=0, label="seed")
    path = mo.ui.radio(options=["both", "cached", "uncached"], value="both", label="path", inline=True)
    breaks = mo.ui.dropdown(options=["none", *BREAKS], value="none", label="break it")
    use_reference = mo.ui.dropdown(options=["off", "llama.cpp", "llama.cpp-f32"], value="off", label="reference")
    max_steps = mo.ui.slider(start=1, stop=256, value=32, label="Run: max steps", show_value=True)
    step_button = mo.ui.run_button(label="Step")
    step8_button = mo.ui.run_button(label="Step ×8")
    run_button = mo.ui.run_button(label="Run")
    reset_button = mo.ui.run_button(label="Reset")
    mo.vstack([
        prompt,
        mo.hstack([temperature, top_k, top_p, seed], justify="start"),
        mo.hstack([path, breaks, use_reference], justify="start"),
        mo.hstack([step_button, step8_button, run_button, max_steps, reset_button], justify="start"),
    ])
    return (breaks, max_steps, path, prompt, reset_button, run_button, seed, step8_button, step_button, temperature,
            top_k, top_p, use_reference)


@app.cell
def _(mo):
    # The one piece of state that must outlive a cell run: the session being stepped.
    get_session, set_session = mo.state(None)
    return get_session, set_session


@app.cell
def new_session(Sampling, Session, app_state, breaks, error_callout, get_session, model, path, prompt, reset_button,
                seed, set_session, temperature, top_k, top_p, use_reference):
    # A new session whenever what defines it changes (or Reset is clicked); anything that fails keeps the old one.
    session_error = None
    if model is not None:
        _key = (id(model), prompt.value, temperature.value, top_k.value, top_p.value, seed.value, path.value,
                breaks.value, use_reference.value)
        _old = get_session()
        if _old is None or _old[0] != _key or reset_button.value:
            try:
                _ids = model.tokenizer.encode(prompt.value)
                with app_state.device_turn(model.device):  # the KV cache is allocated on the device
                    _session = Session(
                        model, _ids, path=path.value,
                        sampling=Sampling(float(temperature.value), int(top_k.value), float(top_p.value), int(seed.value)),
                        context=min(model.config.context_length, len(_ids) + 512),
                        probes=True, breaks=frozenset() if breaks.value == "none" else frozenset({breaks.value}),
                        reference=None if use_reference.value == "off" else use_reference.value,
                    )
                set_session((_key, _session))
            except Exception as _exc:
                session_error = app_state.describe_error(_exc)
    error_callout("This input was not applied.", f"{session_error} The session so far is kept.") if session_error else None
    return (session_error,)


@app.cell
def advance(app_state, error_callout, get_session, max_steps, mo, run_button, step8_button, step_button,
            thread_count):
    # Step, Step ×8 or Run: advance the session, then hand its trace to the panels. A failed step is a callout;
    # the session, its trace and the panels stay as they were, and the next Step goes on from there.
    _entry = get_session()
    session = _entry[1] if _entry else None
    _note = None
    _n = 1 if step_button.value else 8 if step8_button.value else max_steps.value if run_button.value else 0
    if session is not None and _n:
        # Step ×8 and Run show a progress bar, with the newest text streaming in its subtitle.
        with mo.status.progress_bar(total=_n, title="Decoding", remove_on_exit=True, disabled=_n == 1) as _bar:
            def _progress(s):
                _tail = s.model.tokenizer.decode(s.ids[len(s.prompt_ids):])[-60:]
                _bar.update(subtitle=f"{s.n_generated} tokens · …{_tail!r}")

            _stop, _failed = app_state.advance(session, _n, thread_count, _progress)
        if _failed:
            _note = error_callout("The step failed and did not happen.", f"{_failed} The session keeps its "
                                  f"{session.n_generated} generated token(s); Step goes on from there.")
        elif _stop:
            _note = mo.callout(mo.md(("The model produced an end-of-generation token." if _stop == "eos"
                                      else "The context is full.") + " Reset to start again."), kind="warn")
    if session is not None and session.reference_error and _note is None:  # it refused the file or crashed
        _note = error_callout(f"The {session.reference} reference is off.", session.reference_error, kind="warn")
    trace = None
    if session is not None:
        try:
            trace = session.trace()
        except Exception as _exc:
            _note = error_callout("The trace could not be built.", app_state.describe_error(_exc))
    _note
    return session, trace


@app.cell
def _(mo):
    upload = mo.ui.file(filetypes=[".parquet"], label="Show a saved trace")
    upload
    return (upload,)


@app.cell
def show_upload(Trace, app_state, error_callout, html, io, mo, trace, upload):
    # The panels show the live trace, or a saved one when a file was dropped in (no model needed).
    shown = trace
    _note = None
    if upload.value:
        try:
            shown = Trace.read(io.BytesIO(upload.contents()), name=upload.name())
            _note = mo.callout(mo.md(f"Showing the saved trace **{html.escape(upload.name())}** ({shown.meta.get('arch')}, "
                                     f"{shown.tokens['step'].n_unique()} steps). Remove the file to go back."), kind="info")
        except Exception as _exc:  # Trace.read names the file (`name`); anything else is shown the same way
            _note = error_callout("Not a workbench trace.", app_state.describe_error(_exc))
    _note
    return (shown,)


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None, mo.md("_Load a model to begin._"))
    _tokens = shown.tokens
    _n = _tokens["step"].n_unique() if _tokens.height else 0
    mo.vstack([
        mo.md(f"## Generated text\n{_n} generated token(s) after a {len(shown.meta['prompt_ids'])}-token prompt; "
              "hover a token for its id, position, probability and the top-k alternatives."),
        mo.Html(charts.token_html(shown.meta["prompt_pieces"], shown.meta["prompt_ids"], _tokens,
                                  charts.primary_path(shown.meta, _tokens))),
    ])
    return


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None)
    _kv = shown.kv
    _path = charts.primary_path(shown.meta, _kv)
    _length = int(_kv.filter(_kv["path"] == _path)["length"].max() or 0) if _kv.height else 0
    mo.vstack([
        mo.md("## KV cache\n" + charts.kv_arithmetic(shown.meta, _length)),
        mo.hstack([mo.ui.altair_chart(charts.kv_growth(_kv, _path)), mo.ui.altair_chart(charts.kv_positions(_kv, _path))], justify="start"),
    ])
    return


@app.cell
def _(mo, shown):
    mo.stop(shown is None)
    _steps = sorted(shown.qk["step"].unique().to_list()) if shown.qk.height else [0]
    qk_step = mo.ui.slider(start=_steps[0], stop=max(_steps[-1], _steps[0] + 1), value=_steps[-1], label="step", show_value=True)
    qk_tensor = mo.ui.radio(options=["q", "k"], value="q", inline=True, label="tensor")
    return qk_step, qk_tensor


@app.cell
def _(alt, charts, mo, qk_step, qk_tensor, shown):
    _selection = alt.selection_point(fields=["layer", "head"], name="cell")
    qk_chart = mo.ui.altair_chart(charts.qk_heatmap(shown.qk, qk_step.value, qk_tensor.value, _selection,
                                                   charts.primary_path(shown.meta, shown.qk)))
    return (qk_chart,)


@app.cell
def _(charts, mo, qk_chart, qk_step, qk_tensor, shown):
    _picked = qk_chart.value
    _layer, _head = (int(_picked["layer"][0]), int(_picked["head"][0])) if _picked is not None and len(_picked) else (0, 0)
    _stages = ", ".join(sorted(shown.qk["stage"].unique().to_list())) if shown.qk.height else ""
    _note = "" if "post" in _stages else " This model has no QK-norm: only the pre-RoPE statistics (stage `pre`) exist."
    mo.vstack([
        mo.md(f"## QK norm\nRMS of each head's query and key vectors before (`pre`) and after (`post`) the per-head "
              f"RMSNorm.{_note}"),
        mo.hstack([qk_tensor, qk_step], justify="start"),
        mo.hstack([qk_chart, mo.ui.altair_chart(charts.qk_over_steps(shown.qk, _layer, _head, charts.primary_path(shown.meta, shown.qk)))], justify="start"),
    ])
    return


@app.cell
def _(mo, shown):
    mo.stop(shown is None)
    _cfg = shown.meta["config"]
    route_layer = mo.ui.slider(start=0, stop=max(_cfg["n_layers"] - 1, 1), value=0, label="layer", show_value=True)
    return (route_layer,)


@app.cell
def _(charts, mo, route_layer, shown):
    _cfg = shown.meta["config"]
    _path = charts.primary_path(shown.meta, shown.routing)
    if _cfg["n_experts"] == 0:
        _body = mo.md(f"This model ({shown.meta['arch']}) has no experts: every token goes through the same dense FFN.")
    elif shown.routing.is_empty():
        _body = mo.md("_Step once to see the router's choices._")
    else:
        _body = mo.vstack([
            route_layer,
            mo.hstack([mo.ui.altair_chart(charts.routing_histogram(shown.routing, route_layer.value, _cfg["n_experts"], _path)),
                       mo.ui.altair_chart(charts.routing_heatmap(shown.routing, _path)),
                       mo.ui.altair_chart(charts.routing_last_token(shown.routing, _path))], justify="start", wrap=True),
        ])
    mo.vstack([mo.md(f"## Expert routing\n{_cfg['n_experts_used']} of {_cfg['n_experts']} experts per token."
                     if _cfg["n_experts"] else "## Expert routing"), _body])
    return


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None)
    _speed = charts.speedup(shown.tokens)
    mo.vstack([
        mo.md("## Tokens/s\nLatency of each step for the KV-cached path (one token through the model) and the uncached "
              "path (the whole sequence again), over position; the prefill is drawn apart."),
        mo.hstack([
            mo.stat(value=charts.fmt_speedup(_speed), label="cached / uncached speedup", caption="last 8 steps", bordered=True),
            mo.ui.altair_chart(charts.step_latency(shown.tokens)), mo.ui.altair_chart(charts.tokens_per_s(shown.tokens)),
        ], justify="start", wrap=True),
    ])
    return


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None)
    _tol = shown.meta.get("equiv_tolerance")  # None: a trace written before the session recorded it
    _bound = "the recorded tolerance (not recorded in this trace)" if _tol is None else f"{_tol:g}"
    mo.vstack([
        mo.md("## Equivalence\nThe uncached path is run on the tokens the cached path chose; their logits must agree to "
              f"{_bound} × max |logit| (dashed) with the same argmax. That bound is 1e-4 in float32 with dequantized weights; "
              "quantized weights (their matmuls take bf16 activations) loosen it to 4e-2 and a bf16/fp16 dtype to 1e-1: "
              "load with weights 'dequantized' and dtype float32 for the tight check."),
        mo.ui.altair_chart(charts.equivalence(shown.equiv, _tol)),
    ])
    return


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None)
    _bad = shown.first_bad_layer()
    _msg = (f"First non-finite value: step {_bad['step'][0]}, layer {_bad['first_bad_layer'][0]}." if _bad.height
            else "No NaN or Inf so far.")
    mo.vstack([mo.md(f"## Layer health\n{_msg}"), mo.ui.altair_chart(charts.layer_health(shown.layers, charts.primary_path(shown.meta, shown.layers)))])
    return


@app.cell
def _(charts, mo, shown):
    mo.stop(shown is None)
    mo.vstack([mo.md("## Reference\nllama.cpp on the same tokens (choose it above; needs llama-cpp-python): "
                     "**llama.cpp** runs the file as it is, with 8-bit activations (cosine 0.99–0.9999 is normal); "
                     "**llama.cpp-f32** runs an F32 copy with an F32 KV cache, the exact reference (≥ 0.999999 against "
                     "dequantized float32 weights)."), mo.ui.altair_chart(charts.reference(shown.reference))])
    return


@app.cell
def _(io, mo, shown):
    mo.stop(shown is None)

    def _parquet():
        _buffer = io.BytesIO()
        shown.write(_buffer)
        return _buffer.getvalue()

    mo.download(data=_parquet, filename="workbench-trace.parquet", label="Download the trace (Parquet)")
    return


if __name__ == "__main__":
    app.run()
