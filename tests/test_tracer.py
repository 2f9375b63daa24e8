"""The tracer against each family's own routing: what is stored equals what the model computed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from routelens.adapters import adapt
from routelens.errors import InputError
from routelens.store import Store
from routelens.tiny import build_tiny_model, byte_tokenizer
from routelens.tracer import TraceOptions, trace
from routelens.tracer.hooks import RoutingRecorder

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Der Fuchs.", "快速的棕色狐狸跳过了懒狗。 ok", "hi"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _reference(model, tok, texts):
    """The model's own routing on the same padded batch the tracer builds (longest first, right padding),
    captured by independent hooks on the routers plus output_router_logits."""
    adapter = adapt(model)
    ids = [tok(t)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    width = len(ids[order[0]])
    x = torch.full((len(texts), width), tok.pad_token_id)
    m = torch.zeros_like(x)
    for r, i in enumerate(order):
        x[r, : len(ids[i])] = torch.tensor(ids[i])
        m[r, : len(ids[i])] = 1
    got = {}
    hooks = [l.router.register_forward_hook(lambda mod, a, o, li=l.index: got.__setitem__(li, o))
             for l in adapter.moe_layers]
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=m, output_router_logits=True, use_cache=False)
    for h in hooks:
        h.remove()
    return adapter, order, ids, m, got, out.router_logits


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_matches_model_routing(family, tok, tmp_path):
    model = build_tiny_model(family)
    store = Store.open(tmp_path / "s.duckdb")
    run = trace(model, tok, TEXTS, store=store, options=TraceOptions(batch_size=len(TEXTS), logits=True))
    adapter, order, ids, mask, router_out, rl = _reference(model, tok, TEXTS)
    k = adapter.top_k
    routing = run.routing().sort(["layer", "seq_id", "pos", "rank"])
    n_tok = sum(len(i) for i in ids)
    assert routing.height == n_tok * len(adapter.moe_layers) * k
    assert sorted(set(routing["layer"].to_list())) == [l.index for l in adapter.moe_layers]
    width = mask.shape[1]
    for li, layer in enumerate(adapter.moe_layers):
        logits, w, idx = router_out[layer.index]
        # output_router_logits gives one entry per sparse layer; the router hook must agree with it
        torch.testing.assert_close(logits.float(), rl[li].float())
        if not adapter.router_output_sorted:
            w, o = w.sort(dim=-1, descending=True, stable=True)
            idx = idx.gather(-1, o)
        lg_index, lg = run.logits(layer.index)
        for r, i in enumerate(order):
            rows = r * width + np.arange(len(ids[i]))
            sub = routing.filter((routing["layer"] == layer.index) & (routing["seq_id"] == i))
            exp = sub["expert"].to_numpy().reshape(len(ids[i]), k)
            wt = sub["weight"].to_numpy().reshape(len(ids[i]), k)
            np.testing.assert_array_equal(exp, idx[rows].numpy())
            np.testing.assert_allclose(wt, w[rows].float().numpy(), rtol=2e-3, atol=1e-4)
            sel = (lg_index["seq_id"].to_numpy() == i)
            pos = lg_index["pos"].to_numpy()[sel]
            np.testing.assert_allclose(lg[sel][np.argsort(pos)].astype(np.float32),
                                       logits[rows].float().numpy(), rtol=2e-3, atol=2e-3)
    toks = run.tokens().sort(["seq_id", "pos"])
    for i in range(len(TEXTS)):
        assert toks.filter(toks["seq_id"] == i)["token_id"].to_list() == ids[i]


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_observing_changes_nothing(family, tok):
    model = build_tiny_model(family)
    x = torch.tensor([tok("Observing changes nothing.")["input_ids"]])
    with torch.no_grad():
        before = model(x).logits
        blocks = []
        with RoutingRecorder(model, adapt(model), blocks.append, logits=True, residual=True) as rec:
            during = model(x).logits
            rec.flush()
        after = model(x).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert len(blocks) == 1 and blocks[0].n_tokens == x.shape[1]


def test_left_and_right_padding_record_the_same(tok, tmp_path):
    model = build_tiny_model("qwen3_moe")
    texts = ["short", "a much longer sentence than the first one"]
    store = Store.open(tmp_path / "s.duckdb")
    batched = trace(model, tok, texts, store=store, options=TraceOptions(batch_size=2)).routing()
    single = trace(model, tok, texts, store=store, options=TraceOptions(batch_size=1)).routing()
    key = ["seq_id", "pos", "layer", "rank"]
    a, b = batched.sort(key), single.sort(key)
    assert a["expert"].to_list() == b["expert"].to_list()
    np.testing.assert_allclose(a["weight"].to_numpy(), b["weight"].to_numpy(), atol=2e-3)


def test_generation_records_decode_steps_with_true_positions(tok, tmp_path):
    model = build_tiny_model("olmoe")
    texts = ["Once upon a time", "Hi"]
    store = Store.open(tmp_path / "s.duckdb")
    run = trace(model, tok, texts, store=store, options=TraceOptions(batch_size=2, max_new_tokens=6))
    toks = run.tokens().sort(["seq_id", "pos"])
    routing = run.routing()
    for i, t in enumerate(texts):
        prompt = tok(t)["input_ids"]
        sub = toks.filter(toks["seq_id"] == i)
        n = sub.height
        assert sub["pos"].to_list() == list(range(n))
        assert sub["token_id"].to_list()[: len(prompt)] == prompt
        assert len(prompt) < n <= len(prompt) + 5  # the last generated token is never fed back
        # teacher-forced full forward over the same tokens routes the same way as the decode steps
        full = torch.tensor([sub["token_id"].to_list()])
        adapter = adapt(model)
        got = {}
        hs = [l.experts.register_forward_pre_hook(lambda m, a, li=l.index: got.__setitem__(li, a[1]))
              for l in adapter.moe_layers]
        with torch.no_grad():
            model(full)
        for h in hs:
            h.remove()
        for layer in adapter.moe_layers:
            rec = routing.filter((routing["seq_id"] == i) & (routing["layer"] == layer.index)).sort(["pos", "rank"])
            np.testing.assert_array_equal(rec["expert"].to_numpy().reshape(n, -1), got[layer.index].numpy())


def test_overflow_policies(tok, tmp_path):
    model = build_tiny_model("mixtral")
    text = "x" * 40
    store = Store.open(tmp_path / "s.duckdb")
    with pytest.raises(InputError, match="more than the 16"):
        trace(model, tok, [text], store=store, options=TraceOptions(max_tokens=16))
    chunked = trace(model, tok, [text], store=store, options=TraceOptions(max_tokens=16, overflow="chunk"))
    n = len(tok(text)["input_ids"])
    assert chunked.tokens()["pos"].sort().to_list() == list(range(n))
    truncated = trace(model, tok, [text], store=store, options=TraceOptions(max_tokens=16, overflow="truncate"))
    assert truncated.tokens().height == 16
    assert [r.status for r in store.runs()] == ["complete", "complete"]  # the refused text created no run


def test_expert_stats_through_the_tracer(tok, tmp_path):
    model = build_tiny_model("qwen2_moe")
    store = Store.open(tmp_path / "s.duckdb")
    run = trace(model, tok, TEXTS, store=store, options=TraceOptions(batch_size=2, expert_stats=True))
    stats = run.expert_stats()
    routing = run.routing()
    counts = routing.group_by(["layer", "expert"]).len()
    merged = stats.join(counts, on=["layer", "expert"])
    assert merged.height == counts.height
    assert (merged["n_tokens"] == merged["len"]).all()
    toks = run.tokens()
    pairs = set(zip(toks["seq_id"].to_list(), toks["pos"].to_list()))
    assert all((s, p) in pairs for s, p in zip(stats["max_out_seq"].to_list(), stats["max_out_pos"].to_list()))


def test_sharded_run_merges_to_the_single_process_run(tok, tmp_path):
    model = build_tiny_model("qwen3_moe")
    texts = [f"text number {i} " * (i + 1) for i in range(5)]
    whole = trace(model, tok, texts, store=Store.open(tmp_path / "whole.duckdb"), options=TraceOptions(batch_size=1))
    exports = []
    for shard in range(2):
        st = Store.open(tmp_path / f"shard{shard}.duckdb")
        run = trace(model, tok, texts, store=st,
                    options=TraceOptions(batch_size=1, shard=shard, num_shards=2, run_uuid="run-abc"))
        exports.append(st.export_run(run.info.run_id, tmp_path / f"exp{shard}"))
    merged_store = Store.open(tmp_path / "merged.duckdb")
    (info,) = merged_store.import_runs(*exports)
    merged = merged_store.run(info.run_id)
    key = ["seq_id", "pos", "layer", "rank"]
    assert merged.routing().sort(key).drop("run_id").equals(whole.routing().sort(key).drop("run_id"))
    assert info.status == "complete" and info.n_tokens == whole.info.n_tokens


@pytest.mark.parametrize("texts", [["abcd", "wxyz"], ["single"]])
def test_generation_without_padding_keeps_true_positions(tmp_path, tok, texts):
    # transformers' generate drops an all-ones attention mask at decode steps; positions must then come from
    # position_ids, not restart at 0 (regression: equal-length batches stored decode steps at pos 0)
    model = build_tiny_model("qwen3_moe")
    run = trace(model, tok, texts, store=tmp_path / "s.duckdb", options=TraceOptions(max_new_tokens=3))
    t = run.tokens()
    for seq_id in range(len(texts)):
        rows = t.filter(t["seq_id"] == seq_id)
        n_prompt = len(tok(texts[seq_id])["input_ids"])
        assert rows["pos"].to_list() == list(range(rows.height))
        assert rows["generated"].to_list() == [False] * n_prompt + [True] * (rows.height - n_prompt)
        assert rows.height == n_prompt + 2  # the last generated token is never fed back


def test_residual_max_is_max_abs_of_each_decoder_output(tok):
    model = build_tiny_model("olmoe", num_layers=3)
    x = torch.tensor([tok("The residual stream, measured per layer.")["input_ids"]])
    outs = {}
    hs = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
          for i, layer in enumerate(model.model.layers)]
    blocks = []
    with torch.no_grad(), RoutingRecorder(model, adapt(model), blocks.append, residual=True) as rec:
        model(x)
        rec.flush()
    for h in hs:
        h.remove()
    (b,) = blocks
    assert b.residual_layers == (0, 1, 2)
    for i in range(3):
        val, ch = outs[i].reshape(-1, outs[i].shape[-1]).abs().max(dim=-1)
        np.testing.assert_array_equal(b.residual_max[i], val.float().numpy())
        np.testing.assert_array_equal(b.residual_channel[i], ch.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_abs_max_from_max_and_min_is_bitwise_abs_max(dtype):
    # The GPU path folds h.max(-1) and h.min(-1) into max |h| and its channel; it must give exactly what
    # h.abs().max(-1) gives: first channel on ties, +0.0 for zero rows, NaN and infinities as abs() has them.
    from routelens.tracer.hooks import _abs_max

    g = torch.Generator().manual_seed(0)
    h = (torch.randint(-4, 5, (64, 37, 40), generator=g) * 0.5).to(dtype)  # many ties and zeros
    h[0, 0, 3] = float("nan")
    h[1, 1, :] = -0.0
    h[2, 2, 5], h[2, 2, 1] = float("inf"), -float("inf")
    h[3, 3, :] = -1.0
    h[4, 4, :7] = 0.0
    want_v, want_c = h.abs().max(dim=-1)
    got_v, got_c = _abs_max(*h.max(dim=-1), *h.min(dim=-1))
    assert torch.equal(got_v.view(torch.int32), want_v.float().view(torch.int32))  # bitwise: NaN and -0.0 too
    assert torch.equal(got_c, want_c.to(torch.int32))


def test_a_bfloat16_attention_mask_is_recorded_like_an_integer_one():
    # The model takes a float mask (e.g. cast to the model's dtype); the tracer reads positions from its host copy.
    model = build_tiny_model("olmoe")
    x = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    m = torch.ones(2, 9, dtype=torch.int64)
    m[1, :3] = 0
    got = {}
    for dtype in (torch.int64, torch.bfloat16):
        blocks = []
        with torch.no_grad(), RoutingRecorder(model, adapt(model), blocks.append) as rec:
            model(input_ids=x, attention_mask=m.to(dtype))
            rec.flush()
        (b,) = blocks
        got[dtype] = (b.pos.tolist(), b.token_id.tolist(), b.experts.tolist())
    assert got[torch.bfloat16] == got[torch.int64]
    assert got[torch.int64][0] == list(range(9)) + list(range(6))
