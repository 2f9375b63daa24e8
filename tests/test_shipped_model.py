"""The model shipped in data/model: loads offline like any checkpoint, generates, and the tracer records it."""
from __future__ import annotations

from pathlib import Path

from routelens.loading import load_model
from routelens.store import Store
from routelens.tracer import TraceOptions, trace

MODEL = Path(__file__).resolve().parents[1] / "data" / "model"


def test_shipped_model_generates_and_is_traced(tmp_path):
    model, tok = load_model(str(MODEL), dtype="float32")
    prompts = ["Whether the specified command", "Convert 33 meters to millimeters.\n<think>"]
    run = trace(model, tok, prompts, store=Store.open(tmp_path / "s.duckdb"),
                options=TraceOptions(batch_size=2, max_new_tokens=8, logits=True), model_ref=str(MODEL))
    info = run.info
    assert (info.status, info.family, info.num_experts, info.top_k) == ("complete", "qwen3_moe", 32, 4)
    assert info.moe_layers == tuple(range(8))
    tokens = run.tokens()
    assert tokens["generated"].sum() > 0  # decode steps were recorded
    assert run.routing().height == tokens.height * 8 * 4
    seqs = run.sequences()
    generated = [m for m in seqs["meta"].to_list() if "generated_text" in m]
    assert len(generated) == 2
    # the reasoning prompt continues in the trained format, so the weights are the trained ones
    assert "1 meter" in generated[1] or "1000" in generated[1], generated[1]
