"""Every analysis over one big trace: wall time and peak memory, against the trace's compact form.

    .venv/bin/python benchmarks/analyses_speed.py [--tokens 1048576] [--db PATH] [--only NAME ...]

Builds (once, reused when --db exists) a store with one run of ``--tokens`` tokens × 16 MoE layers × top-8 of 64
experts in 512-token sequences, with locality (segments of about 16 tokens favour a set of 12 experts, over a Zipf-skewed
popularity), and with what the other
analyses need: sequences labelled ``A``/``B`` and tagged with one of 5 languages and an ``align_id`` (5 translations
per passage), token ids over a 6,144 vocabulary in which ``<think>``/``Wait`` occur, expert statistics and residual
maxima. No router logits (1 M tokens of fp16 logits would be 2 GB): analyses that can use logits run in their
top-k modes here.

Each analysis runs in a fresh subprocess (``routelens.analyses.run`` with its defaults plus the arguments below,
result stored), timed end to end (reading the store included); the peak RSS reported is the subprocess's peak minus
its RSS after importing the package and the analysis module (code, not data), compared with the run's compact form in the store (2.8 bytes per decision).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

L, K, E, SEQ, VOCAB = 16, 8, 64, 512, 6144
LANGS = ("en", "de", "fr", "sw", "zh")
MARKERS = {3: "<think>", 4: "</think>", 5: "Wait"}
PARAMS = {  # per analysis: parameters for this store (defaults otherwise)
    "lrc": {},
    "stats": {},
    "contrast": {"label1": "A", "label2": "B"},
    "crosslingual": {"mode": "counts"},
    "npmi": {"markers": "<think>,Wait"},
    "super-experts": {"stats_only": True},  # the synthetic run has no model to ablate
}


def _local_layer(rng, n: int, chunk: int = 1 << 16) -> np.ndarray:
    """[n, K] experts with locality: segments (mean 16 tokens) favour a set of 12 experts (Gumbel top-k over
    log-popularity + 2.5 for the segment's set), on top of a Zipf-skewed popularity."""
    log_pop = -1.0 * np.log1p(rng.permutation(E))
    seg_id = np.cumsum(rng.random(n) < 1 / 16)
    n_seg = int(seg_id[-1]) + 1
    favoured = np.argsort(rng.random((n_seg, E)), axis=1)[:, :12]
    out = np.empty((n, K), np.uint16)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        scores = log_pop + rng.gumbel(size=(b - a, E))
        bonus = np.zeros((b - a, E))
        np.put_along_axis(bonus, favoured[seg_id[a:b]], 2.5, axis=1)
        scores += bonus
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out[a:b] = np.take_along_axis(top, order, 1)
    return out


def build(db: Path, tokens: int) -> None:
    from routelens.records import ExpertStat, RunMeta, SequenceRecord, TokenBlock
    from routelens.store import Store

    rng = np.random.default_rng(0)
    n_seq = tokens // SEQ
    tokens = n_seq * SEQ
    print(f"building {db}: {tokens} tokens x {L} layers x top-{K} of {E} ...", flush=True)
    experts = np.stack([_local_layer(rng, tokens) for _ in range(L)])
    weights = np.sort(rng.dirichlet(np.ones(K), size=(L, tokens)).astype(np.float16), axis=-1)[..., ::-1]
    token_id = rng.integers(6, VOCAB, size=tokens).astype(np.int32)
    token_id[rng.random(tokens) < 0.004] = 3
    token_id[rng.random(tokens) < 0.004] = 5
    seq = np.repeat(np.arange(n_seq, dtype=np.int64), SEQ)
    pos = np.tile(np.arange(SEQ, dtype=np.int32), n_seq)
    store = Store.open(db)
    meta = RunMeta(model="synthetic", architecture="Synthetic", family="olmoe", config_hash="0", num_experts=E,
                   top_k=K, moe_layers=tuple(range(L)), num_layers=L, dtype="bfloat16", transformers_version="-",
                   torch_version="-", routelens_version="-", input_source="benchmarks/analyses_speed.py",
                   name="bench")
    w = store.create_run(meta)
    with w:
        w.add_sequences([SequenceRecord(seq_id=i, text=f"passage {i // len(LANGS)} in {LANGS[i % len(LANGS)]}",
                                        n_tokens=SEQ, label="AB"[i % 2], lang=LANGS[i % len(LANGS)],
                                        align_id=str(i // len(LANGS))) for i in range(n_seq)])
        for a in range(0, tokens, 8192):
            b = min(a + 8192, tokens)
            resid = rng.gamma(2.0, 1.0, size=(L, b - a)).astype(np.float32)
            w.add_block(TokenBlock(seq_id=seq[a:b], pos=pos[a:b], token_id=token_id[a:b], layers=tuple(range(L)),
                                   experts=experts[:, a:b], weights=weights[:, a:b], residual_layers=tuple(range(L)),
                                   residual_max=resid, residual_channel=np.zeros((L, b - a), np.int32)))
        w.add_vocabulary({i: MARKERS.get(i, f"t{i}") for i in range(VOCAB)})
        w.add_expert_stats([ExpertStat(l, e, 1000, float(rng.gamma(2.0)), 0, 0, 0, 1.0, 0, 0, 0)
                            for l in range(L) for e in range(E)])
        w.finish("complete")


CHILD = r"""
import json, resource, sys, time
import routelens.analyses as A
from routelens.store import Store
name, db, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
A.get(name)  # the analysis' own imports (numba for lrc) are code, not data: loaded before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = A.run(Store.open(db, create=False), name, "bench", **params)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_mib": (peak - base) / 1024, "rows": {k: v.height for k, v in res.frames.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "routelens-analyses-bench.duckdb")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "analyses_speed.json")
    args = ap.parse_args()
    if not args.db.exists():
        t0 = time.perf_counter()
        build(args.db, args.tokens)
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    from routelens.store import Store

    info = Store.open(args.db, create=False).run("bench").info
    compact_mib = info.n_decisions * 2.8 / 2**20
    results = {"tokens": info.n_tokens, "decisions": info.n_decisions, "compact_form_mib": compact_mib,
               "cpu_count": os.cpu_count(), "analyses": {}}
    if args.only and args.out.exists():  # a partial rerun updates the earlier figures of the others' runs
        results["analyses"] = json.loads(args.out.read_text()).get("analyses", {})
    for name, params in PARAMS.items():
        if args.only and name not in args.only:
            continue
        params = {k: v for k, v in params.items() if v is not None}
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(args.db), json.dumps(params)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            results["analyses"][name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        else:
            results["analyses"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results["analyses"][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"compact form of the run: {compact_mib:.0f} MiB; results in {args.out}")


if __name__ == "__main__":
    main()
