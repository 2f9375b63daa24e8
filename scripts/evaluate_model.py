#!/usr/bin/env python
"""Evaluate the routelens model organism on the HELD-OUT splits; write JSON and a markdown report.

    python scripts/evaluate_model.py --model OUT/model --out OUT/eval.json     # also writes OUT/eval.md

Runs on CUDA when available (``--device``), else CPU. Needs only torch, transformers, tokenizers, numpy (not
routelens: routing is read with plain forward hooks on every layer's ``mlp.gate``, whose v5 router returns
``(logits, weights, indices)``). The model is loaded with ``from_pretrained(..., dtype=float32)`` (the weights are
stored in bf16) and run in float32, with the ``eager`` experts implementation (the reference loop) on CUDA and
``grouped_mm`` (same math, much faster) on CPU.

Metrics (all on ``data/corpus/*.heldout.jsonl.gz``; the train splits are read only for unigram counts):

1. **Held-out loss / perplexity** per language and for the reasoning traces. Items are packed exactly as in
   training (``<s> a </s> b </s> ...``, one language per 512-token window, items never split, file order); the
   loss is the mean next-token NLL over every target after ``<s>`` (item tokens and each ``</s>``).
   **Unigram baseline**: add-one-smoothed token frequencies of the TRAIN split on the same tokenizer, counted
   over the same kind of targets (item tokens + one ``</s>`` per item), scored on exactly the same targets.
2. **Routing is learned**: each held-out parallel item is run on its own (``<s> text``, as ``routelens trace``
   would). Per MoE layer, over the item tokens (not ``<s>``): NMI between the top-1 expert E and the language L,
   ``NMI = I(E;L) / sqrt(H(E) H(L))`` (geometric normalisation; ``nmi_arith`` = ``2 I / (H(E) + H(L))`` is also
   reported), natural logs, plug-in estimates. Same for the same architecture at random init
   (``AutoModelForCausalLM.from_config(config)`` after ``torch.manual_seed(--seed)``).
3. **Expert load** per layer: the fraction of all top-k assignments that each expert receives over held-out tokens
   (parallel and reasoning items); reported max, min, ``max x E`` (1 = perfectly even) and the number of experts
   below 10 % of an even share; trained vs random init.
4. **Cross-lingual routing** per layer: for every language X != en, over the held-out align_ids that have both an
   English and an X row, P_X and P_en = the mean router distribution (softmax of the router logits over all E
   experts) over the tokens of those items; ``JSD_n(P, Q) = JSD(P, Q) / max(ln E - (H(P) + H(Q)) / 2, 1e-6)``,
   natural logs (0 = same routing, 1 = the largest JSD possible at those entropies). Reported per language and as
   the mean over the 19 languages, plus an English split-half reference (odd vs even aligned items) as a noise
   floor.
5. **Generation**: greedy continuations of an English and a German held-out UI string prefix and of a held-out
   reasoning question up to ``<think>``; plus the exact-match accuracy of greedy answers on the first
   ``--reasoning-n`` held-out reasoning questions (the text after ``</think>``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_model as tm  # noqa: E402  (packing, tokenizer and model-building helpers)

CORPUS = tm.CORPUS
SEQ_LEN = 512
METRIC_KEYS = (
    "heldout", "unigram", "routing", "generation", "reasoning_accuracy",
)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def read_rows(path: Path, limit_per_group: int | None = None) -> list[dict]:
    """Rows of a split; with ``limit_per_group``, the first N rows of every language (of the reasoning set) plus,
    for parallel rows, the English rows of the chosen items (so that every language keeps aligned pairs)."""
    rows = tm.read_jsonl_gz(path)
    if not limit_per_group:
        return rows
    seen: Counter = Counter()
    chosen_ids: set[str] = set()
    keep = []
    for r in rows:
        key = tm.group_key(r)
        if seen[key] < limit_per_group:
            seen[key] += 1
            keep.append(r)
            chosen_ids.add(r["align_id"])
    keep_set = {id(r) for r in keep}
    return [r for r in rows if id(r) in keep_set
            or (r.get("lang") == "en" and r.get("label") != tm.REASONING and r["align_id"] in chosen_ids)]


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def nmi(x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> tuple[float, float, float]:
    """(geometric NMI, arithmetic NMI, mutual information in nats) of two integer label arrays."""
    joint = np.zeros((nx, ny), dtype=np.float64)
    np.add.at(joint, (x, y), 1.0)
    joint /= joint.sum()
    px, py = joint.sum(1), joint.sum(0)
    hx, hy = entropy(px), entropy(py)
    mi = hx + hy - entropy(joint.ravel())
    geo = mi / math.sqrt(hx * hy) if hx > 0 and hy > 0 else 0.0
    ari = 2 * mi / (hx + hy) if hx + hy > 0 else 0.0
    return geo, ari, mi


def jsd_n(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    hp, hq = entropy(p), entropy(q)
    jsd = entropy(m) - 0.5 * (hp + hq)
    return float(jsd / max(math.log(len(p)) - 0.5 * (hp + hq), 1e-6))


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str, device: torch.device, experts_impl: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation=experts_impl)
    return model.to(device).eval()


def random_init_model(config, seed: int, device: torch.device, experts_impl: str):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation(experts_impl)
    return model.to(device).eval()


def moe_gates(model) -> list[tuple[int, torch.nn.Module]]:
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "weight") and gate.weight.ndim == 2:
            out.append((i, gate))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1. held-out loss vs unigram


def unigram_counts(tok, corpus: Path, vocab_size: int, limit_per_group: int | None = None) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for name in ("parallel.train.jsonl.gz", "reasoning.train.jsonl.gz"):
        rows = read_rows(corpus / name, limit_per_group)
        encoded = [ids for ids in tm.encode_items(tok, rows) if len(ids)]
        counts += np.bincount(np.concatenate(encoded), minlength=vocab_size)[:vocab_size]
        counts[tm.EOS_ID] += len(encoded)  # one </s> per item, as in training
    return counts


@torch.no_grad()
def heldout_loss(model, groups: dict[str, list[np.ndarray]], unigram_logp: np.ndarray, device, batch_size: int):
    res = {}
    for key in sorted(groups):
        windows = tm.pack(groups[key], SEQ_LEN)
        nll, uni, n = 0.0, 0.0, 0
        for i in range(0, len(windows), batch_size):
            ids, labels = tm.to_batch(windows[i: i + batch_size])
            ids, labels = ids.to(device), labels.to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            tgt = labels[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                         reduction="sum"))
            valid = tgt[tgt != -100].cpu().numpy()
            uni += float(-unigram_logp[valid].sum())
            n += len(valid)
        res[key] = {"items": len(groups[key]), "tokens": n, "loss": nll / n, "ppl": math.exp(nll / n),
                    "unigram_loss": uni / n, "unigram_ppl": math.exp(uni / n)}
    return res


def pooled(res: dict, keys: list[str]) -> dict:
    n = sum(res[k]["tokens"] for k in keys)
    loss = sum(res[k]["loss"] * res[k]["tokens"] for k in keys) / n
    uni = sum(res[k]["unigram_loss"] * res[k]["tokens"] for k in keys) / n
    return {"items": sum(res[k]["items"] for k in keys), "tokens": n, "loss": loss, "ppl": math.exp(loss),
            "unigram_loss": uni, "unigram_ppl": math.exp(uni)}


# ----------------------------------------------------------------------------------------------------------------
# 2-4. routing


@torch.no_grad()
def collect_routing(model, items: list[np.ndarray], device, batch_size: int):
    """Run every item alone as ``<s> text`` (length-sorted batches, right padding: under a causal model the pads
    after an item cannot change its routing) and read each MoE layer's router through a forward hook on
    ``mlp.gate``. Returns (layer indices, per item: top-k indices (L, n, k) of its n text tokens, sorted by weight
    so [..., 0] is the top-1 expert, and the sum over its tokens of the softmax router distribution (L, E))."""
    gates = moe_gates(model)
    captured: dict[int, tuple] = {}

    def make_hook(li):
        def hook(module, args, output):
            logits, _, indices = output  # v5 router contract: (logits, weights, indices)
            captured[li] = (logits.detach(), indices.detach())
        return hook

    handles = [g.register_forward_hook(make_hook(li)) for li, g in gates]
    topk: list = [None] * len(items)
    probsum: list = [None] * len(items)
    try:
        order = np.argsort([len(x) for x in items], kind="stable")
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            windows = [np.concatenate([[tm.BOS_ID], items[j]]).astype(np.int32) for j in idx]
            ids, _ = tm.to_batch(windows)
            ids = ids.to(device)
            captured.clear()
            model(input_ids=ids)
            B, T = ids.shape
            lens = torch.tensor([len(items[j]) for j in idx])
            mask = (torch.arange(T)[None, :] >= 1) & (torch.arange(T)[None, :] <= lens[:, None])  # text tokens
            mask = mask.to(device)
            p_sum, ind_all = [], []
            for li, _ in gates:
                logits, indices = captured[li]
                p = torch.softmax(logits.float(), dim=-1).view(B, T, -1)
                p_sum.append((p * mask[..., None]).sum(dim=1).double().cpu())  # (B, E)
                ind_all.append(indices.view(B, T, -1).to(torch.int16).cpu())  # (B, T, k)
            p_sum = torch.stack(p_sum, dim=1).numpy()  # (B, L, E)
            ind_all = torch.stack(ind_all, dim=1).numpy()  # (B, L, T, k)
            for b, j in enumerate(idx):
                n = len(items[j])
                topk[j] = ind_all[b, :, 1: 1 + n]
                probsum[j] = p_sum[b]
    finally:
        for h in handles:
            h.remove()
    return [li for li, _ in gates], topk, probsum


def routing_metrics(layers, num_experts: int, par_rows, par_routing, rea_routing) -> dict:
    _, topk, probsum = par_routing
    _, rea_topk, _ = rea_routing
    top1 = [t[:, :, 0] for t in topk]
    langs = sorted({r["lang"] for r in par_rows}, key=lambda x: tm.LANGS.index(x) if x in tm.LANGS else 99)
    lang_idx = {l: i for i, l in enumerate(langs)}
    L = len(layers)
    # NMI(top-1 expert; language) over all parallel tokens
    tok_lang = np.concatenate([np.full(t.shape[1], lang_idx[r["lang"]]) for r, t in zip(par_rows, top1)])
    all_top1 = np.concatenate(top1, axis=1)  # (L, N)
    nmi_geo, nmi_ari, mi = [], [], []
    for li in range(L):
        g, a, m = nmi(all_top1[li].astype(np.int64), tok_lang, num_experts, len(langs))
        nmi_geo.append(g)
        nmi_ari.append(a)
        mi.append(m)
    # expert load: top-k assignments over parallel + reasoning tokens
    all_topk = np.concatenate(topk + rea_topk, axis=1)  # (L, N, k)
    load_max, load_min, load_max_x_e, starved = [], [], [], []
    for li in range(L):
        frac = np.bincount(all_topk[li].ravel().astype(np.int64), minlength=num_experts) / all_topk[li].size
        load_max.append(float(frac.max()))
        load_min.append(float(frac.min()))
        load_max_x_e.append(float(frac.max() * num_experts))
        starved.append(int((frac < 0.1 / num_experts).sum()))
    # cross-lingual JSD to English on aligned items
    by_id: dict[str, dict[str, int]] = defaultdict(dict)
    for i, r in enumerate(par_rows):
        by_id[r["align_id"]][r["lang"]] = i

    def mean_probs(indices: list[int]) -> np.ndarray:
        s = sum(probsum[i] for i in indices)  # (L, E)
        n = sum(topk[i].shape[1] for i in indices)
        return s / max(n, 1)

    jsd_per_lang: dict[str, list[float]] = {}
    for lang in langs:
        if lang == "en":
            continue
        pairs = [(d["en"], d[lang]) for _, d in sorted(by_id.items()) if "en" in d and lang in d]
        if not pairs:
            continue
        p_en, p_x = mean_probs([a for a, _ in pairs]), mean_probs([b for _, b in pairs])
        jsd_per_lang[lang] = [jsd_n(p_x[li], p_en[li]) for li in range(L)]
    en_items = [d["en"] for _, d in sorted(by_id.items()) if "en" in d]
    split_half = []
    if len(en_items) >= 2:
        pa, pb = mean_probs(en_items[0::2]), mean_probs(en_items[1::2])
        split_half = [jsd_n(pa[li], pb[li]) for li in range(L)]
    jsd_mean = [float(np.mean([v[li] for v in jsd_per_lang.values()])) if jsd_per_lang else float("nan")
                for li in range(L)]
    return {
        "layers": layers,
        "languages": langs,
        "tokens_parallel": int(all_top1.shape[1]),
        "tokens_load": int(all_topk.shape[1]),
        "nmi_top1_language": nmi_geo,
        "nmi_arith": nmi_ari,
        "mutual_information_nats": mi,
        "load_max_frac": load_max,
        "load_min_frac": load_min,
        "load_max_x_E": load_max_x_e,
        "experts_below_10pct_of_even": starved,
        "jsd_n_to_en_mean": jsd_mean,
        "jsd_n_to_en_per_lang": jsd_per_lang,
        "jsd_n_en_split_half": split_half,
    }


# ----------------------------------------------------------------------------------------------------------------
# 5. generation


def answer_of(text: str) -> str:
    return text.split("</think>", 1)[1].strip() if "</think>" in text else ""


def prompts_from(par_rows, rea_rows) -> list[dict]:
    def ui_prefix(lang: str) -> dict:
        for r in par_rows:
            words = r["text"].split()
            if r["lang"] == lang and 6 <= len(words) <= 14:
                k = len(words) // 2
                return {"kind": f"ui_{lang}", "prompt": " ".join(words[:k]), "reference": r["text"]}
        r = next(r for r in par_rows if r["lang"] == lang)
        return {"kind": f"ui_{lang}", "prompt": r["text"][: max(1, len(r["text"]) // 2)], "reference": r["text"]}

    q = rea_rows[0]["text"]
    cut = q.index("<think>") + len("<think>")
    return [ui_prefix("en"), ui_prefix("de"),
            {"kind": "reasoning", "prompt": q[:cut], "reference": q}]


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding, <s> prepended
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tm.EOS_ID,
                         pad_token_id=tm.PAD_ID)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = []
    for row in new.tolist():
        if tm.EOS_ID in row:
            row = row[: row.index(tm.EOS_ID)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


# ----------------------------------------------------------------------------------------------------------------
# report


def fmt(x, nd=3):
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    lines = [f"# Evaluation of `{res['model']}`", "",
             f"{res['architecture']}, {res['params']:,} parameters, {res['safetensors_bytes'] / 1e6:.2f} MB "
             f"safetensors; device {res['device']}; {res['seconds']:.0f} s.", "",
             "## Held-out loss (nats/token) and perplexity vs a unigram baseline (same tokenizer, add-one smoothed "
             "train counts)", "",
             "| split | items | tokens | loss | ppl | unigram loss | unigram ppl |", "|---|---:|---:|---:|---:|---:|---:|"]
    h = res["heldout"]
    for key in list(h["per_language"]) + ["parallel (all)", "reasoning"]:
        v = h["per_language"].get(key) or (h["parallel_all"] if key == "parallel (all)" else h["reasoning"])
        lines.append(f"| {key} | {v['items']} | {v['tokens']} | {fmt(v['loss'])} | {fmt(v['ppl'], 1)} | "
                     f"{fmt(v['unigram_loss'])} | {fmt(v['unigram_ppl'], 1)} |")
    r = res["routing"]
    tr, rn = r["trained"], r["random_init"]
    E = res["config"]["num_experts"]
    lines += ["", f"## Routing per layer (trained vs random init; E = {E}, top-{res['config']['top_k']})", "",
              f"NMI = I(top-1 expert; language) / sqrt(H(E) H(L)) over {tr['tokens_parallel']:,} held-out parallel "
              f"tokens; load = share of top-k assignments over {tr['tokens_load']:,} held-out tokens (max x E: 1 = "
              "even); JSD_n = entropy-normalised JSD of each language's mean router distribution to English's on "
              "aligned items, mean over languages (split-half = English vs English noise floor).", "",
              "| layer | NMI trained | NMI random | load max x E trained | load max x E random | min frac trained | "
              "JSD_n to en trained | JSD_n to en random | JSD_n split-half trained |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, layer in enumerate(tr["layers"]):
        sh = tr["jsd_n_en_split_half"][i] if tr["jsd_n_en_split_half"] else float("nan")
        lines.append(f"| {layer} | {fmt(tr['nmi_top1_language'][i])} | {fmt(rn['nmi_top1_language'][i])} | "
                     f"{fmt(tr['load_max_x_E'][i], 2)} | {fmt(rn['load_max_x_E'][i], 2)} | "
                     f"{fmt(tr['load_min_frac'][i], 4)} | {fmt(tr['jsd_n_to_en_mean'][i])} | "
                     f"{fmt(rn['jsd_n_to_en_mean'][i])} | {fmt(sh)} |")
    if tr["jsd_n_to_en_per_lang"]:
        langs = list(tr["jsd_n_to_en_per_lang"])
        lines += ["", "JSD_n to English per language and layer (trained):", "",
                  "| lang | " + " | ".join(f"L{l}" for l in tr["layers"]) + " |",
                  "|---|" + "---:|" * len(tr["layers"])]
        for lang in langs:
            lines.append(f"| {lang} | " + " | ".join(fmt(x) for x in tr["jsd_n_to_en_per_lang"][lang]) + " |")
    lines += ["", "## Generation (greedy)", ""]
    for g in res["generation"]:
        lines += [f"**{g['kind']}** prompt: `{g['prompt']!r}`", "", "```", g["prompt"] + g["completion"], "```", ""]
    acc = res["reasoning_accuracy"]
    lines += [f"Reasoning exact-match accuracy (greedy, first {acc['n']} held-out questions): "
              f"{acc['correct']}/{acc['n']} = {fmt(acc['accuracy'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (config, safetensors, tokenizer)")
    ap.add_argument("--out", required=True, help="JSON output; the markdown report goes next to it (.md)")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-init reference model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-items", type=int, default=0,
                    help="quick tests: at most N held-out items per language and of reasoning, and unigram counts "
                         "from at most N train items per language / of reasoning (0 = all)")
    ap.add_argument("--reasoning-n", type=int, default=200, help="questions for the exact-match accuracy")
    ap.add_argument("--gen-batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=320, help="for the reasoning accuracy")
    ap.add_argument("--experts-impl", default="auto", choices=["auto", "eager", "grouped_mm", "batched_mm"],
                    help="auto: eager (the reference loop) on CUDA, grouped_mm on CPU (same math, much faster there)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    device = device_of(args.device)
    if args.experts_impl == "auto":
        args.experts_impl = "eager" if device.type == "cuda" else "grouped_mm"
    corpus = Path(args.corpus)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tok = tm.load_tokenizer(Path(args.model))
    model = load_model(args.model, device, args.experts_impl)
    config = model.config
    V, E = config.vocab_size, config.num_experts
    print(f"loaded {args.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"device {device}", flush=True)

    limit = args.max_items or None
    par_rows = read_rows(corpus / "parallel.heldout.jsonl.gz", limit)
    rea_rows = read_rows(corpus / "reasoning.heldout.jsonl.gz", limit)
    par_ids = tm.encode_items(tok, par_rows)
    rea_ids = tm.encode_items(tok, rea_rows)
    keep = [i for i, x in enumerate(par_ids) if len(x)]
    par_rows, par_ids = [par_rows[i] for i in keep], [par_ids[i] for i in keep]

    # 1. held-out loss vs unigram
    counts = unigram_counts(tok, corpus, V, limit)
    uni_logp = np.log((counts + 1.0) / (counts.sum() + V))
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for r, ids in zip(par_rows, par_ids):
        groups[r["lang"]].append(ids)
    groups["reasoning"] = [x for x in rea_ids if len(x)]
    per = heldout_loss(model, groups, uni_logp, device, args.batch_size)
    langs = [l for l in tm.LANGS if l in per] + sorted(k for k in per if k not in tm.LANGS and k != "reasoning")
    heldout = {"per_language": {l: per[l] for l in langs}, "parallel_all": pooled(per, langs),
               "reasoning": per["reasoning"],
               "definition": "mean next-token NLL (nats) over all targets after <s> in packed 512-token windows "
                             "of one language (items + </s>), as in training"}
    print(f"held-out loss done ({time.time() - t0:.0f}s)", flush=True)

    # 2-4. routing: trained vs random init
    rea_for_load = [x for x in rea_ids if len(x)]
    routing = {"nmi_definition": "I(E;L)/sqrt(H(E)H(L)), E = top-1 expert, L = language, natural log; "
                                 "nmi_arith = 2I/(H(E)+H(L))",
               "jsd_definition": "JSD(P,Q)/max(ln E - (H(P)+H(Q))/2, 1e-6), P/Q = mean softmax router "
                                 "distribution over the tokens of aligned items, natural log"}
    for name, m in (("trained", model), ("random_init", random_init_model(config, args.seed, device,
                                                                         args.experts_impl))):
        par_r = collect_routing(m, par_ids, device, args.batch_size)
        rea_r = collect_routing(m, rea_for_load, device, args.batch_size)
        routing[name] = routing_metrics(par_r[0], E, par_rows, par_r, rea_r)
        if name == "random_init":
            del m
        print(f"routing ({name}) done ({time.time() - t0:.0f}s)", flush=True)

    # 5. generation
    prompts = prompts_from(par_rows, rea_rows)
    generation = []
    for p in prompts:
        n_new = 200 if p["kind"] == "reasoning" else 24
        completion = greedy(model, tokenizer, [p["prompt"]], n_new, device)[0]
        generation.append({**p, "completion": completion})
    n = min(args.reasoning_n, len(rea_rows))
    questions = [r["text"][: r["text"].index("<think>") + len("<think>")] for r in rea_rows[:n]]
    correct = 0
    examples = []
    for i in range(0, n, args.gen_batch_size):
        outs = greedy(model, tokenizer, questions[i: i + args.gen_batch_size], args.max_new_tokens, device)
        for r, o in zip(rea_rows[i: i + args.gen_batch_size], outs):
            ok = answer_of("<think>" + o) == answer_of(r["text"]) != ""
            correct += ok
            if len(examples) < 3:
                examples.append({"question": r["text"].split("\n", 1)[0], "predicted": answer_of("<think>" + o),
                                 "reference": answer_of(r["text"]), "correct": bool(ok)})
    reasoning_accuracy = {"n": n, "correct": int(correct), "accuracy": correct / n if n else float("nan"),
                          "examples": examples,
                          "definition": "greedy continuation of 'question\\n<think>' until </s>; exact match of the "
                                        "stripped text after </think>"}
    print(f"generation done ({time.time() - t0:.0f}s)", flush=True)

    st = sorted(Path(args.model).glob("*.safetensors"))
    res = {
        "model": str(args.model),
        "architecture": type(model).__name__,
        "config": {"model_type": config.model_type, "layers": config.num_hidden_layers,
                   "hidden": config.hidden_size, "num_experts": E, "top_k": config.num_experts_per_tok,
                   "moe_intermediate_size": config.moe_intermediate_size, "vocab_size": V},
        "params": sum(p.numel() for p in model.parameters()),
        "safetensors_bytes": sum(p.stat().st_size for p in st),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "experts_impl": args.experts_impl,
        "heldout": heldout,
        "unigram": {"train_tokens": int(counts.sum()), "smoothing": "add-one over the vocabulary",
                    "train_items_per_group_limit": limit,
                    "parallel_all_ppl": heldout["parallel_all"]["unigram_ppl"],
                    "reasoning_ppl": heldout["reasoning"]["unigram_ppl"]},
        "routing": routing,
        "generation": generation,
        "reasoning_accuracy": reasoning_accuracy,
        "seconds": time.time() - t0,
        "torch": torch.__version__,
    }
    import transformers

    res["transformers"] = transformers.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = markdown(res)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
