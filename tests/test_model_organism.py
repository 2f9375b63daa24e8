"""The model organism: tokenizer in data/model, the training script (--smoke) and the evaluation script.

Fast and CPU-only: the training and evaluation scripts run in-process on a tiny smoke model. When the trained
weights are present (data/model/config.json), they are checked too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "data" / "model"
SCRIPTS = ROOT / "scripts"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_loads_offline_with_specials(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 6144
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.encode("Open file")[0] == tokenizer.bos_token_id  # BOS prepended
    assert tokenizer.encode("Open file", add_special_tokens=False)[0] != tokenizer.bos_token_id


@pytest.mark.parametrize("text", [
    "保存文件时出错：磁盘已满",  # zh
    "ابحث إلى الخلف في المستند",  # ar
    "पीछे से ढूँढें और बदलें",  # hi
    "Compute 94 × 56 - 253.\n<think>\nWait, 94 × 6 = 564.\n</think>\n5011",
])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text


def test_think_markers_are_single_tokens(tokenizer):
    assert tokenizer.encode("<think>", add_special_tokens=False) == [3]
    assert tokenizer.encode("</think>", add_special_tokens=False) == [4]
    ids = tokenizer.encode("Q?\n<think>\nSo 2.\n</think>\n2", add_special_tokens=False)
    assert ids.count(3) == 1 and ids.count(4) == 1
    # kept when special tokens are skipped: reasoning traces decode as written
    assert "<think>" in tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_is_not_all_bytes(tokenizer):
    # CJK characters and Devanagari syllables are mostly whole tokens, not 3 bytes each
    zh = "文件已保存"
    assert len(tokenizer.encode(zh, add_special_tokens=False)) <= len(zh) + 1
    hi = "फ़ाइल सहेजें"
    assert len(tokenizer.encode(hi, add_special_tokens=False)) < len(hi.encode()) / 2


# ---------------------------------------------------------------------------------------------------------------
# training (--smoke) and evaluation on the smoke model


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    train_model = _load_script("train_model")
    assert train_model.main(["--out", str(out), "--smoke"]) == 0
    return out


def test_smoke_training_produces_a_loadable_model(smoke_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = smoke_run / "model"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (mdir / name).is_file(), name
    st = list(mdir.glob("*.safetensors"))
    assert st and sum(p.stat().st_size for p in st) < 2_000_000
    config = json.loads((mdir / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True and not config.get("output_router_logits")
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(mdir))
    assert model.dtype == torch.float32
    with torch.no_grad():
        out = model(**tok(["Open file", "Datei öffnen"], return_tensors="pt", padding=True))
    assert out.logits.shape[-1] == 6144 and torch.isfinite(out.logits).all()
    log = (smoke_run / "train_log.txt").read_text()
    assert "check: out.loss" in log and "| aux " in log and "tok/s" in log
    summary = json.loads((smoke_run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["params"] > 0


def test_smoke_training_never_reads_heldout(smoke_run):
    train_model = _load_script("train_model")
    import inspect

    src = inspect.getsource(train_model)
    assert "heldout" not in src.replace("held-out", "")  # only the *.train splits are opened


def test_evaluation_emits_every_metric(smoke_run):
    evaluate_model = _load_script("evaluate_model")
    out = smoke_run / "eval.json"
    assert evaluate_model.main(["--model", str(smoke_run / "model"), "--out", str(out), "--max-items", "6",
                                "--reasoning-n", "2", "--max-new-tokens", "16", "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    for key in ("heldout", "unigram", "routing", "generation", "reasoning_accuracy", "params", "safetensors_bytes"):
        assert key in res, key
    per = res["heldout"]["per_language"]
    assert set(per) == set(evaluate_model.tm.LANGS)
    for v in list(per.values()) + [res["heldout"]["parallel_all"], res["heldout"]["reasoning"]]:
        assert {"tokens", "loss", "ppl", "unigram_loss", "unigram_ppl"} <= set(v) and v["tokens"] > 0
    n_layers = json.loads((smoke_run / "model" / "config.json").read_text())["num_hidden_layers"]
    for which in ("trained", "random_init"):
        r = res["routing"][which]
        for key in ("nmi_top1_language", "nmi_arith", "load_max_frac", "load_min_frac", "load_max_x_E",
                    "jsd_n_to_en_mean", "jsd_n_en_split_half"):
            assert len(r[key]) == n_layers, (which, key)
        assert all(0.0 <= x <= 1.0 for x in r["nmi_top1_language"])
        assert all(0.0 <= x <= 1.0 + 1e-9 for v in r["jsd_n_to_en_per_lang"].values() for x in v)
        assert len(r["jsd_n_to_en_per_lang"]) == len(evaluate_model.tm.LANGS) - 1
    assert [g["kind"] for g in res["generation"]] == ["ui_en", "ui_de", "reasoning"]
    assert res["generation"][2]["prompt"].endswith("<think>")
    assert res["reasoning_accuracy"]["n"] == 2
    assert out.with_suffix(".md").read_text().startswith("# Evaluation")


def test_nmi_and_jsd_definitions():
    import numpy as np

    evaluate_model = _load_script("evaluate_model")
    x = np.array([0, 0, 1, 1, 2, 2])
    geo, ari, mi = evaluate_model.nmi(x, x, 3, 3)
    assert geo == pytest.approx(1.0) and ari == pytest.approx(1.0) and mi == pytest.approx(np.log(3))
    geo, _, _ = evaluate_model.nmi(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 2, 2)
    assert geo == pytest.approx(0.0, abs=1e-12)
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.array([0.0, 0.0, 0.5, 0.5])
    assert evaluate_model.jsd_n(p, p) == pytest.approx(0.0, abs=1e-12)
    assert evaluate_model.jsd_n(p, q) == pytest.approx(1.0)  # disjoint supports: the largest possible JSD


def test_packing_keeps_items_whole():
    import numpy as np

    train_model = _load_script("train_model")
    rng = np.random.default_rng(0)
    items = [rng.integers(5, 100, size=int(n)).astype(np.int32) for n in rng.integers(1, 60, size=200)]
    windows = train_model.pack(items, 64)
    assert all(len(w) <= 64 and w[0] == 1 and w[-1] == 2 for w in windows)
    got = sorted(tuple(p[:-1]) for w in windows for p in np.split(w[1:], np.where(w[1:] == 2)[0] + 1) if len(p))
    assert got == sorted(tuple(x) for x in items)


def test_router_losses_measure_balance():
    import torch

    train_model = _load_script("train_model")
    E, k, T = 8, 2, 12
    ids = torch.full((1, T), 7)
    uniform = [torch.zeros(T, E)]
    bal, z, maxload = train_model.router_losses(uniform, ids, k)
    assert float(bal) == pytest.approx(1.0) and float(z) == pytest.approx(float(torch.log(torch.tensor(8.0))) ** 2)
    skewed = torch.full((T, E), -30.0)
    skewed[:, :2] = 0.0  # every token picks experts 0 and 1
    bal, _, maxload = train_model.router_losses([torch.zeros(T, E), skewed], ids, k)
    assert float(maxload) == pytest.approx(E / 2)  # 50 % of the assignments on one expert, x E
    assert float(bal) == pytest.approx((1.0 + E / 2) / 2, rel=1e-4)  # mean of the two layers
    ids[0, -4:] = train_model.PAD_ID  # padding does not count
    _, _, maxload = train_model.router_losses([skewed], ids, k)
    assert float(maxload) == pytest.approx(E / 2)


def test_bf16_grouped_experts_match_eager():
    import torch
    import torch.nn.functional as F

    train_model = _load_script("train_model")
    if getattr(F, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        pytest.skip("no grouped_mm in this torch")
    from dataclasses import replace

    arch = replace(train_model.SMOKE_ARCH, moe_intermediate_size=16)
    model = train_model.build_model(train_model.make_config(arch), 0)
    ids = torch.randint(5, 6000, (2, 16))
    model.set_experts_implementation("eager")
    ref = model(input_ids=ids).logits
    try:
        train_model.set_experts_impl(model, train_model.BF16_EXPERTS)
        got = model(input_ids=ids).logits
    except (RuntimeError, NotImplementedError) as exc:  # no bf16 grouped_mm kernel on this CPU build
        pytest.skip(f"bf16 grouped_mm unavailable here: {exc}")
    assert torch.allclose(got, ref, atol=5e-2, rtol=0)  # bf16 GEMMs vs fp32 reference


# ---------------------------------------------------------------------------------------------------------------
# the trained model, once its weights are in data/model


needs_weights = pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason="no trained weights yet")


@needs_weights
def test_trained_model_loads_and_is_small():
    import torch
    from transformers import AutoModelForCausalLM

    st = list(MODEL_DIR.glob("*.safetensors"))
    assert st and sum(p.stat().st_size for p in st) <= 25_000_000
    assert all(p.stat().st_size <= 16 * 2**20 for p in st)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    assert type(model).__name__ in ("Qwen3MoeForCausalLM", "OlmoeForCausalLM")
    assert model.config.num_experts >= 16 and 2 <= model.config.num_experts_per_tok <= 4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    try:
        from routelens.adapters import adapt
    except ImportError:  # routelens' own dependencies absent: the architecture check above stands
        return
    adapted = adapt(model)
    assert adapted.family in ("qwen3_moe", "olmoe")
