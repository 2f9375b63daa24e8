#!/usr/bin/env python
"""Train the byte-level BPE tokenizer of the routelens model organism and save it into ``data/model/``.

    .venv/bin/python scripts/train_tokenizer.py            # writes data/model/tokenizer.json (+ configs)
    .venv/bin/python scripts/train_tokenizer.py --check    # retrain into a temp dir, compare with data/model

* Trained on the TRAIN splits only (``parallel.train`` + ``reasoning.train``); no held-out text is seen.
* Byte-level BPE (``tokenizers``), vocabulary 6,144 including 5 special tokens at ids 0..4:
  ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<think>`` 3, ``</think>`` 4. The think markers are single tokens that are
  matched in raw text (like Qwen3's, they are *added* tokens that are not "special": ``decode(...,
  skip_special_tokens=True)`` keeps them, so reasoning traces decode as written).
* Pre-tokenization: a Qwen2-style split regex that keeps letters together with their combining marks
  (``[\\p{L}\\p{M}]+``, so Hindi/Bengali vowel signs stay inside words) and splits every digit on its own (good for
  the arithmetic traces), then the GPT-2 byte-to-unicode mapping. No normalizer: every UTF-8 string round-trips
  byte for byte.
* Encoding prepends ``<s>`` (TemplateProcessing); ``</s>`` is the separator/end token used in training.

Deterministic: the input order is the file order and the BPE trainer breaks ties deterministically; ``--check``
verifies that a rebuild is identical to the committed file.
"""
from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
DEFAULT_OUT = ROOT / "data" / "model"

VOCAB_SIZE = 6144
SPECIALS = ["<pad>", "<s>", "</s>", "<think>", "</think>"]  # ids 0..4
PAD, BOS, EOS, THINK, END_THINK = SPECIALS
MODEL_MAX_LENGTH = 1024  # = max_position_embeddings of the model
# Qwen2's pre-tokenizer regex with \p{M} added next to \p{L} (marks stay inside words).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def read_texts(corpus: Path) -> list[str]:
    texts: list[str] = []
    for name in ("parallel.train.jsonl.gz", "reasoning.train.jsonl.gz"):
        with gzip.open(corpus / name, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def build(corpus: Path, out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(corpus), trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS))), "specials must be ids 0..4"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    # <think>/</think>: keep them as (non-special) added tokens so that skip_special_tokens keeps them.
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        if entry["content"] in (THINK, END_THINK):
            entry["special"] = False
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",  # batched greedy generation
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # save_pretrained of transformers 5.x writes tokenizer.json + tokenizer_config.json; older versions also expect
    # special_tokens_map.json, which we write ourselves so both read it the same way.
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n", encoding="utf-8"
    )
    # Verify what was saved.
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == vocab_size, (len(loaded), vocab_size)
    for s in (THINK, END_THINK):
        assert len(loaded.encode(s, add_special_tokens=False)) == 1, s
    ids = loaded.encode("Hello")
    assert ids[0] == loaded.bos_token_id == 1, ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with --out")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(args.corpus, Path(tmp), args.vocab_size)
            names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
            _, mismatch, errors = filecmp.cmpfiles(args.out, tmp, names, shallow=False)
            if mismatch or errors:
                print(f"tokenizer differs from {args.out}: {mismatch + errors}", file=sys.stderr)
                return 1
        print(f"tokenizer in {args.out} reproduced byte for byte")
        return 0
    build(args.corpus, args.out, args.vocab_size)
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(args.out / "tokenizer.json")).get_vocab_size()
    print(f"wrote {args.out}/tokenizer.json (vocab {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
