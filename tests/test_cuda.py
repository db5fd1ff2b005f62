"""CUDA-only checks (skipped without a GPU): the captured decode graph, GPU vs CPU, quantized on the GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from workbench.model import Model
from workbench.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _session_logits(model, graphs, steps=24, prompt=(1, 50, 60, 70)):
    s = Session(model, list(prompt), path="cached", context=len(prompt) + steps + 1, cuda_graphs=graphs)
    logits = [s.step().logits.float().cpu() for _ in range(steps)]
    return s.ids[len(prompt):], torch.stack(logits), s


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_steps_equal_eager_steps(arch, tiny_paths):
    model = Model.load(tiny_paths[arch], device="cuda", dtype="float32", weights="dequantized")
    ids_g, logits_g, s = _session_logits(model, graphs=True)
    assert s.static_step is not None  # the graph path really ran
    ids_e, logits_e, _ = _session_logits(model, graphs=False)
    assert ids_g == ids_e
    assert ((logits_g - logits_e).abs().amax(-1) <= 1e-4 * logits_e.abs().amax(-1)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_matches_cpu(arch, tiny_paths):
    gpu = Model.load(tiny_paths[arch], device="cuda", dtype="float32", weights="dequantized")
    cpu = Model.load(tiny_paths[arch], device="cpu", dtype="float32", weights="dequantized")
    ids = [1, 50, 60, 70, 80, 90, 100]
    a = gpu.forward(torch.tensor(ids, device="cuda"), 0, gpu.new_cache(len(ids))).cpu()
    b = cpu.forward(torch.tensor(ids), 0, cpu.new_cache(len(ids)))
    assert ((a - b).abs().amax(-1) <= 1e-3 * b.abs().amax(-1)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "gemma3"])
def test_cuda_quantized_matches_dequantized(arch, tiny_paths):
    exact = Model.load(tiny_paths[arch], device="cuda", dtype="float32", weights="dequantized")
    fast = Model.load(tiny_paths[arch], device="cuda", dtype="float32", weights="quantized")
    ids = [1, 50, 60, 70, 80, 90, 100]
    assert fast.weights.layers[0].wqkv.planes[0][0].dtype == torch.int32  # packed for the CUDA int4 kernel
    a = exact.forward(torch.tensor(ids, device="cuda"), 0, exact.new_cache(len(ids)))
    b = fast.forward(torch.tensor(ids, device="cuda"), 0, fast.new_cache(len(ids)))
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() >= 0.99  # random tiny weights: see test_fast_paths
    s = Session(fast, ids, path="both", context=16)  # the cached steps replay a graph, quantized experts too
    for _ in range(4):
        s.step()
    assert s.static_step is not None
    assert all(e["max_abs_diff"] <= fast.equivalence_tolerance * e["max_abs_logit"] for e in s.records.equiv)


def test_bf16_graph_session_with_probes_falls_back_to_eager(tiny_paths):
    model = Model.load(tiny_paths["qwen3moe"], device="cuda")  # auto: bf16, dequantized
    s = Session(model, [1, 50, 60], path="both", probes=True, context=20)
    for _ in range(8):
        s.step()
    assert s.static_step is None
    assert all(e["argmax_equal"] for e in s.records.equiv)


def test_bf16_moe_grouped_mm_graph_matches_gather_eager(tiny_paths):
    model = Model.load(tiny_paths["qwen3moe"], device="cuda", dtype="bfloat16", weights="dequantized")
    grouped = model.grouped_mm
    ids_g, logits_g, _ = _session_logits(model, graphs=True, steps=12)
    model.grouped_mm = False
    ids_e, logits_e, _ = _session_logits(model, graphs=False, steps=12)
    model.grouped_mm = grouped
    assert torch.nn.functional.cosine_similarity(logits_g, logits_e, dim=-1).min() >= 0.999
    assert ids_g[:4] == ids_e[:4]  # bf16 random tiny model: later steps may sit on near-ties


def test_compiled_graph_matches_eager(tiny_paths):
    model = Model.load(tiny_paths["qwen3moe"], device="cuda", dtype="float32", weights="dequantized")
    prompt = [1, 50, 60, 70]
    s = Session(model, prompt, path="cached", context=20, compile=True)
    a = torch.stack([s.step().logits.float().cpu() for _ in range(10)])
    ids_e, b, _ = _session_logits(model, graphs=False, steps=10)
    assert s.static_step is not None and s.ids[len(prompt):] == ids_e
    assert ((a - b).abs().amax(-1) <= 1e-4 * b.abs().amax(-1)).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weights", ["dequantized", "quantized"])
def test_every_mix_of_types_on_cuda(arch, weights, tmp_path, monkeypatch):
    """The generated mixes of tests/test_truth.py on the GPU: the graph-replayed cached path ≡ uncached, and the
    GPU ≡ the CPU (in the same weights form)."""
    from test_truth import write_mixed

    path = write_mixed(arch, tmp_path / f"{arch}.gguf", 2, monkeypatch)
    gpu = Model.load(path, device="cuda", dtype="float32", weights=weights)
    s = Session(gpu, [1, 50, 60, 70], path="both", context=16)
    for _ in range(6):
        s.step()
    assert s.static_step is not None
    assert all(e["max_abs_diff"] <= gpu.equivalence_tolerance * e["max_abs_logit"] for e in s.records.equiv)
    cpu = Model.load(path, device="cpu", dtype="float32", weights=weights)
    ids = s.ids
    a = gpu.forward(torch.tensor(ids, device="cuda"), 0, gpu.new_cache(len(ids))).cpu()
    b = cpu.forward(torch.tensor(ids), 0, cpu.new_cache(len(ids)))
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() >= (0.9999 if weights == "dequantized" else 0.99)
