import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="GGUF decode workbench", css_file="workbench.css")


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
    from workbench.model import BREAKS, Model, breaks_that_apply
    from workbench.models import DEFAULT_MODEL, REAL_MODELS, bundled_names
    from workbench.session import Sampling, Session
    from workbench.trace import Trace

    # Chart data inline in the spec, not as marimo virtual files: a redraw deletes the old chart's file while the
    # browser may still fetch it (a 404 and a server traceback per chart per step).
    if "marimo_inline_csv" in alt.data_transformers.names():  # registered by marimo's kernel (not in a bare import)
        alt.data_transformers.enable("marimo_inline_csv")
    return (BREAKS, DEFAULT_MODEL, Model, REAL_MODELS, Sampling, Session, Trace, alt, app_state, breaks_that_apply,
            bundled_names, charts, default_threads, describe_weights, html, io, mo, os, pl, set_threads, torch)


@app.cell
def _(DEFAULT_MODEL, REAL_MODELS, bundled_names, default_threads, mo, os, torch):
    FILE = "a GGUF file…"

    def _label(name):  # the random tiny models decode noise: say so where they are picked
        if name == DEFAULT_MODEL:
            return f"{name} (trained here, 17 MB)"
        return name if name in REAL_MODELS else f"{name} (random weights)"

    model_choice = mo.ui.dropdown(options={**{_label(n): n for n in bundled_names()}, FILE: FILE},
                                  value=_label(DEFAULT_MODEL), label="model")
    # A form: Enter or its button loads; an empty path is answered (load_model), not ignored.
    model_path = mo.ui.text(placeholder="/path/to/model.gguf", full_width=True).form(
        submit_button_label="Load file", clear_on_submit=False, bordered=False)
    _devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    device = mo.ui.dropdown(options=_devices, value="auto", label="device")
    dtype = mo.ui.dropdown(options=["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype")
    weights = mo.ui.dropdown(options=["auto", "blocks", "dequantized", "quantized"], value="auto", label="weights")
    threads = mo.ui.number(start=1, stop=max(os.cpu_count() or 1, default_threads()), step=1, value=default_threads(),
                           label="CPU threads")
    return FILE, device, dtype, model_choice, model_path, threads, weights


@app.cell
def helpers(html, mo):
    def error_callout(title, message, kind="danger"):
        """A callout: a bold title and one sentence, both as plain text (a message may hold `<`, `_` or `*`).
        The sentence starts with a capital, as a sentence after a title should (not when it starts with a name:
        a file, an identifier)."""
        _first = message.split(" ", 1)[0] if message else ""
        if _first.isalpha() and _first.islower():
            message = message[:1].upper() + message[1:]
        return mo.callout(mo.Html(f"<p><strong>{html.escape(title)}</strong> {html.escape(message)}</p>"), kind=kind)

    def small(chart, width=260, height=110):
        """A chart sized for the first screen's two-by-two grid."""
        try:
            return chart.properties(width=width, height=height)
        except Exception:  # a concatenated chart has no single size
            return chart

    def view(chart):
        """A chart on the page without marimo's own selections (none of these charts is read back), which would
        also make vega log "Unrecognized signal name" for every layered chart."""
        return mo.ui.altair_chart(chart, chart_selection=False, legend_selection=False)

    # This tab's model: the models themselves live in app_state.MODELS, one copy per server process for every
    # tab; this keeps the one the tab shows, so that a failed load keeps it.
    get_model, set_model = mo.state(None)
    return error_callout, get_model, set_model, small, view


@app.cell
def _(default_threads, threads):
    # torch keeps its CPU thread count per OS thread and every tab's kernel is its own thread, so the count is
    # applied (set_threads) right before each load and each step of this tab.
    thread_count = int(threads.value) if threads.value else default_threads()
    return (thread_count,)


@app.cell
def load_model(FILE, Model, app_state, device, dtype, get_model, mo, model_choice, model_path, set_model,
               set_threads, thread_count, weights):
    model, load_error = get_model(), None  # with "a GGUF file…": wait for a path and Enter / "Load file"
    _source = None
    if model_choice.value != FILE:
        _source = model_choice.value
    elif model_path.value is not None:  # submitted
        _source = model_path.value.strip()
        if not _source:
            load_error = "the path is empty: type the path of a .gguf file, then press Enter."
    if _source:
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
def model_card(FILE, app_state, describe_weights, device, dtype, error_callout, load_error, mo, model, model_choice,
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

    _notes = []
    if load_error:
        _notes.append(error_callout("Could not load the model.", f"{load_error} The model loaded before is kept."))
    card_view = _card(model) if model is not None else mo.md("_No model loaded yet._")
    _summary = (f"**{model.gguf.path.name}** · {model.config.arch} · {model.n_params / 1e6:.0f} M · "
                f"{str(model.info.dtype).removeprefix('torch.')} {model.info.weights}" if model is not None else "")
    mo.sidebar([
        mo.md("### GGUF decode workbench"),
        model_choice, *([model_path] if model_choice.value == FILE else []),
        mo.hstack([device, dtype], justify="start"), weights, threads,
        *_notes, mo.md(_summary),
    ], width="360px")
    return (card_view,)


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
    teaching = mo.ui.checkbox(value=True, label="record attention and the logit lens (slower steps)")
    # Click counters, not run buttons: the cell they drive re-runs on every redraw of a run, and a run button
    # can still read True then; a counter says exactly how many clicks there have been (app_state.Runner.clicked).
    step_button = mo.ui.button(value=0, on_click=lambda n: n + 1, label="Step")
    step8_button = mo.ui.button(value=0, on_click=lambda n: n + 1, label="Step ×8")
    run_button = mo.ui.button(value=0, on_click=lambda n: n + 1, label="Run")
    stop_button = mo.ui.button(value=0, on_click=lambda n: n + 1, label="Stop", kind="danger")
    reset_button = mo.ui.run_button(label="Reset")
    return (breaks, max_steps, path, prompt, reset_button, run_button, seed, step8_button, step_button,
            stop_button, teaching, temperature, top_k, top_p, use_reference)


@app.cell
def _(BREAKS, breaks, breaks_that_apply, max_steps, mo, model, path, prompt, reset_button, run_button, seed,
      step8_button, step_button, stop_button, teaching, temperature, top_k, top_p, use_reference):
    _notes = []
    if model is not None and breaks.value != "none" and breaks.value not in breaks_that_apply(model.config):
        _notes.append(mo.callout(mo.md(f"`{breaks.value}` changes nothing on {model.config.arch}: "
                                       f"{BREAKS[breaks.value]}, which this model does not have or do."), kind="warn"))
    mo.sidebar([
        prompt,
        mo.hstack([temperature, seed], justify="start"), mo.hstack([top_k, top_p], justify="start"),
        path, breaks, use_reference, teaching, *_notes,
        mo.hstack([step_button, step8_button, run_button, stop_button, reset_button], justify="start", wrap=True),
        max_steps,
    ], width="360px")
    return


@app.cell
def _(mo):
    # The one piece of state that must outlive a cell run: the session being stepped. `runner` decodes Step ×8
    # and Run in a thread of its own (app_state.Runner) while this tab's kernel stays free for Stop and redraws.
    get_session, set_session = mo.state(None)
    get_running, set_running = mo.state(False)
    return get_running, get_session, set_running, set_session


@app.cell
def _(app_state):
    runner = app_state.Runner()
    return (runner,)


@app.cell
def new_session(Sampling, Session, app_state, breaks, error_callout, get_session, model, path, prompt, reset_button,
                runner, seed, set_session, teaching, temperature, top_k, top_p, use_reference):
    # A new session whenever what defines it changes (or Reset is clicked); anything that fails keeps the old one.
    # A run of the old session is stopped first (Reset works while Run goes).
    session_error = None
    if model is not None:
        _key = (id(model), prompt.value, temperature.value, top_k.value, top_p.value, seed.value, path.value,
                breaks.value, use_reference.value, teaching.value)
        _old = get_session()
        if _old is None or _old[0] != _key or reset_button.value:
            try:
                runner.stop()
                _ids = model.tokenizer.encode(prompt.value)
                with app_state.device_turn(model.device):  # the KV cache is allocated on the device
                    _session = Session(
                        model, _ids, path=path.value,
                        sampling=Sampling(float(temperature.value), int(top_k.value), float(top_p.value), int(seed.value)),
                        context=min(model.config.context_length, len(_ids) + 512),
                        probes=True, attention=bool(teaching.value), lens=bool(teaching.value), timing_repeats=3,
                        breaks=frozenset() if breaks.value == "none" else frozenset({breaks.value}),
                        reference=None if use_reference.value == "off" else use_reference.value,
                    )
                set_session((_key, _session))
            except Exception as _exc:
                session_error = app_state.describe_error(_exc)
    error_callout("This input was not applied.", f"{session_error} The session so far is kept.") if session_error else None
    return (session_error,)


@app.cell
def _(get_running, mo):
    # While a run goes, this ticks: every tick redraws the panels from the steps landed so far.
    ticker = mo.ui.refresh(options=["1s"], default_interval="1s") if get_running() else None
    mo.sidebar([mo.md("_decoding…_"), ticker]) if ticker is not None else None
    return (ticker,)


@app.cell
def advance(app_state, error_callout, get_running, get_session, max_steps, mo, run_button, runner, set_running,
            step8_button, step_button, stop_button, thread_count, ticker, upload):
    # Step runs here, at once; Step ×8 and Run start the runner's thread, and the ticker redraws while it goes;
    # Stop ends a run after the step it is in. A failed step is a callout; the session, its trace and the panels
    # stay as they were, and the next Step goes on from there.
    _entry = get_session()
    session = _entry[1] if _entry else None
    _ = ticker.value if ticker is not None else None  # a tick: redraw
    _note = None
    _new = runner.clicked(step=step_button.value, step8=step8_button.value, run=run_button.value, stop=stop_button.value)
    _n = 1 if "step" in _new else 8 if "step8" in _new else max_steps.value if "run" in _new else 0
    if "stop" in _new:
        runner.stop()
    elif session is not None and _n and upload.value:
        _note = mo.callout(mo.md("A saved trace is shown: remove the file in the Trace tab to go on stepping the "
                                 "live session."), kind="warn")
    elif session is not None and _n and runner.running:
        _note = mo.callout(mo.md("A run is going: Stop it first."), kind="warn")
    elif session is not None and _n == 1:
        runner.step_here(session, thread_count)
    elif session is not None and _n:
        runner.start(session, _n, thread_count)
    if runner.running != get_running():
        set_running(runner.running)
    _stop, _failed = runner.outcome if runner.session is session else (None, None)
    if _failed:
        _note = error_callout("The step failed and did not happen.", f"{_failed} The session keeps its "
                              f"{session.n_generated} generated token(s); Step goes on from there.")
    elif _stop in ("eos", "context"):
        _note = mo.callout(mo.md(("The model produced an end-of-generation token." if _stop == "eos"
                                  else "The context is full.") + " Reset to start again."), kind="warn")
    elif runner.running and runner.session is session:
        _note = mo.md(f"_Decoding: step {runner.done} of {runner.goal}. Stop ends it after the step in progress._")
    if session is not None and session.reference_error and _note is None:  # it refused the file or crashed
        _note = error_callout(f"The {session.reference} reference is off.", session.reference_error, kind="warn")
    trace = None
    if session is not None:
        try:
            trace = runner.trace(session)
        except Exception as _exc:
            _note = error_callout("The trace could not be built.", app_state.describe_error(_exc))
    _note
    return session, trace


@app.cell
def _(mo):
    upload = mo.ui.file(filetypes=[".parquet"], label="Show a saved trace")
    return (upload,)


@app.cell
def show_upload(Trace, app_state, error_callout, html, io, mo, trace, upload):
    # The panels show the live trace, or a saved one when a file was dropped in (no model needed).
    shown = trace
    upload_note = None
    if upload.value:
        try:
            shown = Trace.read(io.BytesIO(upload.contents()), name=upload.name())
            upload_note = mo.callout(mo.md(f"Showing the saved trace **{html.escape(upload.name())}** "
                                           f"({shown.meta.get('arch')}, {shown.tokens['step'].n_unique()} steps). "
                                           "Remove the file to go back to the live session."), kind="info")
        except Exception as _exc:  # Trace.read names the file (`name`); anything else is shown the same way
            upload_note = error_callout("Not a workbench trace.", app_state.describe_error(_exc))
    upload_note
    return shown, upload_note


@app.cell
def _(model, shown):
    # Token id → its text, for the hovers and the lens: the loaded model's tokenizer when it is the shown trace's
    # model (a saved trace of another file shows ids).
    piece_of = (model.tokenizer.piece if model is not None and shown is not None
                and str(model.gguf.path) == shown.meta.get("model_file") else None)
    return (piece_of,)


@app.cell
def _(charts, mo, piece_of, shown):
    mo.stop(shown is None, mo.md("_Load a model to begin._"))
    _tokens = shown.tokens
    _n = _tokens["step"].n_unique() if _tokens.height else 0
    _view = charts.token_html(shown.meta["prompt_pieces"], shown.meta["prompt_ids"], _tokens,
                              charts.primary_path(shown.meta, _tokens), piece_of=piece_of)
    text_panel = mo.vstack([
        mo.md(f"## Generated text\n{_n} generated token(s) after a {len(shown.meta['prompt_ids'])}-token prompt; "
              "hover a token for its id, position, probability and the top-k alternatives."),
        mo.Html(f"<div style='max-height:5.8em;overflow-y:auto'>{_view}</div>"),
    ])
    text_panel  # its own output, above the panels: the new token shows before the four panels are redrawn
    return


@app.cell
def _(charts, mo, shown, small, view):
    mo.stop(shown is None)
    _kv = shown.kv
    _path = charts.primary_path(shown.meta, _kv)
    _length = int(_kv.filter(_kv["path"] == _path)["length"].max() or 0) if _kv.height else 0
    _uncached = (" _Path uncached: no cache outlives a step — each step fills a fresh cache with the whole "
                 "sequence, which is what these bytes are._" if _path == "uncached" else "")
    # MLA (deepseek2) caches a latent per position: its chart also draws what an MHA cache of the model would hold
    _mha = shown.meta.get("mha_bytes_per_token") if shown.meta["config"].get("kv_lora_rank") else None
    kv_panel = mo.vstack([
        mo.md("## KV cache\n" + charts.kv_arithmetic(shown.meta, _length) + _uncached),
        mo.hstack([view(small(charts.kv_growth(_kv, _path, _mha))),
                   view(small(charts.kv_positions(_kv, _path), width=170))], justify="start"),
    ])
    return (kv_panel,)


@app.cell
def _(mo, shown):
    mo.stop(shown is None)
    _steps = sorted(shown.qk["step"].unique().to_list()) if shown.qk.height else [0]
    qk_step = mo.ui.slider(start=_steps[0], stop=max(_steps[-1], _steps[0] + 1), value=_steps[-1], label="step", show_value=True)
    qk_tensor = mo.ui.radio(options=["q", "k"], value="q", inline=True, label="tensor")
    return qk_step, qk_tensor


@app.cell
def _(alt, charts, mo, qk_step, qk_tensor, shown, small):
    _selection = alt.selection_point(fields=["layer", "head"], name="cell")
    # Its own selection (a click picks a layer and head), none of marimo's: not even on the "no data" chart, where
    # marimo's would have no field to select on.
    qk_chart = mo.ui.altair_chart(chart=small(charts.qk_heatmap(shown.qk, qk_step.value, qk_tensor.value, _selection,
                                                                charts.primary_path(shown.meta, shown.qk)), width=260),
                                  chart_selection=False, legend_selection=False)
    return (qk_chart,)


@app.cell
def _(charts, mo, qk_chart, qk_step, qk_tensor, shown, small, view):
    _picked = qk_chart.value
    _layer, _head = (int(_picked["layer"][0]), int(_picked["head"][0])) if _picked is not None and len(_picked) else (0, 0)
    _has_norm = bool(shown.meta.get("config", {}).get("qk_norm"))  # the model's config, not what has been recorded
    _note = "" if _has_norm else " This model has no QK-norm: only the pre-RoPE statistics (stage `pre`) exist."
    qk_panel = mo.vstack([
        mo.hstack([mo.md("## QK norm"), qk_tensor, qk_step], justify="start", align="center"),
        mo.md(f"RMS of each head's q and k before (`pre`) and after (`post`) the per-head RMSNorm; click a cell.{_note}"),
        mo.hstack([qk_chart, view(small(charts.qk_over_steps(shown.qk, _layer, _head,
                                                                            charts.primary_path(shown.meta, shown.qk)), width=120))],
                  justify="start"),
    ])
    return (qk_panel,)


@app.cell
def _(mo, shown):
    mo.stop(shown is None)
    _cfg = shown.meta["config"]
    route_layer = mo.ui.slider(start=0, stop=max(_cfg["n_layers"] - 1, 1), value=0, label="layer", show_value=True)
    return (route_layer,)


@app.cell
def _(charts, mo, route_layer, shown, small, view):
    _cfg = shown.meta["config"]
    _path = charts.primary_path(shown.meta, shown.routing)
    _breaks = shown.meta.get("breaks") or []
    if _cfg["n_experts"] == 0:
        _body = mo.md(f"This model ({shown.meta['arch']}) has no experts: every token goes through the same dense FFN.")
    elif shown.routing.is_empty():
        _body = mo.md("_Step once to see the router's choices._")
    else:
        _body = mo.hstack([mo.vstack([route_layer, view(small(charts.routing_histogram(
                               shown.routing, route_layer.value, _cfg["n_experts"], _path), width=220))]),
                           view(small(charts.routing_heatmap(shown.routing, _path), width=220))], justify="start")
    _shared = ("Every token also goes through the **shared expert**, scaled by this gate σ(x·g) (0 … 1); a port that "
               "drops it or adds it ungated changes every token.")
    if "shared-expert-ungated" in _breaks:
        _shared += " _Broken on purpose (shared-expert-ungated): every gate is 1._"
    if shown.shared.height:  # a gated shared expert (qwen2moe): its gate beside the router's choices
        _pieces = charts.sequence_pieces(shown.meta, shown.tokens, _path)
        _body = mo.vstack([_body, mo.hstack([view(small(charts.shared_gate(shown.shared, _path, _pieces), width=220)),
                                             mo.md(_shared)], justify="start", align="center")])
    elif _cfg.get("shared_gate") and "shared-expert-dropped" in _breaks:
        _body = mo.vstack([_body, mo.md("Broken on purpose (shared-expert-dropped): the shared expert every token "
                                        "should also go through is left out, so there is no gate to show.")])
    if not _cfg["n_experts"]:
        _head = "## Expert routing"
    elif "moe-as-dense" in _breaks:
        _head = f"## Expert routing\nBroken on purpose (moe-as-dense): expert 0 alone, where the model picks {_cfg['n_experts_used']} of {_cfg['n_experts']}."
    else:
        _head = f"## Expert routing\n{_cfg['n_experts_used']} of {_cfg['n_experts']} experts per token."
    routing_panel = mo.vstack([mo.md(_head), _body])
    return (routing_panel,)


@app.cell
def _(charts, mo, shown, small, view):
    mo.stop(shown is None)
    _speed = charts.speedup(shown.tokens)
    speed_panel = mo.vstack([
        mo.md("## Tokens/s\nEach step's latency: the KV-cached path (one token) and the uncached one (the whole sequence); "
              "best of up to 3 runs of the step, so a busy machine's hiccups do not swap the paths."),
        mo.hstack([
            mo.stat(value=charts.fmt_speedup(_speed), label="cached / uncached", caption="last 8 steps", bordered=True),
            view(small(charts.step_latency(shown.tokens), width=320)),
        ], justify="start"),
    ])
    return (speed_panel,)


@app.cell
def _(kv_panel, mo, qk_panel, routing_panel, speed_panel):
    # The first screen: under the generated text (the cell above), the four panels the workbench is for, two by two.
    mo.vstack([mo.hstack([kv_panel, qk_panel], justify="start", gap=1.5, widths="equal"),
               mo.hstack([routing_panel, speed_panel], justify="start", gap=1.5, widths="equal")], gap=0.4)
    return


@app.cell
def _(charts, mo, shown, view):
    mo.stop(shown is None)
    _tol = shown.meta.get("equiv_tolerance")  # None: a trace written before the session recorded it
    _bound = "the recorded tolerance (not recorded in this trace)" if _tol is None else f"{_tol:g}"
    equiv_panel = lambda: mo.vstack([  # noqa: E731 (built when its tab is shown)
        mo.md("The uncached path is run on the tokens the cached path chose; their logits must agree to "
              f"{_bound} × max |logit| (dashed) with the same argmax. That bound is 1e-4 in float32 with blocks or dequantized weights; "
              "quantized weights (their matmuls take bf16 activations) loosen it to 4e-2 and a bf16/fp16 dtype to 1e-1: "
              "load with weights 'blocks' or 'dequantized' and dtype float32 for the tight check."),
        view(charts.equivalence(shown.equiv, _tol)),
    ])
    return (equiv_panel,)


@app.cell
def _(charts, mo, shown, view):
    mo.stop(shown is None)
    _bad = shown.first_bad_layer()
    _msg = (f"First non-finite value: step {_bad['step'][0]}, layer {_bad['first_bad_layer'][0]}." if _bad.height
            else "No NaN or Inf so far.")
    health_panel = lambda: mo.vstack([mo.md(_msg), view(charts.layer_health(shown.layers, charts.primary_path(shown.meta, shown.layers)))])
    return (health_panel,)


@app.cell
def _(charts, mo, session, shown, view):
    mo.stop(shown is None)
    _off = (session.reference_error if session is not None and shown is not None and session.reference_error else None)
    _state = (f"**The reference is off:** {_off}" if _off else
              "Choose llama.cpp or llama.cpp-f32 under *reference* in the sidebar (needs llama-cpp-python).")
    reference_panel = lambda: mo.vstack([mo.md("llama.cpp on the same tokens: **llama.cpp** runs the file as it is, with 8-bit "
                                       "activations (cosine 0.99–0.9999 is normal); **llama.cpp-f32** runs an F32 copy with "
                                       f"an F32 KV cache, the exact reference (≥ 0.999999 against dequantized float32 weights). {_state}"),
                                 view(charts.reference(shown.reference))])
    return (reference_panel,)


@app.cell
def _(charts, mo, shown, view):
    mo.stop(shown is None)
    detail_panel = lambda: mo.vstack([  # noqa: E731 (built when its tab is shown)
        mo.md("The mission panels' other views: tokens/s per decode step, the newest token's top-k expert weights."),
        mo.hstack([view(charts.tokens_per_s(shown.tokens)),
                   view(charts.routing_last_token(shown.routing, charts.primary_path(shown.meta, shown.routing)))
                   if shown.meta["config"]["n_experts"] else mo.md("")], justify="start"),
    ])
    return (detail_panel,)


@app.cell
def _(io, mo, shown, upload, upload_note):
    mo.stop(shown is None)

    def _parquet():
        _buffer = io.BytesIO()
        shown.write(_buffer)
        return _buffer.getvalue()

    trace_panel = lambda: mo.vstack([  # noqa: E731 (built when its tab is shown)
        mo.md("Every frame of this run (tokens, kv, qk, routing, layers, equiv, reference, attention, lens) with its "
              "metadata in one Parquet file; drop one here to look at a saved run instead of the live one."),
        mo.download(data=_parquet, filename="workbench-trace.parquet", label="Download the trace (Parquet)"),
        upload, *([upload_note] if upload_note is not None else []),
    ])
    return (trace_panel,)


@app.cell
def _(mo):
    # Pickers that survive the redraw after every step (their cells re-run with the trace).
    get_pick, set_pick = mo.state({"layer": 0, "head": 0, "lens": "prob", "cmp_step": None, "cmp_error": "local_error"})
    return get_pick, set_pick


@app.cell
def _(get_pick, mo, set_pick, shown):
    mo.stop(shown is None)
    _cfg = shown.meta["config"]

    def _set(key):
        return lambda v: set_pick(lambda p: {**p, key: v})

    att_layer = mo.ui.slider(start=0, stop=max(_cfg["n_layers"] - 1, 1), value=min(get_pick()["layer"], _cfg["n_layers"] - 1),
                             label="layer", show_value=True, on_change=_set("layer"))
    att_head = mo.ui.slider(start=0, stop=max(_cfg["n_heads"] - 1, 1), value=min(get_pick()["head"], _cfg["n_heads"] - 1),
                            label="head", show_value=True, on_change=_set("head"))
    lens_value = mo.ui.radio(options=["prob", "entropy", "kl_to_final"], value=get_pick()["lens"], inline=True,
                             label="colour", on_change=_set("lens"))
    return att_head, att_layer, lens_value


@app.cell
def _(alt, att_head, att_layer, charts, mo, set_pick, shown, view):
    mo.stop(shown is None)

    def att_pick_head(rows):  # a click on a head's row of the heads × keys chart: that head in the charts above
        if rows is not None and len(rows):
            set_pick(lambda p: {**p, "head": int(rows["head"][0])})

    _att = shown.frames["attention"]
    _path = charts.primary_path(shown.meta, _att)
    if _att.is_empty():
        attention_panel = lambda: mo.md("No attention frame in this run: tick *record attention and the logit lens* in the "
                                "sidebar (each step then computes the pattern a second time), and step.")
    else:
        _step = int(_att["step"].max())
        _pieces = charts.sequence_pieces(shown.meta, shown.tokens, _path)
        _window = shown.meta["config"].get("sliding_window")
        _breaks = shown.meta.get("breaks") or []
        _sinks = []
        if shown.meta["config"].get("attn_sinks"):  # gpt-oss: each head's sink share per layer, beside a sentence
            _said = ("gpt-oss gives each head a learned **sink** logit: the share it takes (1 − Σ weights) is attention "
                     "paid to nothing" + (f"; sliding-window layers (the even ones) see only the last {_window} positions."
                                          if _window else "."))
            if "sinks-dropped" in _breaks:
                _said += " _Broken on purpose (sinks-dropped): the sinks are left out, so every share is 0._"
            if "no-sliding-window" in _breaks:
                _said += " _Broken on purpose (no-sliding-window): every layer sees every position._"
            _sinks = [mo.hstack([view(charts.sink_shares(_att, _step, _path)), mo.md(_said)], justify="start", align="center")]
        attention_panel = lambda: mo.vstack([  # noqa: E731 (built when its tab is shown)
            mo.md("Which positions the newest token reads, per layer and head (the latest step). A tall first bar is an "
                  "attention sink; grey keys are masked" + (f" (sliding window of {_window} on local layers)." if _window else ".")),
            *_sinks,
            mo.hstack([att_layer, att_head], justify="start"),
            view(charts.attention_over_keys(_att, _step, att_layer.value, att_head.value, _pieces, _path)),
            mo.ui.altair_chart(charts.attention_heads(_att, _step, att_layer.value, _path, _pieces,
                                                      alt.selection_point(fields=["head"], name="head_pick")),
                               chart_selection=False, legend_selection=False, on_change=att_pick_head),
        ])
    return att_pick_head, attention_panel


@app.cell
def _(charts, lens_value, mo, piece_of, shown, view):
    mo.stop(shown is None)
    _lens = shown.frames["lens"]
    if _lens.is_empty():
        lens_panel = lambda: mo.md("No logit lens in this run: tick *record attention and the logit lens* in the sidebar "
                           "(each step then puts every layer through the output head), and step.")
    else:
        lens_panel = lambda: mo.vstack([  # noqa: E731 (built when its tab is shown)
            mo.md("Each layer's residual stream read through the final norm and the output head: the token it would "
                  "predict next, per step. Where the top-1 settles is where the model has decided."),
            lens_value,
            view(charts.lens_grid(_lens, lens_value.value, piece_of, charts.primary_path(shown.meta, _lens))),
        ])
    return (lens_panel,)


@app.cell
def _(BREAKS, app_state, mo):
    cmp_source = mo.ui.dropdown(options=list(app_state.COMPARE_SOURCES), value="llama.cpp", label="their numbers")
    cmp_break = mo.ui.dropdown(options=list(BREAKS), value="rope-base-10k", label="break (our engine)")
    cmp_file = mo.ui.file(filetypes=[".safetensors", ".npz"], label="a workbench-dump/1 file")
    cmp_button = mo.ui.run_button(label="Compare")
    return cmp_break, cmp_button, cmp_file, cmp_source


@app.cell
def _(mo):
    get_cmp, set_cmp = mo.state(None)  # (Comparison, their Dump, the exact model it ran on)
    return get_cmp, set_cmp


@app.cell
def compare_run(app_state, cmp_break, cmp_button, cmp_file, cmp_source, mo, model, runner, session, set_cmp):
    # Compare runs on the live session's tokens (prompt and generated), against our exact path.
    cmp_error = None
    if cmp_button.value and session is not None and model is not None:
        with runner.lock:
            _tokens, _n_prompt = list(session.ids), len(session.prompt_ids)
        try:
            with mo.status.spinner(title=f"Dumping {cmp_source.value} and comparing at every capture point…"):
                _file = (cmp_file.name(), cmp_file.contents()) if cmp_file.value else None
                _dump, _result, _exact = app_state.compare_with(model, _tokens, _n_prompt, cmp_source.value, cmp_break.value, _file)
            set_cmp((_result, _dump, _exact))
        except Exception as _exc:
            cmp_error = app_state.describe_error(_exc)
    return (cmp_error,)


@app.cell
def _(get_cmp, get_pick, mo, set_pick):
    _got = get_cmp()
    cmp_step, cmp_kind = None, None
    if _got is not None:
        _result = _got[0]
        _table = _result.table()
        _steps = sorted(_table["step"].unique().to_list())
        _fd = _result.first_divergence
        _want = get_pick()["cmp_step"]
        _value = _want if _want in _steps else (_fd.step if _fd is not None else _steps[0])
        cmp_step = mo.ui.slider(steps=_steps, value=_value, label="step", show_value=True,
                                on_change=lambda v: set_pick(lambda p: {**p, "cmp_step": v}))
        cmp_kind = mo.ui.radio(options={"local": "local_error", "end to end": "end_to_end_error"},
                               value="local" if get_pick()["cmp_error"] == "local_error" else "end to end", inline=True,
                               label="error", on_change=lambda v: set_pick(lambda p: {**p, "cmp_error": v}))
    return cmp_kind, cmp_step


@app.cell
def _(charts, cmp_kind, cmp_step, get_cmp, mo):
    _got = get_cmp()
    cmp_chart = None
    if _got is not None:
        cmp_chart = mo.ui.altair_chart(charts.compare_heatmap(_got[0].table(), cmp_step.value, cmp_kind.value),
                                       legend_selection=False)
    return (cmp_chart,)


@app.cell
def _(app_state, charts, cmp_break, cmp_button, cmp_chart, cmp_error, cmp_file, cmp_kind, cmp_source, cmp_step,
      error_callout, get_cmp, mo, view):
    _controls = mo.hstack([cmp_source, cmp_break, cmp_file, cmp_button], justify="start", wrap=True)
    _got = get_cmp()
    _parts = [mo.md("Line another engine's numbers up with ours at every capture point of the live session's tokens: the "
                    "**local** error is what their step introduces (our operation on *their* inputs against their "
                    "output), the **end-to-end** error what they have accumulated. Method: docs/compare.md."), _controls]
    if cmp_error:
        _parts.append(error_callout("The comparison did not run.", cmp_error))
    if _got is not None and cmp_chart is not None:
        _result, _dump, _exact = _got
        _parts += [mo.md(app_state.compare_sentence(_result)), mo.hstack([cmp_step, cmp_kind], justify="start"), cmp_chart]
        _picked = cmp_chart.value
        if _picked is not None and len(_picked):
            _capture = str(_picked["capture"][0])
            _key = (cmp_step.value, _capture)
            if _key in _dump.tensors:
                _ours = app_state.our_tensor(_exact, _dump, *_key)
                _parts += [mo.md(f"**{_capture}** at step {cmp_step.value}: their values against ours (end to end)."),
                           view(charts.compare_values(_dump.tensors[_key], _ours))]
        else:
            _parts.append(mo.md("_Click a cell to see that tensor's numbers, theirs beside ours._"))
    compare_panel = lambda: mo.vstack(_parts)  # noqa: E731 (built when its tab is shown)
    return (compare_panel,)


@app.cell
def _(BREAKS, app_state, mo):
    ab_kind = mo.ui.dropdown(options=list(app_state.AB_KINDS), value="break", label="B changes")
    ab_break = mo.ui.dropdown(options=list(BREAKS), value="cache-off-by-one", label="break")
    ab_weights = mo.ui.dropdown(options=["blocks", "dequantized", "quantized"], value="quantized", label="weights")
    ab_dtype = mo.ui.dropdown(options=["float32", "bfloat16", "float16"], value="bfloat16", label="dtype")
    ab_file = mo.ui.text(placeholder="/path/to/another.gguf (e.g. another quantization)", label="file", full_width=True)
    ab_steps = mo.ui.number(start=1, stop=256, step=1, value=16, label="steps")
    ab_button = mo.ui.run_button(label="Run A and B")
    return ab_break, ab_button, ab_dtype, ab_file, ab_kind, ab_steps, ab_weights


@app.cell
def _(mo):
    get_ab, set_ab = mo.state(None)  # (trace A, trace B, trace.diff, what B changed)
    return get_ab, set_ab


@app.cell
def ab_run(Sampling, ab_break, ab_button, ab_dtype, ab_file, ab_kind, ab_steps, ab_weights, app_state, breaks, mo,
           model, prompt, seed, set_ab, temperature, thread_count, top_k, top_p):
    ab_error = None
    if ab_button.value and model is not None:
        _value = {"break": ab_break.value, "weights": ab_weights.value, "dtype": ab_dtype.value, "file": ab_file.value}[ab_kind.value]
        try:
            with mo.status.spinner(title=f"Running A and B, {int(ab_steps.value)} steps each…"):
                _sampling = Sampling(float(temperature.value), int(top_k.value), float(top_p.value), int(seed.value))
                _a, _b, _d = app_state.ab_runs(
                    model, model.tokenizer.encode(prompt.value), _sampling, int(ab_steps.value), ab_kind.value, _value,
                    frozenset() if breaks.value == "none" else frozenset({breaks.value}), thread_count)
            set_ab((_a, _b, _d, f"{ab_kind.value} {_value}"))
        except Exception as _exc:
            ab_error = app_state.describe_error(_exc)
    return (ab_error,)


@app.cell
def _(ab_break, ab_button, ab_dtype, ab_error, ab_file, ab_kind, ab_steps, ab_weights, app_state, charts, error_callout,
      get_ab, mo, small, view):
    _pick = {"break": ab_break, "weights": ab_weights, "dtype": ab_dtype, "file": ab_file}[ab_kind.value]
    _parts = [mo.md("Two runs of the sidebar's prompt and sampling, side by side: **A** as the sidebar has it, **B** with "
                    "one thing changed — a break, the weights mode, the dtype, or another file (two quantizations of "
                    "one model). Each frame then says where B first parts from A, and the panels show both."),
              mo.hstack([ab_kind, _pick, ab_steps, ab_button], justify="start", wrap=True)]
    if ab_error:
        _parts.append(error_callout("The A/B run did not run.", ab_error))
    _got = get_ab()
    if _got is not None:
        _a, _b, _diffs, _what = _got

        def _text(t):
            _html = charts.token_html(t.meta["prompt_pieces"], t.meta["prompt_ids"], t.tokens, "cached",
                                      element_id=f"ab-tokens-{t.meta['ab_run']}")
            return mo.Html(f"<div style='max-height:5em;overflow-y:auto'>{_html}</div>")

        def _pair(build, title, difference):
            # A, B, and what B changes: a ratio or a count, where "no difference" reads as 1 or 0
            return mo.vstack([mo.md(f"**{title}**"), mo.hstack([
                mo.vstack([mo.md("A"), view(small(build(_a), width=220))]),
                mo.vstack([mo.md("B"), view(small(build(_b), width=220))]),
                mo.vstack([mo.md("B against A"), view(small(difference, width=220))])], justify="start")])

        _last = int(min(_a.qk["step"].max(), _b.qk["step"].max())) if _a.qk.height and _b.qk.height else 0
        _parts += [
            mo.md(f"**B: {_what}.** A: `{_a.meta.get('arithmetic', '')}`; B: `{_b.meta.get('arithmetic', '')}`."),
            mo.hstack([mo.vstack([mo.md("**A**"), _text(_a)]), mo.vstack([mo.md("**B**"), _text(_b)])], widths="equal"),
            mo.ui.table(app_state.ab_table(_diffs), selection=None, pagination=False, label="where B first parts from A, per frame"),
            mo.hstack([view(small(charts.ab_token_probs(_a.tokens, _b.tokens), width=420))], justify="start"),
            _pair(lambda t: charts.qk_heatmap(t.qk, _last, "q", None, "cached"), f"QK norm (q, step {_last})",
                  charts.ab_qk_ratio(_a.qk, _b.qk, _last, "q")),
            _pair(lambda t: charts.routing_heatmap(t.routing, "cached"), "routing",
                  charts.ab_routing_changes(_a.routing, _b.routing)) if _a.meta["config"]["n_experts"] else mo.md(""),
            _pair(lambda t: charts.step_latency(t.tokens), "latency per step", charts.ab_latency_ratio(_a.tokens, _b.tokens)),
            _pair(lambda t: charts.kv_growth(t.kv, "cached"), "KV cache", charts.ab_kv_bytes(_a.kv, _b.kv)),
        ]
    ab_panel = lambda: mo.vstack(_parts)  # noqa: E731 (built when its tab is shown)
    return (ab_panel,)


@app.cell
def _(mo):
    get_tab, set_tab = mo.state("Equivalence", allow_self_loops=True)  # the tabs cell rebuilds the tab it opens
    return get_tab, set_tab


@app.cell
def _(ab_panel, attention_panel, card_view, compare_panel, detail_panel, equiv_panel, get_tab, health_panel, lens_panel,
      mo, reference_panel, set_tab, trace_panel):
    # The supporting panels, one tab each; the tab shown survives the redraw after every step. A panel given as a
    # function is built only while its tab is shown: the others cost nothing per step, in Python or the browser.
    _views = {"Equivalence": equiv_panel, "Layer health": health_panel, "Reference": reference_panel,
              "Compare": compare_panel, "A/B": ab_panel, "Attention": attention_panel, "Logit lens": lens_panel,
              "More charts": detail_panel, "Model card": card_view, "Trace": trace_panel}
    _shown_tab = get_tab() if get_tab() in _views else "Equivalence"
    _tabs = {_n: (_v() if _n == _shown_tab else mo.md("_…_")) if callable(_v) else _v for _n, _v in _views.items()}
    mo.ui.tabs(_tabs, value=_shown_tab, on_change=set_tab)
    return


if __name__ == "__main__":
    app.run()
