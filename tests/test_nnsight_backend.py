"""Recording routing inside a user's own nnsight trace, in the same forward as the user's intervention."""
from __future__ import annotations

import torch

import routelens
from routelens.store import Store
from routelens.tiny import build_tiny_model, byte_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, again and again, until the sun sets."


def _record(tmp_path, name, ban=None):
    from nnsight import TransformersModel

    tok = byte_tokenizer()
    lm = TransformersModel(build_tiny_model("olmoe"), tokenizer=tok)
    store = Store.open(tmp_path / "s.duckdb")
    with routelens.recording(lm, store, tokenizer=tok, name=name) as rec:
        with torch.no_grad(), lm.trace(TEXT):
            if ban is not None:  # the user's intervention: knock expert `ban` out of layer 0's router logits
                lm.model.layers[0].mlp.gate.source.F_linear_0.output[:, ban] = -float("inf")
            logits = lm.output.logits.save()
    return rec.run, logits


def test_recording_sees_the_users_intervention(tmp_path):
    plain, plain_logits = _record(tmp_path, "plain")
    r = plain.routing()
    used = r.filter(r["layer"] == 0)["expert"].value_counts().sort("count", descending=True)
    ban = int(used["expert"][0])  # the busiest expert of layer 0, so the ban must change something
    banned, banned_logits = _record(tmp_path, "banned", ban=ban)
    b = banned.routing()
    assert ban not in b.filter(b["layer"] == 0)["expert"].to_list()
    assert b.height == r.height  # every token still recorded at every layer
    assert not torch.equal(plain_logits, banned_logits)
    tokens = banned.tokens()
    assert tokens.height == len(byte_tokenizer()(TEXT)["input_ids"])
