"""Dashboard render time per page on a store of ~10 M routing decisions (80k tokens × 16 MoE layers × top-8, E = 64).

Builds (or reuses, ``--db``) a synthetic store with sticky-Markov routing, router logits, expert stats, residual
maxima, languages and a vocabulary, stores the analysis results that exist in this install (stats, crosslingual,
npmi, super-experts stats-only, lrc), then renders every page with ``streamlit.testing.v1.AppTest``:

* cold: ``st.cache_data`` cleared first, so every query runs (what a first visit, or a visit after the store
  changed, costs);
* warm: the same page rerun (what an interaction that keeps the cached data costs).

The time is the whole script run of the page (sidebar + page), measured around ``AppTest.run``; the browser's own
drawing is not included. Results: benchmarks/results/app_render.md and .json.

    python benchmarks/app_render.py [--db PATH] [--tokens 81920] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "app" / "main.py"
PAGES = ("runs", "overview", "tokens", "consistency", "super_experts", "crosslingual", "cognitive", "steering")
E, K, L, SEQ_LEN = 64, 8, 16, 512
LANGS = ("en", "de", "fr", "es", "zh", "ar", "hi", "sw")


def sticky_routing(rng, n: int, stay: float = 0.8) -> np.ndarray:
    """[L, n, K] distinct experts per token: each layer keeps a token's predecessor's set with prob ``stay``."""
    out = np.empty((L, n, K), np.uint16)
    for li in range(L):
        fresh = np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.uint16)
        keep = rng.random(n) < stay
        keep[0] = False
        idx = np.where(keep, 0, np.arange(n))
        idx = np.maximum.accumulate(idx)  # index of the last fresh row at or before t
        out[li] = fresh[idx]
    return out


def build(db: Path, n_tokens: int, seed: int = 0) -> None:
    from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
    from routelens.store import Store

    rng = np.random.default_rng(seed)
    store = Store.open(db)
    n_seq = n_tokens // SEQ_LEN
    meta = RunMeta(model="synthetic-10M", architecture="Synthetic", family="qwen3_moe", config_hash="0", num_experts=E,
                   top_k=K, moe_layers=tuple(range(L)), num_layers=L, dtype="float16", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="benchmarks/app_render.py", name="bench",
                   tags=("bench",))
    vocab = {i: f"t{i}" for i in range(4096)} | {3: "<think>", 4: "</think>", 5: "Wait"}
    writer = store.create_run(meta)
    with writer:
        writer.add_sequences([SequenceRecord(seq_id=i, text=f"sequence {i}", n_tokens=SEQ_LEN, lang=LANGS[i % len(LANGS)],
                                             align_id=f"a{i // len(LANGS)}", label="reasoning" if i % 2 else "parallel")
                              for i in range(n_seq)])
        per_block = 16 * SEQ_LEN
        for start in range(0, n_seq * SEQ_LEN, per_block):
            n = min(per_block, n_seq * SEQ_LEN - start)
            seq = (np.arange(start, start + n) // SEQ_LEN).astype(np.int64)
            pos = (np.arange(start, start + n) % SEQ_LEN).astype(np.int32)
            tok = rng.integers(0, 4096, n).astype(np.int32)
            experts = sticky_routing(rng, n)
            w = np.sort(rng.dirichlet(np.ones(K), size=(L, n)).astype(np.float32), axis=-1)[..., ::-1].copy()
            logits = rng.normal(0, 1, (L, n, E)).astype(np.float16)
            res = rng.gamma(2.0, 1.0, (L, n)).astype(np.float32)
            writer.add_block(TokenBlock(seq_id=seq, pos=pos, token_id=tok, layers=tuple(range(L)), experts=experts,
                                        weights=w, logits=logits, residual_layers=tuple(range(L)), residual_max=res,
                                        residual_channel=np.zeros((L, n), np.int32)))
        writer.add_vocabulary(vocab)
        writer.add_expert_stats([ExpertStat(l, e, 1000, float(rng.gamma(2.0, 2.0)) + (400.0 if (l, e) == (1, 7) else 0),
                                            0, 0, 1, 1.0, 0, 0, 0) for l in range(L) for e in range(E)])


def analyse(db: Path) -> dict[str, str]:
    """Store every analysis result this install can compute; returns analysis -> 'seconds' or why not."""
    from routelens.analyses.registry import run_analysis
    from routelens.store import Store

    store = Store.open(db)
    info = store.runs()[0]
    done = {}
    plan = {"stats": {}, "crosslingual": {"mode": "counts"}, "npmi": {}, "super-experts": {"stats_only": True},
            "lrc": {}}
    for name, params in plan.items():
        t0 = time.perf_counter()
        try:
            run_analysis(store, name, [info], params)
            done[name] = f"{time.perf_counter() - t0:.1f} s"
        except Exception as exc:  # a module not in this install, or one that refuses the synthetic run
            done[name] = f"not stored: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"  {name}: {done[name]}", flush=True)
    return done


def without_stats(db: Path) -> Path:
    """A copy of the store without its `stats` result: the Overview then computes entropy from the logits."""
    import shutil

    from routelens.store.connection import session

    copy = db.with_name(db.stem + "-nostats.duckdb")
    shutil.copy(db, copy)
    with session(copy, read_only=False) as con:
        con.sql("DELETE FROM analysis_results WHERE analysis = 'stats'")
    return copy


def render(db: Path, repeat: int, pages=PAGES, label: str = "") -> dict[str, dict]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    out = {}
    for page in pages:
        cold, warm = [], []
        for _ in range(repeat):
            st.cache_data.clear()
            at = AppTest.from_file(str(MAIN), default_timeout=120)
            at.session_state["rl_db"] = str(db)
            at.run()  # the Runs page (default), which also fills the sidebar
            if page != "runs":
                at.switch_page(f"pages/{page}.py")
                st.cache_data.clear()
            else:
                st.cache_data.clear()
            t0 = time.perf_counter()
            at.run()
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t0)
            if at.exception:
                raise RuntimeError(f"{page}: {at.exception[0].value}")
        info = [i.value for i in at.info]
        out[page + label] = {"cold_s": statistics.median(cold), "cold_max_s": max(cold), "warm_s": statistics.median(warm),
                     "charts": len(at.get("plotly_chart")), "messages": info[:2]}
        r = out[page + label]
        print(f"  {page + label:14s} cold {r['cold_s']:.2f} s (max {max(cold):.2f})  warm {r['warm_s']:.2f} s"
              f"  charts {r['charts']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, default=Path("/tmp/routelens-app-bench.duckdb"))
    ap.add_argument("--tokens", type=int, default=160 * SEQ_LEN)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "app_render")
    args = ap.parse_args()
    if not args.db.exists():
        print(f"building {args.db} ...", flush=True)
        t0 = time.perf_counter()
        build(args.db, args.tokens)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        print("analyses:", flush=True)
        analyses = analyse(args.db)
    else:
        analyses = {"note": "store reused; results as stored"}
    from routelens.store import Store

    info = Store.open(args.db).runs()[0]
    print(f"run: {info.n_tokens:,} tokens, {info.n_decisions:,} decisions; rendering:", flush=True)
    pages = render(args.db, args.repeat)
    pages.update(render(without_stats(args.db), args.repeat, ("overview",), " (no stats result: entropy from logits)"))
    result = {"decisions": info.n_decisions, "tokens": info.n_tokens, "layers": L, "top_k": K, "experts": E,
              "store_mib": round(args.db.stat().st_size / 2**20, 1), "analyses": analyses, "pages": pages,
              "repeat": args.repeat, "cpus": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Dashboard render time per page (benchmarks/app_render.py)", "",
             f"Store: one run of {info.n_tokens:,} tokens × {L} MoE layers × top-{K} = **{info.n_decisions:,} routing "
             f"decisions** (E = {E}, router logits stored, {result['store_mib']} MiB), on this {os.cpu_count()}-core "
             "CPU box (shared with other jobs). Each page is run through `streamlit.testing.v1.AppTest` (the whole "
             f"script: sidebar + page); median of {args.repeat}. *cold* = `st.cache_data` cleared first (every query "
             "runs), *warm* = the same page rerun with the cache filled. Browser drawing time is not included.", "",
             "| page | cold (s) | cold max (s) | warm (s) | plotly figures | ≤ 2 s cold |", "|---|---:|---:|---:|---:|---|"]
    for page, r in pages.items():
        lines.append(f"| {page} | {r['cold_s']:.2f} | {r['cold_max_s']:.2f} | {r['warm_s']:.2f} | {r['charts']} | "
                     f"{'yes' if r['cold_max_s'] <= 2 else 'NO'} |")
    lines += ["", "Not in the table: the first visit to Steering in a fresh server process imports torch through "
              "`routelens.steering` (about 2.5 s once per process); loading the model and generating happen only "
              "on the button."]
    lines += ["", "Analysis results stored before rendering (their compute time is not part of a page render):", ""]
    lines += [f"- `{k}`: {v}" for k, v in analyses.items()]
    notes = {p: r["messages"] for p, r in pages.items() if r["messages"]}
    if notes:
        lines += ["", "Messages shown (a page without its analysis result shows the command instead):", ""]
        lines += [f"- {p}: {'; '.join(m[:140] for m in msgs)}" for p, msgs in notes.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
