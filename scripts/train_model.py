#!/usr/bin/env python
"""Train the routelens model organism: a small Qwen3-MoE language model on the corpus in ``data/corpus``.

    python scripts/train_model.py --out OUT            # CUDA, bf16 autocast (one H100: ~4 min); writes OUT/model
    python scripts/train_model.py --out OUT --smoke    # 6 steps of a tiny config on CPU (tests), ~10 s

Needs only torch, transformers (>= 5.15; tested with 5.17 and 5.23), tokenizers, safetensors and numpy.

Recipe (the defaults; ``--balance-coef 0`` is the recipe of the first trained model, which predates the per-layer
balance term):

* Model: ``Qwen3MoeForCausalLM`` built from a config: 8 layers, hidden 256, 4 query heads of 64 (2 KV heads),
  32 experts per layer, top-4 (renormalized, as in Qwen3), expert width 40, tied embeddings, vocabulary 6,144
  (``data/model/tokenizer.json``, made by ``scripts/train_tokenizer.py``): 11,080,960 parameters, 22.3 MB in bf16.
* Data: the TRAIN splits only (held-out files are never opened). 2 % of the train align_ids
  (``sha1("routelens-dev:" + align_id) % 50 == 0``) are a dev set for checkpoint selection. Items are encoded
  without specials; a sequence is ``<s> item </s> item </s> ...`` (512 tokens) holding items of ONE language, or
  only reasoning traces, packed first-fit (32-item lookahead) without splitting an item and padded at the end
  (padding is never attended to by real tokens under the causal mask, and its labels are -100). Items and
  sequences are reshuffled every epoch with a seeded generator. ~5.84 M tokens per epoch.
* Loss: the model's own ``out.loss`` (next-token cross-entropy + ``router_aux_loss_coef`` 0.01 x
  ``out.aux_loss``, transformers' load-balancing loss; the sum is checked numerically at step 0)
  + 0.01 x the Switch load-balancing loss of EACH MoE layer (transformers' version pools all layers' counts
  before multiplying, so one layer's busy expert e offsets another layer's idle expert e and single layers may
  starve experts: the model trained without this term reads 4.002 on the pooled loss (4 = even) on packed dev
  windows while 8-12 of its 32 experts per layer get < 10 % of an even share; in a CPU proxy, the term took the
  starved experts from 6-9 of 16 per layer to 0-1 at nearly the same held-out perplexity)
  + 1e-3 x router z-loss (mean logsumexp(router logits)^2 over all positions).
* Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr 2e-3, 150 warmup steps, cosine decay
  to 10 %, grad-norm clip 1.0, bf16 autocast over fp32 master weights, 64 x 512 tokens per step, 16 epochs
  (2,944 steps; 227 s of training on one H100 at ~430k tokens/s, dev loss still falling at the end);
  training-only dropout 0.1 on every attention and MoE block output (forward hooks, removed before saving).
  The schedule runs on ``progress = max(step / total_steps, train_seconds / time_budget)``: on a fast enough GPU
  it is the plain seeded step schedule; on a slower one it still decays fully before ``--max-minutes``, where
  training stops (and still saves).
* Checkpoint: the weights with the lowest dev criterion (mean of the parallel and the reasoning dev loss; every
  ``--eval-every`` steps and at the end), saved in bf16 with ``save_pretrained(max_shard_size="15MB")``, with the
  tokenizer files and ``generation_config.json``. The config is saved with ``output_router_logits`` false.

Outputs: ``OUT/model/``, ``OUT/train_log.txt`` (every printed line; a step line has lm loss, the model's aux
loss (= top-k when balanced), the per-layer balance loss (1 = balanced), the busiest expert's share x E over the
worst layer, z-loss, grad norm, lr and tokens/s), ``OUT/train_summary.json``.

On CUDA the experts run in bf16 through ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older
torch) via a small registered experts function (``--experts-impl bf16_grouped``, same math as transformers'
``grouped_mm`` path): transformers' own ``grouped_mm`` casts the activations to the fp32 master weights, and fp32
grouped GEMMs are off the fast path. If it raises on the first step, the run falls back to ``eager`` and logs a
WARNING. The saved config names no experts implementation (loads with the transformers default).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
TOKENIZER_DIR = ROOT / "data" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LANGS = ("en", "de", "fr", "es", "pt", "ru", "zh", "ja", "ko", "ar", "hi", "bn", "tr", "vi", "sw", "yo", "am",
         "is", "ga", "cy")
REASONING = "reasoning"
BF16_EXPERTS = "bf16_grouped"


# ----------------------------------------------------------------------------------------------------------------
# Architecture


@dataclass
class Arch:
    vocab_size: int = 6144
    hidden_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 40  # a multiple of 8: grouped_mm needs 16-byte aligned rows in bf16
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    initializer_range: float = 0.02


SMOKE_ARCH = Arch(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, max_position_embeddings=256)


def make_config(arch: Arch):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=4 * arch.hidden_size,  # unused: every layer is an MoE layer
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=arch.initializer_range,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        attention_bias=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=arch.moe_intermediate_size,
        num_experts=arch.num_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        norm_topk_prob=True,
        output_router_logits=False,  # switched on per call while training
        router_aux_loss_coef=arch.router_aux_loss_coef,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_model(config, seed: int):
    """The random-init model of ``config`` (deterministic in ``seed``), float32 on CPU."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def count_params(model) -> int:
    # tied embeddings are one tensor: parameters() yields it once
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# bf16 grouped-GEMM experts (training on CUDA)


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def bf16_grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same math as transformers' ``grouped_mm_experts_forward`` for Qwen3-MoE experts (gate|up concatenated,
    weights stored (E, out, in), no bias), with the GEMMs in bf16 whatever the master-weight dtype."""
    gmm = _grouped_mm_fn()
    num_tokens, hidden_dim = hidden_states.shape
    k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden_states[perm // k].to(torch.bfloat16)
    hist_in = expert_ids_g.int() if expert_ids_g.is_cuda else expert_ids_g.float()
    counts = torch.histc(hist_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    w_gate_up = self.gate_up_proj.to(torch.bfloat16).transpose(-2, -1)  # (E, H, 2I)
    w_down = self.down_proj.to(torch.bfloat16).transpose(-2, -1)  # (E, I, H)
    h = gmm(x, w_gate_up, offs=offs)
    gate, up = h.chunk(2, dim=-1)
    h = (self.act_fn(gate) * up).contiguous()
    y = gmm(h, w_down, offs=offs).float()
    y = y * top_k_weights.reshape(-1)[perm].float().unsqueeze(-1)
    out = torch.empty_like(y)
    out[perm] = y
    return out.view(num_tokens, k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def register_bf16_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(BF16_EXPERTS, bf16_grouped_experts_forward)


def set_experts_impl(model, impl: str) -> None:
    if impl == BF16_EXPERTS:
        register_bf16_experts()
    model.set_experts_implementation(impl)


# ----------------------------------------------------------------------------------------------------------------
# Data


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def is_dev(align_id: str) -> bool:
    return int(hashlib.sha1(("routelens-dev:" + align_id).encode()).hexdigest(), 16) % 50 == 0


def load_tokenizer(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>")] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def encode_items(tok, rows: list[dict]) -> list[np.ndarray]:
    encs = tok.encode_batch([r["text"] for r in rows], add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]


def group_key(row: dict) -> str:
    return row.get("lang") if row.get("label", "parallel") != REASONING else REASONING


def pack(items: list[np.ndarray], seq_len: int, lookahead: int = 32) -> list[np.ndarray]:
    """Pack one group's items into ``<s> a </s> b </s> ...`` windows of at most ``seq_len`` tokens, in the given
    order except that when the next item does not fit, the first of the following ``lookahead`` items that does
    fit goes in instead (first fit); an item never straddles two windows (one longer than ``seq_len - 2`` is cut)."""
    windows: list[np.ndarray] = []
    bos, eos = np.array([BOS_ID], dtype=np.int32), np.array([EOS_ID], dtype=np.int32)
    cur: list[np.ndarray] = [bos]
    cur_len = 1
    buf: list[np.ndarray] = []
    pos = 0
    while True:
        while len(buf) < lookahead and pos < len(items):
            buf.append(items[pos][: seq_len - 2])
            pos += 1
        if not buf:
            break
        j = next((j for j, ids in enumerate(buf) if cur_len + len(ids) + 1 <= seq_len), None)
        if j is None:  # nothing fits: close the window (it holds at least one item, as every item fits alone)
            windows.append(np.concatenate(cur))
            cur, cur_len = [bos], 1
            continue
        ids = buf.pop(j)
        cur += [ids, eos]
        cur_len += len(ids) + 1
    if cur_len > 1:
        windows.append(np.concatenate(cur))
    return windows


def to_batch(windows: list[np.ndarray], seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on padding)."""
    n = seq_len or max(len(w) for w in windows)
    ids = np.full((len(windows), n), PAD_ID, dtype=np.int64)
    labels = np.full((len(windows), n), -100, dtype=np.int64)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = w
        labels[i, : len(w)] = w
    return torch.from_numpy(ids), torch.from_numpy(labels)


def epoch_windows(groups: dict[str, list[np.ndarray]], seq_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch: every item once, shuffled inside its group, packed, then all windows shuffled."""
    windows: list[np.ndarray] = []
    for key in sorted(groups):
        items = groups[key]
        order = rng.permutation(len(items))
        windows.extend(pack([items[i] for i in order], seq_len))
    order = rng.permutation(len(windows))
    return [windows[i] for i in order]


def in_fraction(align_id: str, fraction: float) -> bool:
    if fraction >= 1.0:
        return True
    return int(hashlib.sha1(("routelens-subset:" + align_id).encode()).hexdigest(), 16) % 10_000 < fraction * 10_000


def load_train_data(corpus: Path, tok, smoke: bool, fraction: float = 1.0) -> tuple[dict, dict, dict]:
    """(train groups, dev groups, counts). Only the *.train splits are read."""
    parallel = read_jsonl_gz(corpus / "parallel.train.jsonl.gz")
    reasoning = read_jsonl_gz(corpus / "reasoning.train.jsonl.gz")
    if smoke:  # a few items of every language
        seen: dict[str, int] = {}
        small = []
        for r in parallel:
            if seen.get(r["lang"], 0) < 40:
                seen[r["lang"]] = seen.get(r["lang"], 0) + 1
                small.append(r)
        parallel, reasoning = small, reasoning[:100]
    rows = parallel + reasoning
    encoded = encode_items(tok, rows)
    train: dict[str, list[np.ndarray]] = {}
    dev: dict[str, list[np.ndarray]] = {}
    for row, ids in zip(rows, encoded):
        if len(ids) == 0:
            continue
        if is_dev(row["align_id"]):
            target = dev
        elif in_fraction(row["align_id"], fraction):
            target = train
        else:
            continue
        target.setdefault(group_key(row), []).append(ids)
    counts = {
        "train_items": sum(len(v) for v in train.values()),
        "dev_items": sum(len(v) for v in dev.values()),
        "train_tokens_with_eos": int(sum(len(x) + 1 for v in train.values() for x in v)),
        "dev_tokens_with_eos": int(sum(len(x) + 1 for v in dev.values() for x in v)),
        "train_tokens_per_group": {k: int(sum(len(x) + 1 for x in v)) for k, v in sorted(train.items())},
    }
    return train, dev, counts


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainArgs:
    out: str
    seed: int = 0
    smoke: bool = False
    epochs: float = 16.0
    steps: int = 0  # 0: from --epochs
    batch_size: int = 64  # sequences per step
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    z_coef: float = 1e-3
    balance_coef: float = 0.01  # per MoE layer (Switch), on top of the model's own aux loss
    eval_every: int = 200
    log_every: int = 20
    max_minutes: float = 5.5
    dropout: float = 0.1
    data_fraction: float = 1.0
    device: str = "auto"
    experts_impl: str = "auto"
    threads: int = 0
    corpus: str = str(CORPUS)
    tokenizer: str = str(TOKENIZER_DIR)
    arch: dict = field(default_factory=dict)


class Logger:
    def __init__(self, path: Path):
        self.f = open(path, "w", encoding="utf-8")

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def lr_at(progress: float, step: int, a: TrainArgs) -> float:
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def add_dropout_hooks(model, p: float) -> list:
    """Training-only residual dropout: forward hooks on every layer's attention and MoE block outputs (the saved
    architecture is untouched; hooks do nothing in eval mode and are removed before saving)."""

    def on_attn(module, args, output):
        return (F.dropout(output[0], p, module.training),) + tuple(output[1:])

    def on_mlp(module, args, output):
        return F.dropout(output, p, module.training)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(on_attn))
        handles.append(layer.mlp.register_forward_hook(on_mlp))
    return handles


def router_losses(router_logits, ids: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-layer load-balancing loss averaged over layers, router z-loss, max over layers of the busiest
    expert's share of top-k assignments x E).

    transformers' ``load_balancing_loss_func`` (``out.aux_loss``) pools the assignment counts and router
    probabilities of all layers before multiplying them, so expert e of one layer can offset expert e of another
    and a single layer can stay unbalanced; the per-layer term here is the Switch loss of each layer on its own
    over the non-padding tokens (1.0 = perfectly balanced). The z-loss is the mean over all positions, padding
    included (as in the first trained model)."""
    m = (ids != PAD_ID).reshape(-1).float()
    n = m.sum().clamp(min=1.0)
    m_k = m.repeat_interleave(top_k)
    bal, z, maxload = [], [], []
    for lg in router_logits:
        lg = lg.float()
        p = torch.softmax(lg, dim=-1)
        E = p.shape[-1]
        idx = torch.topk(p, top_k, dim=-1).indices.reshape(-1)
        f = torch.zeros(E, device=p.device).scatter_add_(0, idx, m_k) / (n * top_k)
        P = (p * m[:, None]).sum(dim=0) / n
        bal.append(E * (f * P).sum())
        z.append(torch.logsumexp(lg, dim=-1).pow(2).mean())
        maxload.append(f.max().detach() * E)
    return torch.stack(bal).mean(), torch.stack(z).mean(), torch.stack(maxload).max()


def forward_backward(model, ids, labels, a, autocast):
    with autocast():
        outputs = model(input_ids=ids, labels=labels, output_router_logits=True)
        bal, zl, maxload = router_losses(outputs.router_logits, ids, model.config.num_experts_per_tok)
        n_moe = len(outputs.router_logits)
        loss = outputs.loss + a.balance_coef * n_moe * bal + a.z_coef * zl
    loss.backward()
    return outputs, zl, bal, maxload


@torch.no_grad()
def dev_loss(model, dev_sets: dict[str, list[np.ndarray]], device, batch_size: int, seq_len: int,
             autocast) -> dict[str, float]:
    """Mean next-token loss on the dev windows of each kind ("parallel", "reasoning") and the selection
    criterion: the mean of the two (so neither kind dominates by token count)."""
    model.eval()
    res = {}
    for kind, windows in dev_sets.items():
        total, n = 0.0, 0
        for i in range(0, len(windows), batch_size):
            ids, labels = to_batch(windows[i: i + batch_size], seq_len)
            ids, labels = ids.to(device), labels.to(device)
            with autocast():
                logits = model(input_ids=ids).logits
            lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
            total += lp.item()
            n += int((labels[:, 1:] != -100).sum())
        res[kind] = total / max(n, 1)
    res["criterion"] = sum(res[k] for k in dev_sets) / len(dev_sets)
    model.train()
    return res


def train(a: TrainArgs) -> dict:
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train_log.txt")
    deadline = t_start + a.max_minutes * 60.0
    save_reserve = 15.0 if not a.smoke else 0.0

    import transformers

    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    else:
        device = torch.device(a.device)
    use_cuda = device.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    np_rng = np.random.default_rng(a.seed)

    arch = SMOKE_ARCH if a.smoke else Arch()
    arch = Arch(**{**asdict(arch), **a.arch})
    arch.router_aux_loss_coef = a.aux_coef
    log(f"routelens model organism | torch {torch.__version__} transformers {transformers.__version__} "
        f"| device {device}{' ' + torch.cuda.get_device_name(device) if use_cuda else ''} | seed {a.seed}")
    log(f"args: {json.dumps({k: v for k, v in asdict(a).items()}, sort_keys=True)}")

    tok = load_tokenizer(Path(a.tokenizer))
    arch.vocab_size = tok.get_vocab_size()
    train_groups, dev_groups, counts = load_train_data(Path(a.corpus), tok, a.smoke, a.data_fraction)
    dev_sets = {
        "parallel": [w for k in sorted(dev_groups) if k != REASONING for w in pack(dev_groups[k], a.seq_len)],
        "reasoning": pack(dev_groups.get(REASONING, []), a.seq_len),
    }
    dev_sets = {k: v for k, v in dev_sets.items() if v}
    dev_windows = [w for v in dev_sets.values() for w in v]
    log(f"data: {counts['train_items']} train items ({counts['train_tokens_with_eos']} tokens incl. </s>), "
        f"{counts['dev_items']} dev items, {len(dev_windows)} dev windows; groups: "
        + " ".join(f"{k}={v}" for k, v in counts["train_tokens_per_group"].items()))

    config = make_config(arch)
    model = build_model(config, a.seed)
    n_params = count_params(model)
    log(f"arch: {json.dumps(asdict(arch), sort_keys=True)}")
    log(f"params: {n_params:,} ({n_params * 2 / 1e6:.1f} MB in bf16)")
    model.to(device)
    model.train()

    dropout_hooks = add_dropout_hooks(model, a.dropout) if a.dropout > 0 else []

    impl = a.experts_impl
    if impl == "auto":
        impl = BF16_EXPERTS if use_cuda and _grouped_mm_fn() is not None else "grouped_mm"
    set_experts_impl(model, impl)
    log(f"experts implementation (training only): {impl}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt_kwargs = dict(lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    if use_cuda:
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)

    def autocast():
        if use_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    first_epoch = epoch_windows(train_groups, a.seq_len, np_rng)
    steps_per_epoch = max(1, len(first_epoch) // a.batch_size)
    total_steps = a.steps or max(1, int(round(a.epochs * steps_per_epoch)))
    fill = sum(len(w) for w in first_epoch) / (len(first_epoch) * a.seq_len)
    log(f"schedule: {len(first_epoch)} windows/epoch of {a.seq_len} tokens ({fill:.1%} filled), batch "
        f"{a.batch_size} -> {steps_per_epoch} steps/epoch, {total_steps} steps ({total_steps / steps_per_epoch:.2f} "
        f"epochs), warmup {a.warmup_steps}, peak lr {a.lr}, budget {a.max_minutes} min")

    pending = first_epoch
    epoch = 0

    def next_batch():
        nonlocal pending, epoch
        if len(pending) < a.batch_size:
            pending = pending + epoch_windows(train_groups, a.seq_len, np_rng)
            epoch += 1
        batch, pending = pending[: a.batch_size], pending[a.batch_size:]
        return to_batch(batch, a.seq_len)

    best = {"dev_loss": float("inf"), "step": -1, "state": None}
    history: list[dict] = []

    def evaluate(step: int) -> float:
        d = dev_loss(model, dev_sets, device, 2 * a.batch_size, a.seq_len, autocast)
        dl = d["criterion"]
        improved = dl < best["dev_loss"]
        if improved:
            best.update(dev_loss=dl, step=step,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        history.append({"step": step, **d})
        log(f"eval step {step:6d} | dev " + " | ".join(f"{k} {v:.4f}" for k, v in d.items() if k != "criterion")
            + f" | criterion {dl:.4f}{' *best*' if improved else ''}")
        return dl

    t_train = time.time()
    budget = max(1.0, deadline - save_reserve - t_train)
    tokens_seen = 0
    step = 0
    win_tokens, win_time = 0, time.time()
    stop_reason = "steps"
    last: dict = {}
    while step < total_steps:
        if time.time() - t_train > budget:
            stop_reason = "time"
            break
        ids, labels = next_batch()
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        progress = max(step / total_steps, (time.time() - t_train) / budget)
        lr = lr_at(progress, step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            outputs, zl, bal, maxload = forward_backward(model, ids, labels, a, autocast)
        except Exception as exc:  # the bf16 grouped GEMM path is new: fall back once, loudly
            if step == 0 and impl != "eager":
                log(f"WARNING: experts implementation {impl} failed on step 0 ({str(exc).splitlines()[0][:200]}); "
                    "falling back to eager")
                opt.zero_grad(set_to_none=True)
                impl = "eager"
                set_experts_impl(model, impl)
                outputs, zl, bal, maxload = forward_backward(model, ids, labels, a, autocast)
            else:
                raise
        aux = outputs.aux_loss.detach().float()
        lm = outputs.loss.detach().float() - a.aux_coef * aux
        if step == 0:  # the model's loss must be CE + coef * aux (transformers 5.x MoE contract)
            with torch.no_grad():
                ce = F.cross_entropy(outputs.logits[:, :-1].float().reshape(-1, outputs.logits.shape[-1]),
                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            gap = abs(float(outputs.loss.detach()) - (float(ce) + a.aux_coef * float(aux)))
            log(f"check: out.loss {float(outputs.loss.detach()):.5f} = CE {float(ce):.5f} + {a.aux_coef} x aux "
                f"{float(aux):.5f} (gap {gap:.2e})")
            if gap > 2e-2:
                raise SystemExit("out.loss does not include the router aux loss as expected; stopping")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tok = int((labels != -100).sum())
        tokens_seen += n_tok
        win_tokens += n_tok
        step += 1
        if step % a.log_every == 0 or step == 1 or step == total_steps:
            lm_v, aux_v, z_v, g_v = float(lm), float(aux), float(zl.detach()), float(gnorm)
            bal_v, ml_v = float(bal.detach()), float(maxload)
            if use_cuda:
                torch.cuda.synchronize()
            now = time.time()
            tps = win_tokens / max(now - win_time, 1e-9)
            win_tokens, win_time = 0, now
            last = {"step": step, "lm_loss": lm_v, "aux_loss": aux_v, "layer_balance": bal_v, "z_loss": z_v,
                    "max_load_x_E": ml_v}
            log(f"step {step:6d}/{total_steps} | ep {tokens_seen / counts['train_tokens_with_eos']:5.2f} | lm {lm_v:.4f} "
                f"| aux {aux_v:.4f} | bal {bal_v:.4f} | maxload {ml_v:.2f} | z {z_v:.3f} | gnorm {g_v:.2f} | lr {lr:.2e} | {tps / 1e3:8.1f}k tok/s "
                f"| {now - t_start:6.1f}s")
            if not math.isfinite(lm_v):
                raise SystemExit("loss is not finite; stopping")
        if a.eval_every and step % a.eval_every == 0 and step < total_steps:
            evaluate(step)
    train_seconds = time.time() - t_train
    final_dev = evaluate(step)
    log(f"stopped after {step} steps ({stop_reason}); {tokens_seen:,} tokens "
        f"({tokens_seen / counts['train_tokens_with_eos']:.2f} epochs) in {train_seconds:.1f}s; "
        f"best dev criterion {best['dev_loss']:.4f} at step {best['step']} (final {final_dev:.4f})")

    # ---- save the best weights in bf16
    for h in dropout_hooks:
        h.remove()
    model.load_state_dict(best["state"])
    model.to("cpu")
    model.set_experts_implementation("grouped_mm" if impl != "eager" else "eager")
    model.config._experts_implementation = None
    model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.eval()
    mdir = out / "model"
    if mdir.exists():
        shutil.rmtree(mdir)
    model.save_pretrained(str(mdir), max_shard_size="15MB")
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(a.tokenizer) / name, mdir / name)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
                     max_new_tokens=128).save_pretrained(str(mdir))
    sizes = {p.name: p.stat().st_size for p in sorted(mdir.glob("*.safetensors"))}
    total_bytes = sum(sizes.values())
    log(f"saved {mdir}: {len(sizes)} safetensors file(s), {total_bytes / 1e6:.2f} MB "
        f"({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sizes.items())})")
    summary = {
        "args": asdict(a),
        "arch": asdict(arch),
        "params": n_params,
        "safetensors_bytes": total_bytes,
        "data": counts,
        "steps": step,
        "total_steps_planned": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "stop_reason": stop_reason,
        "tokens_seen": tokens_seen,
        "epochs_seen": tokens_seen / counts["train_tokens_with_eos"],
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t_start,
        "experts_impl": impl,
        "best_step": best["step"],
        "best_dev_loss": best["dev_loss"],
        "final_dev_loss": final_dev,
        "last_log": last,
        "dev_history": history,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"done in {time.time() - t_start:.1f}s")
    return summary


SMOKE_DEFAULTS = dict(batch_size=8, seq_len=128, warmup_steps=2, eval_every=3, log_every=1, steps=6, threads=1)


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    d = TrainArgs(out="")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder: OUT/model, OUT/train_log.txt, OUT/train_summary.json")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU test: tiny config, 40 items per language, 6 steps of 8 x 128 tokens")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--epochs", type=float, default=d.epochs, help="passes over the train items (sets the steps)")
    ap.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default {d.batch_size})")
    ap.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {d.seq_len})")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    ap.add_argument("--warmup-steps", type=int, default=None, help=f"default {d.warmup_steps}")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--dropout", type=float, default=d.dropout,
                    help="training-only dropout on each attention and MoE output (forward hooks)")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip)
    ap.add_argument("--aux-coef", type=float, default=d.aux_coef, help="router_aux_loss_coef (load balancing)")
    ap.add_argument("--z-coef", type=float, default=d.z_coef, help="router z-loss coefficient")
    ap.add_argument("--balance-coef", type=float, default=d.balance_coef,
                    help="per-layer Switch load-balancing loss coefficient, per MoE layer (0 = off)")
    ap.add_argument("--eval-every", type=int, default=None, help=f"steps between dev evaluations (default {d.eval_every})")
    ap.add_argument("--log-every", type=int, default=None, help=f"default {d.log_every}")
    ap.add_argument("--max-minutes", type=float, default=d.max_minutes,
                    help="wall-clock budget from start to saved model; training stops early (still saving)")
    ap.add_argument("--data-fraction", type=float, default=d.data_fraction,
                    help="train on this fraction of the train align_ids (hash-chosen; for quick experiments)")
    ap.add_argument("--device", default=d.device, help="auto (cuda if available, cpu for --smoke), cuda, cpu")
    ap.add_argument("--experts-impl", default=d.experts_impl,
                    choices=["auto", BF16_EXPERTS, "grouped_mm", "batched_mm", "eager"],
                    help=f"training only; auto = {BF16_EXPERTS} on CUDA, grouped_mm on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: torch default; 1 for --smoke)")
    ap.add_argument("--corpus", default=d.corpus)
    ap.add_argument("--tokenizer", default=d.tokenizer)
    ap.add_argument("--arch", default="{}", help='JSON overrides of the architecture, e.g. \'{"num_experts": 16}\'')
    kw = vars(ap.parse_args(argv))
    kw["arch"] = json.loads(kw["arch"])
    for key, value in list(kw.items()):
        if value is None:
            kw[key] = SMOKE_DEFAULTS[key] if kw["smoke"] and key in SMOKE_DEFAULTS else getattr(d, key)
    return TrainArgs(**kw)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    a = parse_args(argv)
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
