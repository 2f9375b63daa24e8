"""`routelens steer`: side-by-side generations, both runs traced, reference log-likelihoods; bad specs in one line."""
from __future__ import annotations

import json

import pytest
import torch

from routelens.cli import main
from routelens.steering.experiment import reference_loglik
from routelens.store import Store
from routelens.tiny import build_tiny_model, byte_tokenizer


@pytest.fixture()
def files(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rules": [{"layers": "all", "experts": [0, 1], "action": "disable"},
                                          {"layers": [1], "experts": [5], "action": "force"}]}))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hello", "reference": " world"}) + "\n" + json.dumps({"text": "abc"}) + "\n")
    return spec, prompts, tmp_path / "s.duckdb"


def test_steer_cli_side_by_side(files, capsys):
    spec, prompts, db = files
    assert main(["steer", "tiny:qwen3_moe", "--spec", str(spec), "--input", str(prompts), "--db", str(db),
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["prompts"]) == 2
    first = out["prompts"][0]
    assert first["reference"] == " world" and first["n_reference_tokens"] == 6
    assert first["delta_ll"] == pytest.approx(first["ll_steered"] - first["ll_base"])
    assert out["prompts"][1]["delta_ll"] is None
    assert 0 < first["routing_changed"] <= 1
    runs = {r.name: r for r in Store.open(db).runs()}
    assert runs["steer-base"].steering is None
    assert runs["steer-steered"].steering["rules"][0]["experts"] == [0, 1]
    assert runs["steer-steered"].status == "complete"


def test_reference_loglik_by_hand():
    model, tok = build_tiny_model("olmoe"), byte_tokenizer()
    ll, n = reference_loglik(model, tok, "ab", "cd")
    ids = tok("abcd")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    p = len(tok("ab")["input_ids"])
    want = sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids)))
    assert n == 2 and ll == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("spec_text, message", [
    ("{", "not valid JSON"),
    (json.dumps({"rules": [{"layers": [7], "experts": [0], "action": "disable"}]}), "layer 7 is out of range"),
    (json.dumps({"rules": [{"layers": "all", "experts": [0], "action": "explode"}]}), "unknown action"),
])
def test_bad_spec_is_one_line(files, capsys, spec_text, message):
    spec, prompts, db = files
    spec.write_text(spec_text)
    code = main(["steer", "tiny:qwen3_moe", "--spec", str(spec), "--input", str(prompts), "--db", str(db)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("routelens: error:")
