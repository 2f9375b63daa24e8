"""The `routelens` command line. Every command takes --json for machine-readable output; every user error is
one line on stderr with a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

from .errors import RoutelensError

DATA = Path(__file__).resolve().parent.parent / "data"
DEMO_INPUT = DATA / "corpus" / "demo.jsonl"
DEMO_MODEL = DATA / "model"  # the model organism trained by scripts/train_model.py (data/model/README.md)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def _emit(args, payload, text: str) -> None:
    if args.json:
        print(json.dumps(_jsonable(payload), ensure_ascii=False, indent=None))
    else:
        print(text)


def _run_line(r) -> str:
    tags = f" tags={','.join(r.tags)}" if r.tags else ""
    return (f"{r.run_id:>4}  {r.status:<10}  {r.family:<12} E={r.num_experts:<4} k={r.top_k:<2} "
            f"layers={len(r.moe_layers):<3} seqs={r.n_sequences:<6} tokens={r.n_tokens:<9} "
            f"{(r.name or ''):<16} {r.model}{tags}")


def _load(args):
    from transformers.utils import logging as hf_logging

    from .loading import load_model

    hf_logging.set_verbosity_error()  # the CLI speaks in its own one-line messages; library warnings are noise here
    from .tiny import byte_tokenizer, build_tiny_model

    if args.model.startswith("tiny:"):
        family = args.model.split(":", 1)[1]
        return build_tiny_model(family), byte_tokenizer()
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def cmd_trace(args) -> int:
    from .store import Store
    from .tracer import TraceOptions, trace

    from .tracer.inputs import read_inputs

    records = read_inputs(args.input)  # read (and validate) once, before paying for a model load
    store = Store.open(args.db)
    model, tokenizer = _load(args)
    opts = TraceOptions(batch_size=args.batch_size, max_tokens=args.max_tokens, overflow=args.overflow,
                        logits=args.logits, expert_stats=args.expert_stats, residual=not args.no_residual,
                        max_new_tokens=args.max_new_tokens, shard=args.shard, num_shards=args.num_shards,
                        run_uuid=args.run_uuid)
    run = trace(model, tokenizer, records, store=store, name=args.name, tags=args.tag or (), options=opts,
                model_ref=args.model, input_source=str(args.input), progress=not args.json and not args.no_progress)
    _emit(args, run.info, _run_line(run.info))
    return 0


def cmd_runs(args) -> int:
    from .store import Store

    runs = Store.open(args.db, create=False).runs()
    text = "\n".join(_run_line(r) for r in runs) if runs else f"no runs in {args.db}; add one with `routelens trace`"
    _emit(args, runs, text)
    return 0


def cmd_export(args) -> int:
    from .store import Store

    path = Store.open(args.db, create=False).export_run(_run_ref(args.run), args.parquet)
    _emit(args, {"run": args.run, "path": str(path)}, f"exported run {args.run} to {path}")
    return 0


def cmd_import(args) -> int:
    from .store import Store

    runs = Store.open(args.db).import_runs(*args.dirs)
    _emit(args, runs, "\n".join(_run_line(r) for r in runs))
    return 0


# What the demo computes after tracing, so every dashboard page has a result on the embedded default.
DEMO_ANALYSES = (
    ("stats", {}),
    ("lrc", {"m": (4, 16), "bootstrap": 200}),  # demo texts are short: windows of 64/256 tokens would be empty
    ("crosslingual", {"mode": "mean", "pairwise": True}),
    ("npmi", {}),
    ("contrast", {"label1": "reasoning", "label2": "parallel", "num_pos": 2, "num_neg": 4}),
    ("super-experts", {"model": str(DEMO_MODEL), "max_tokens": 512}),
)


def cmd_demo(args) -> int:
    """The main job on the embedded default: trace the shipped demo texts, run every analysis, summarise."""
    from transformers.utils import logging as hf_logging

    from routelens.analyses import run_analysis

    from .loading import load_model
    from .store import Store
    from .tracer import TraceOptions, trace

    hf_logging.set_verbosity_error()
    store = Store.open(args.db)
    model, tok = load_model(str(DEMO_MODEL), dtype="float32")
    run = trace(model, tok, str(DEMO_INPUT), store=store, name="demo", tags=("demo",),
                options=TraceOptions(batch_size=16, logits=True, expert_stats=True),
                model_ref=str(DEMO_MODEL.relative_to(DATA.parent)), progress=not args.json)
    loads = store.sql(
        "SELECT layer, expert, count(*) AS n FROM routing WHERE run_id = ? GROUP BY layer, expert "
        "QUALIFY row_number() OVER (PARTITION BY layer ORDER BY n DESC, expert) <= 3 ORDER BY layer, n DESC",
        [run.info.run_id],
    )
    lines = [_run_line(run.info), "", "most used experts per layer (tokens routed):"]
    for layer in sorted(set(loads["layer"].to_list())):
        sub = loads.filter(loads["layer"] == layer)
        lines.append(f"  layer {layer}: " + ", ".join(f"e{e} ({n})" for e, n in zip(sub["expert"], sub["n"])))
    lines.append("\nanalyses (stored in the store, shown by the dashboard):")
    done = {}
    for name, params in DEMO_ANALYSES:
        if not args.json:
            print(f"analysing: {name} ...", file=sys.stderr, flush=True)
        result = run_analysis(store, name, [run.info], params)
        done[name] = {"result_id": result.info.result_id, "seconds": round(result.info.seconds, 2),
                      "rows": {k: v.height for k, v in result.frames.items()}}
        lines.append(f"  {name:<14} result {result.info.result_id}  ({result.info.seconds:.1f} s)  "
                     f"parts: {', '.join(result.frames)}")
    lines.append(f"\nstore: {args.db}  (try: routelens runs --db {args.db}; routelens app --db {args.db})")
    _emit(args, {"run": run.info, "top_experts": loads.to_dicts(), "analyses": done}, "\n".join(lines))
    return 0


def cmd_app(args) -> int:
    from routelens.app.launch import main as launch

    return launch(args.db, args.port, headless=True, address=args.address)


def cmd_steer(args) -> int:
    """Generate with and without a steering spec, side by side; both runs traced into the store."""
    from .steering import SteeringSpec
    from .steering.experiment import compare
    from .store import Store
    from .tracer.inputs import read_inputs

    spec = SteeringSpec.load(args.spec)  # validate the file and the input before paying for a model load
    records = read_inputs(args.input)
    store = Store.open(args.db)
    model, tokenizer = _load(args)
    result = compare(model, tokenizer, records, spec, store=store, max_new_tokens=args.max_new_tokens,
                     name=args.name or "steer", batch_size=args.batch_size, model_ref=args.model,
                     input_source=str(args.input), backend=args.backend, progress=not args.json)
    lines = [f"base run {result.base_run_id}, steered run {result.steered_run_id} in {args.db}", ""]
    for p in result.prompts:
        lines.append(f"[{p.seq_id}] {p.prompt!r}")
        lines.append(f"    base:    {p.base_text!r}")
        lines.append(f"    steered: {p.steered_text!r}")
        if p.routing_changed is not None:
            lines.append(f"    prompt routing changed: {100 * p.routing_changed:.1f}% of (token, layer) top-k sets")
        if p.delta_ll is not None:
            lines.append(f"    reference log-likelihood: {p.ll_base:.3f} -> {p.ll_steered:.3f} (delta {p.delta_ll:+.3f}, "
                         f"{p.n_reference_tokens} tokens)")
    _emit(args, result, "\n".join(lines))
    return 0


def _analysis_parser(name: str) -> argparse.ArgumentParser:
    """`routelens analyze NAME`: common options plus one option per field of the analysis' parameters."""
    import typing

    from routelens.analyses import get

    analysis = get(name)
    p = argparse.ArgumentParser(prog=f"routelens analyze {name}", description=analysis.summary)
    p.add_argument("--db", required=True, help="store file")
    runs_help = "run id, name or uuid" + ("" if analysis.max_runs == 1 else f" (repeat: {analysis.min_runs}-"
                                                                             f"{analysis.max_runs} runs)")
    p.add_argument("--run", action="append", required=True, help=runs_help)
    p.add_argument("--no-save", action="store_true", help="print without storing the result")
    p.add_argument("--json", action="store_true", help="print the result rows as a JSON list of objects")
    hints = typing.get_type_hints(analysis.params)
    for f in dataclasses.fields(analysis.params):
        hint = hints[f.name]
        opt = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata.get('help', '')} (default: {shown})".strip()
        if hint is bool:
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(opt, dest=f.name, default=None, help=help_, metavar=f.name.upper())
    p.set_defaults(func=cmd_analyze, analysis=name)
    return p


def cmd_analyze(args) -> int:
    import polars as pl

    from routelens.analyses import get
    from routelens.analyses.registry import run_analysis

    from .store import Store

    analysis = get(args.analysis)
    store = Store.open(args.db, create=False)
    runs = [store.run(_run_ref(r)).info for r in args.run]
    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(analysis.params)
              if getattr(args, f.name) is not None}
    result = run_analysis(store, args.analysis, runs, params, save=not args.no_save)
    frame = result.frames[analysis.primary]
    notes = result.frames.get("notes")
    if notes is not None and notes.height:  # e.g. markers absent from the run: said, not hidden
        for row in notes.iter_rows():
            print(f"routelens: note: {' '.join(str(v) for v in row)}", file=sys.stderr)
    if args.json:
        # NaN/inf (e.g. a balance value without logits) become null: JSON has no NaN, and json.dumps would write it
        finite = frame.with_columns(pl.when(pl.col(c).is_finite()).then(pl.col(c)).alias(c)
                                    for c, t in frame.schema.items() if t.is_float())
        print(json.dumps(finite.to_dicts(), default=_json_default, ensure_ascii=False, allow_nan=False))
        return 0
    with pl.Config(tbl_rows=60, tbl_cols=16, fmt_str_lengths=40, tbl_width_chars=160):
        print(frame)
    saved = f"stored as result {result.info.result_id}" if result.info.result_id >= 0 else "not stored (--no-save)"
    print(f"{args.analysis} over run(s) {', '.join(map(str, result.info.run_ids))}: {frame.height} rows, "
          f"{result.info.seconds:.2f} s; {saved}; parts: {', '.join(result.frames)}")
    return 0


def _json_default(obj):
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _run_ref(ref: str):
    return int(ref) if ref.isdigit() else ref


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routelens", description="Trace, analyze and steer MoE routing.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    t = sub.add_parser("trace", help="trace a model's routing over an input file into a store")
    t.add_argument("model", help="local model folder, hub id, or tiny:FAMILY for a random-init tiny model")
    t.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (text, label, lang, align_id)")
    t.add_argument("--db", required=True, help="store file (DuckDB); created if missing")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-tokens", type=int, default=None, help="longest sequence per forward (default: context)")
    t.add_argument("--overflow", choices=["error", "chunk", "truncate"], default="error",
                   help="what to do with texts longer than --max-tokens")
    t.add_argument("--logits", action="store_true", help="also store full router logits (fp16)")
    t.add_argument("--expert-stats", action="store_true", help="record max |down_proj in/out| per expert")
    t.add_argument("--no-residual", action="store_true", help="skip per-layer max |residual| per token")
    t.add_argument("--max-new-tokens", type=int, default=0, help="greedy-generate and trace the decode steps")
    t.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu")
    t.add_argument("--device-map", default=None, help="e.g. auto: spread a big model over GPUs (accelerate)")
    t.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    t.add_argument("--name", default=None)
    t.add_argument("--tag", action="append", help="free-form tag (repeatable)")
    t.add_argument("--shard", type=int, default=0, help="this process's shard index (texts i %% N == shard)")
    t.add_argument("--num-shards", type=int, default=1)
    t.add_argument("--run-uuid", default=None, help="shared id of a run traced as several shards")
    t.add_argument("--no-progress", action="store_true")
    common(t)
    t.set_defaults(func=cmd_trace)

    r = sub.add_parser("runs", help="list the runs in a store")
    r.add_argument("--db", required=True)
    common(r)
    r.set_defaults(func=cmd_runs)

    e = sub.add_parser("export", help="export a run as Parquet (partitioned by run and layer)")
    e.add_argument("run", help="run id, name or uuid")
    e.add_argument("--db", required=True)
    e.add_argument("--parquet", required=True, help="output directory")
    common(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("import", help="import exported runs (shards of one run are merged)")
    i.add_argument("dirs", nargs="+", help="directories written by `routelens export`")
    i.add_argument("--db", required=True)
    common(i)
    i.set_defaults(func=cmd_import)

    d = sub.add_parser("demo", help="the main job on the embedded default model and data")
    d.add_argument("--db", default="routelens-demo.duckdb")
    common(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("steer", help="generate with and without a steering spec, side by side, both traced")
    s.add_argument("model", help="local model folder, hub id, or tiny:FAMILY")
    s.add_argument("--spec", required=True, help="steering spec file (.json or .yaml)")
    s.add_argument("--input", required=True, help=".txt or .jsonl prompts (jsonl: optional `reference` continuation)")
    s.add_argument("--db", required=True, help="store file; both runs are traced into it")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="masked routing: Triton kernel on CUDA (auto) or the PyTorch reference")
    s.add_argument("--name", default=None, help="runs are named NAME-base and NAME-steered")
    s.add_argument("--device", default=None)
    s.add_argument("--device-map", default=None)
    s.add_argument("--dtype", default="auto")
    common(s)
    s.set_defaults(func=cmd_steer)

    ap = sub.add_parser("app", help="open the dashboard over a store (Streamlit, bound to 127.0.0.1)")
    ap.add_argument("--db", default=None, help="store file (default: choose in the app)")
    ap.add_argument("--port", type=int, default=8501)
    ap.add_argument("--address", default="127.0.0.1", help="bind address (default: this machine only)")
    ap.set_defaults(func=cmd_app)

    from routelens.analyses.registry import NAMES

    a = sub.add_parser("analyze", help=f"run an analysis over stored runs: {', '.join(NAMES)} "
                                       "(routelens analyze NAME --help for its parameters)")
    a.add_argument("analysis", choices=NAMES)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) >= 2 and argv[0] == "analyze" and not argv[1].startswith("-"):
            from routelens.analyses.registry import NAMES

            if argv[1] not in NAMES:
                raise RoutelensError(f"unknown analysis {argv[1]!r}; available: {', '.join(NAMES)}")
            args = _analysis_parser(argv[1]).parse_args(argv[2:])
        else:
            args = build_parser().parse_args(argv)
    except RoutelensError as exc:
        print(f"routelens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return args.func(args)
    except RoutelensError as exc:
        print(f"routelens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("routelens: interrupted; the run in progress is left marked incomplete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
