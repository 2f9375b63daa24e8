"""Checks of the committed corpus in data/corpus (built by scripts/build_corpus.py). Fast: reads files only.

The reasoning answers are re-derived here from the question text alone, independently of
scripts/make_reasoning.py.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter, defaultdict
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
FILES = ["parallel.train.jsonl", "parallel.heldout.jsonl", "reasoning.train.jsonl", "reasoning.heldout.jsonl",
         "demo.jsonl"]
STORED = {n: (n if n == "demo.jsonl" else n + ".gz") for n in FILES}  # the big splits are stored gzipped
REQUIRED_LANGS = ["en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi", "sw"]
MARKERS = ["Wait", "Alternatively", "So", "Hmm", "Let me check"]


def _read(name: str) -> list[dict]:
    opener = gzip.open if STORED[name].endswith(".gz") else open
    with opener(CORPUS / STORED[name], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict]]:
    missing = [n for n in [*STORED.values(), "stats.json"] if not (CORPUS / n).exists()]
    if missing:
        pytest.fail(f"missing corpus files {missing}: run python scripts/build_corpus.py")
    return {n: _read(n) for n in FILES}


def test_fields_and_types(corpus):
    for name in ("parallel.train.jsonl", "parallel.heldout.jsonl"):
        for r in corpus[name]:
            assert set(r) == {"text", "lang", "align_id", "source"}, r
            assert r["text"] and r["text"] == r["text"].strip() and isinstance(r["lang"], str)
            assert r["align_id"].startswith("p:") and len(r["align_id"]) == 14
    for name in ("reasoning.train.jsonl", "reasoning.heldout.jsonl"):
        for r in corpus[name]:
            assert {"text", "label", "align_id"} <= set(r) and r["label"] == "reasoning"
            assert r["align_id"].startswith("r:")
    for r in corpus["demo.jsonl"]:
        assert set(r) == {"text", "lang", "align_id", "label"}


def test_sorted_and_unique(corpus):
    for name in ("parallel.train.jsonl", "parallel.heldout.jsonl"):
        keys = [(r["align_id"], r["lang"]) for r in corpus[name]]
        assert keys == sorted(keys), f"{name} is not sorted by (align_id, lang)"
        assert len(keys) == len(set(keys)), f"{name} has duplicate (align_id, lang)"


def test_languages_with_1000_aligned_items(corpus):
    rows = corpus["parallel.train.jsonl"] + corpus["parallel.heldout.jsonl"]
    en_ids = {r["align_id"] for r in rows if r["lang"] == "en"}
    aligned = Counter(r["lang"] for r in rows if r["lang"] != "en" and r["align_id"] in en_ids)
    # every translation has its English source
    assert sum(aligned.values()) == sum(1 for r in rows if r["lang"] != "en")
    big = sorted(lang for lang, n in aligned.items() if n >= 1000)
    assert len(big) >= 12, aligned
    for lang in REQUIRED_LANGS[1:]:
        assert aligned[lang] >= 1000, (lang, aligned[lang])
    assert len(en_ids) >= 1000


def test_heldout_never_in_train(corpus):
    for kind in ("parallel", "reasoning"):
        train = corpus[f"{kind}.train.jsonl"]
        held = corpus[f"{kind}.heldout.jsonl"]
        assert held, kind
        assert not ({r["align_id"] for r in train} & {r["align_id"] for r in held}), kind
        held_texts = {(r.get("lang"), r["text"]) for r in held}
        assert not any((r.get("lang"), r["text"]) in held_texts for r in train), kind
    # the same ids are held out in every language: an id is held out or not, whatever the language
    par_held = {r["align_id"] for r in corpus["parallel.heldout.jsonl"]}
    n_ids = len(par_held | {r["align_id"] for r in corpus["parallel.train.jsonl"]})
    assert 0.07 < len(par_held) / n_ids < 0.13


def test_no_placeholder_or_markup_residue(corpus):
    bad = re.compile(r"%\(|%s|%d|%\d|\{\d*\}|\{\w+\}|<[a-z/][^>]*>|&amp;|&lt;|&gt;|&quot;|\\n|\x00|\x01")
    for name in ("parallel.train.jsonl", "parallel.heldout.jsonl", "demo.jsonl"):
        for r in corpus[name]:
            if r.get("label") == "reasoning":
                continue
            assert not bad.search(r["text"]), (name, r)
            assert "_" not in r["text"], (name, r)  # mnemonics are stripped


def test_stats_match_files(corpus):
    stats = json.loads((CORPUS / "stats.json").read_text(encoding="utf-8"))
    for name in FILES:
        assert stats["files"][STORED[name]]["lines"] == len(corpus[name]), name
    langs = stats["parallel"]["languages"]
    for lang, v in langs.items():
        n_tr = sum(r["lang"] == lang for r in corpus["parallel.train.jsonl"])
        n_he = sum(r["lang"] == lang for r in corpus["parallel.heldout.jsonl"])
        assert (v["train"], v["heldout"]) == (n_tr, n_he), lang


def test_demo(corpus):
    demo = corpus["demo.jsonl"]
    par = [r for r in demo if r["label"] == "parallel"]
    rea = [r for r in demo if r["label"] == "reasoning"]
    assert 150 <= len(demo) <= 260 and 30 <= len(rea) <= 60
    by_id = defaultdict(set)
    for r in par:
        by_id[r["align_id"]].add(r["lang"])
    assert len(by_id) >= 10
    langs = set.intersection(*by_id.values())
    assert len(langs) >= 10 and set(REQUIRED_LANGS) <= langs
    held = {r["align_id"] for r in corpus["parallel.heldout.jsonl"]}
    assert set(by_id) <= held  # the demo's parallel items are never trained on


# ------------------------------------------------------------------------------- reasoning answers
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FACTORS = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
           ("liters", "milliliters"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
           ("days", "hours"): 24, ("weeks", "days"): 7, ("feet", "inches"): 12, ("yards", "feet"): 3,
           ("inches", "centimeters"): Decimal("2.54"), ("meters", "millimeters"): 1000}
TIMES = {"twice": 2, "three times": 3, "four times": 4, "five times": 5, "six times": 6}
ORDER_WORDS = {"taller": 1, "shorter": -1, "older": 1, "younger": -1, "faster": 1, "slower": -1,
               "heavier": 1, "lighter": -1}
SUPERLATIVE = {"tallest": 1, "oldest": 1, "fastest": 1, "heaviest": 1,
               "shortest": -1, "youngest": -1, "slowest": -1, "lightest": -1}
STOP = {"the", "a", "it", "is", "was", "did", "does", "not", "she", "he", "of", "do"}


def _dec(s: str) -> Decimal:
    return Decimal(s)


def _stems(clause: str) -> set[str]:
    return {w[:4] for w in re.findall(r"[a-z0-9]+", clause.lower()) if w not in STOP}


def solve(q: str) -> str:
    """Re-derive the expected answer from the question text."""
    if m := re.fullmatch(r"Compute (\d+) × (\d+) ([+-]) (\d+)\.", q):
        a, b, op, c = int(m[1]), int(m[2]), m[3], int(m[4])
        return str(a * b + c if op == "+" else a * b - c)
    if m := re.fullmatch(r"What is \((\d+) \+ (\d+)\) × (\d+) - (\d+)\?", q):
        return str((int(m[1]) + int(m[2])) * int(m[3]) - int(m[4]))
    if m := re.fullmatch(r"Divide (\d+) by (\d+)\. What are the quotient and the remainder\?", q):
        qq, rr = divmod(int(m[1]), int(m[2]))
        return f"quotient {qq}, remainder {rr}"
    if m := re.fullmatch(r"What is ([\d.]+)% of (\d+)\?", q):
        return str(_dec(m[1]) * int(m[2]) / 100)
    if m := re.search(r"buys (\d+) .+ at \$(\d+\.\d\d) each and pays with a \$(\d+\.\d\d) bill", q):
        change = _dec(m[3]) - int(m[1]) * _dec(m[2])
        assert change >= 0
        return f"${change:.2f}"
    if m := re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+)\.", q):
        x, src, dst = _dec(m[1]), m[2], m[3]
        if (src, dst) in FACTORS:
            return f"{x * FACTORS[(src, dst)]} {dst}"
        return f"{x / FACTORS[(dst, src)]} {dst}"
    if m := re.search(r"(-?\d+) °([CF])\b.*degrees (Celsius|Fahrenheit)", q):
        v = Fraction(int(m[1]))
        if m[2] == "C":
            return f"{v * 9 / 5 + 32} °F"
        return f"{(v - 32) * 5 / 9} °C"
    if m := re.fullmatch(r"How many hours, minutes and seconds are (\d+) seconds\?", q):
        t = int(m[1])
        return f"{t // 3600} h {t % 3600 // 60} min {t % 60} s"
    if m := re.fullmatch(r"Today is (\w+)\. What day of the week will it be in (\d+) days\?", q):
        return WEEKDAYS[(WEEKDAYS.index(m[1]) + int(m[2])) % 7]
    if m := re.fullmatch(r"Is (\d+) divisible by (\d+)\?", q):
        return "Yes" if int(m[1]) % int(m[2]) == 0 else "No"
    if m := re.search(r"Who is the (\w+)\?$", q):
        above: dict[str, set] = defaultdict(set)  # above[x] = people ranked above x
        people = set()
        for a, rel, b in re.findall(r"(\w+) is (\w+) than (\w+)\.", q):
            hi, lo = (a, b) if ORDER_WORDS[rel] > 0 else (b, a)
            above[lo].add(hi)
            people |= {a, b}
        lower = {p for v in above.values() for p in v}
        top = [p for p in people if not above[p]]
        bottom = [p for p in people if p not in lower]
        cands = top if SUPERLATIVE[m[1]] > 0 else bottom
        assert len(cands) == 1, q
        return cands[0]
    if m := re.fullmatch(r"If (.+), then (.+)\. We know that (.+)\. Can we conclude that (.+)\?", q):
        p, c, fact, ask = m[1], m[2], m[3], m[4]
        neg = " not " in f" {fact} "
        sp, sc, sf = _stems(p), _stems(c), _stems(fact)
        about_p = len(sf & sp) > len(sf & sc)
        assert (" not " in f" {ask} ") == neg
        valid = (not neg and about_p) or (neg and not about_p)  # modus ponens / modus tollens
        return "Yes" if valid else "Cannot be determined"
    if m := re.fullmatch(r"(\w+) is (\w+ times) as old as .+\. In (\d+) years, \w+ will be (twice|\w+ times) "
                         r"as old as .+\. How old is \w+ now\?", q):
        k, y, mm = TIMES[m[2]], int(m[3]), TIMES[m[4]]
        s = Fraction(y * (mm - 1), k - mm)
        assert s.denominator == 1 and s > 0
        return str(k * s)
    raise AssertionError(f"unparsed question: {q!r}")


def _norm(ans: str) -> str:
    """Canonical form: numbers as exact decimals without trailing zeros."""
    def num(mo):
        d = Decimal(mo.group(0))
        s = format(d.normalize(), "f")
        return s.rstrip("0").rstrip(".") if "." in s else s
    if ans.startswith("$"):
        return ans
    return re.sub(r"-?\d+(?:\.\d+)?(?:/\d+)?", lambda mo: str(Fraction(mo.group(0))) if "/" in mo.group(0)
                  else num(mo), ans)


def _frac_to_dec(s: str) -> str:
    # Fractions from solve() that are whole numbers print as integers already; others as a/b -> decimal
    def f(mo):
        fr = Fraction(mo.group(0))
        d = Decimal(fr.numerator) / Decimal(fr.denominator)
        out = format(d.normalize(), "f")
        return out.rstrip("0").rstrip(".") if "." in out else out
    return re.sub(r"-?\d+/\d+", f, s)


def test_reasoning_answers_correct_and_markers(corpus):
    rows = corpus["reasoning.train.jsonl"] + corpus["reasoning.heldout.jsonl"]
    assert len(corpus["reasoning.train.jsonl"]) >= 20000 and len(corpus["reasoning.heldout.jsonl"]) >= 2000
    tasks = Counter()
    for r in rows:  # all of them, not a sample: it is fast enough
        text = r["text"]
        q, rest = text.split("\n<think>\n", 1)
        think, answer = rest.split("\n</think>\n", 1)
        assert answer and "\n" not in answer
        expected = _norm(_frac_to_dec(solve(q)))
        assert _norm(answer) == expected, (q, answer, expected)
        assert think.rstrip().splitlines()[-1]  # a non-empty chain of thought
        assert sum(mk in think for mk in MARKERS) >= 2, text
        tasks[r.get("task")] += 1
    assert len(tasks) >= 10, tasks
    # self-corrections after "Wait," exist, and every marker is common
    assert sum(bool(_CORRECTION.search(r["text"])) for r in rows) >= 0.08 * len(rows)
    all_think = [r["text"].split("<think>")[1] for r in rows]
    for mk in MARKERS:
        assert sum(mk in t for t in all_think) >= 0.1 * len(rows), mk


_CORRECTION = re.compile(r"^Wait, (?:.*\bnot\b|that's off|I forgot|let me (?:redo|add|count) again|"
                         r"I should subtract|multiplying by)", re.M)
_NUM = r"\(?-?\d+(?:\.\d+)?(?:/\d+)?\)?"
_EXPR = rf"{_NUM}(?: [×÷+\-] {_NUM})*"


def _eval(expr: str) -> Fraction:
    expr = expr.replace("×", "*").replace("÷", "/")
    expr = re.sub(r"\d+(?:\.\d+)?", lambda m: f"F('{m.group(0)}')", expr)
    return eval(expr, {"F": Fraction, "__builtins__": {}})  # only numbers, + - * / and parentheses


def test_reasoning_intermediate_steps(corpus):
    """Every chained equality 'a op b = c = ...' inside <think> holds, except a deliberate slip that the next line
    (or the same line) corrects with 'Wait,'."""
    rows = random.Random(1).sample(corpus["reasoning.train.jsonl"], 5000)
    checked = caught = 0
    for r in rows:
        lines = r["text"].split("\n")
        for i, line in enumerate(lines):
            for clause in re.split(r"(?<=\D)[.,;:](?=\s)|, | and |\bso\b|\bwhich gives\b", line.replace("$", "")):
                parts = clause.split(" = ")
                vals = []
                for j, part in enumerate(parts):
                    if j == 0:
                        m = re.search(rf"({_EXPR})\s*$", part)
                        if m and re.search(r"[a-z(×]$", part[:m.start()].rstrip()[-1:] or " "):
                            m = None
                    else:
                        m = re.match(rf"\s*({_EXPR})(?!\s*(?:with|remainder|min|steps|h\b)|[c(\d])", part)
                    vals.append(_eval(m.group(1)) if m else None)
                for a, b in zip(vals, vals[1:]):
                    if a is None or b is None:
                        continue
                    checked += 1
                    if a != b:
                        nxt = lines[i + 1] if i + 1 < len(lines) else ""
                        assert nxt.startswith("Wait,") or line.startswith("Wait,"), (line, r["text"])
                        caught += 1
    assert checked > 10000 and caught > 100, (checked, caught)
