#!/usr/bin/env python3
"""Generate the synthetic reasoning set of the routelens corpus (seeded, deterministic).

Every item is a short problem followed by a chain of thought and the answer:

    <question>
    <think>
    step ... So ... Wait, ... Let me check ... Alternatively, ... Hmm, ...
    </think>
    <answer>

The marker words "Wait", "Alternatively", "So", "Hmm" and "Let me check" appear at natural places
(a conclusion, a caught slip, a second method, a pause before a subtle point, a verification), so
that nPMI "cognitive expert" analyses have a real target. All answers are computed exactly (integers,
``fractions.Fraction``/``decimal.Decimal``); a fraction of the traces contain a deliberate slip in an
intermediate step that is caught and corrected right after "Wait,". The answer after ``</think>``
is always the correct one, and every question is written so that it can be re-solved by parsing
(see tests/test_corpus.py).

Tasks (field "task"): arith, chain, divmod, percent, money, units, temperature, time, weekday,
divisibility, ordering, conditional, ages.

Usage:
    python scripts/make_reasoning.py                  # writes data/corpus/reasoning.{train,heldout}.jsonl
    python scripts/make_reasoning.py --n-train 200 --n-heldout 20 --out /tmp/r

The split: problems are drawn from one seeded stream and deduplicated by align_id
(``r:`` + sha1(question)[:12]); an item goes to held-out when sha1("heldout:" + align_id) % 11 == 0
(while held-out is not full), else to train, until both are full. Held-out questions therefore
never occur in train.
"""
from __future__ import annotations

import argparse
import hashlib
import gzip
import json
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

SEED = 20240611
MARKERS = ("Wait", "Alternatively", "So", "Hmm", "Let me check")

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jomo", "Kira", "Luis",
         "Mei", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Wen", "Yusuf", "Zara"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("cup of tea", "cups of tea"), ("mango", "mangoes"), ("candle", "candles"),
         ("bus pass", "bus passes"), ("loaf of bread", "loaves of bread")]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def fmt_num(x) -> str:
    """Exact, plain decimal rendering: 3500, 3.5, 0.25, -12 (no exponent, no trailing zeros)."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        x = Decimal(x.numerator) / Decimal(x.denominator)
    if isinstance(x, Decimal):
        s = format(x.normalize(), "f")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        return "0" if s in ("-0", "") else s
    return str(x)


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def slip_of(rng: random.Random, value: int) -> int:
    """A plausible wrong intermediate value (never equal to the right one)."""
    choices = [value + 10, value - 10, value + 1, value - 1, value + 100] if abs(value) >= 20 else [value + 1, value + 2, value - 1]
    wrong = rng.choice(choices)
    return wrong if wrong != value else value + 1


class Trace:
    """Collects the lines of one chain of thought and which markers it used."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def hmm(self, line: str, p: float = 0.5) -> None:
        if self.rng.random() < p:
            if line.split()[0] not in ("I", "I'm"):
                line = line[0].lower() + line[1:]
            self.add("Hmm, " + line)

    def text(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------- tasks
def t_arith(rng: random.Random, tr: Trace):
    a, b = rng.randint(12, 98), rng.randint(12, 98)
    c = rng.randint(11, 499)
    op = rng.choice(["+", "-"])
    q = f"Compute {a} × {b} {op} {c}."
    tens, ones = b // 10 * 10, b % 10
    x, y = a * tens, a * ones
    p = a * b
    r = p + c if op == "+" else p - c
    if not ones:
        tr.add(f"First I need {a} × {b}. That is {a} × {b // 10} = {a * (b // 10)}, times 10.")
        x, y = p, 0
    else:
        tr.add(f"First I need {a} × {b}. I'll split {b} into {tens} + {ones}.")
        tr.add(f"{a} × {tens} = {x}.")
    if not ones:
        pass
    elif rng.random() < 0.3:
        wy = slip_of(rng, y)
        tr.add(f"{a} × {ones} = {wy}.")
        tr.add(f"Wait, {a} × {ones} is not {wy}. {a} × {ones} = {y}.")
    else:
        tr.add(f"{a} × {ones} = {y}.")
    tr.add(f"So {a} × {b} = {x} + {y} = {p}." if ones else f"So {a} × {b} = {p}.")
    if rng.random() < 0.55:
        if ones >= 5:
            near = tens + 10
            tr.add(f"Alternatively, {a} × {near} = {a * near}, minus {a} × {near - b} = {a * (near - b)}, "
                   f"which gives {a * near - a * (near - b)}. Same result.")
        else:
            ta, oa = a // 10 * 10, a % 10
            tr.add(f"Alternatively, split {a} instead: {ta} × {b} + {oa} × {b} = {ta * b} + {oa * b} = {p}. Same result.")
    else:
        ra, rb = round(a, -1), round(b, -1)
        tr.hmm(f"Is that plausible? {ra} × {rb} = {ra * rb}, and {p} is close to it. Fine.", 0.7)
    tr.add(f"Now {p} {op} {c} = {r}.")
    inv = "-" if op == "+" else "+"
    tr.add(f"Let me check: {r} {inv} {c} = {p}, and {p} ÷ {b} = {a}. Correct.")
    tr.add(f"So the answer is {r}.")
    return q, str(r)


def t_chain(rng: random.Random, tr: Trace):
    a, b = rng.randint(3, 60), rng.randint(3, 60)
    c = rng.randint(2, 12)
    d = rng.randint(1, 99)
    q = f"What is ({a} + {b}) × {c} - {d}?"
    s = a + b
    m = s * c
    r = m - d
    tr.add(f"Parentheses first: {a} + {b} = {s}.")
    if rng.random() < 0.3:
        wm = slip_of(rng, m)
        tr.add(f"Then {s} × {c} = {wm}.")
        tr.add(f"Wait, that's off. {s} × {c} = {s} × {c - 1} + {s} = {s * (c - 1)} + {s} = {m}.")
    else:
        tr.add(f"Then {s} × {c} = {m}.")
        tr.hmm(f"I should not multiply {b} × {c} alone; the parentheses group {a} + {b}.", 0.6)
    tr.add(f"Subtract {d}: {m} - {d} = {r}.")
    if rng.random() < 0.6:
        tr.add(f"Alternatively, distribute: {a} × {c} + {b} × {c} - {d} = {a * c} + {b * c} - {d} = {r}.")
    tr.add(f"Let me check: {r} + {d} = {m}, and {m} ÷ {c} = {s}. Yes.")
    tr.add(f"So the answer is {r}.")
    return q, str(r)


def t_divmod(rng: random.Random, tr: Trace):
    d = rng.randint(3, 19)
    n = rng.randint(50, 999)
    qq, rr = divmod(n, d)
    q = f"Divide {n} by {d}. What are the quotient and the remainder?"
    tr.add(f"I need the largest multiple of {d} that is not more than {n}.")
    guess = qq + 1
    tr.add(f"{d} × {guess} = {d * guess}.")
    tr.add(f"Wait, {d * guess} is more than {n}, so {guess} is too big.")
    tr.add(f"{d} × {qq} = {d * qq}, which fits.")
    tr.add(f"So the quotient is {qq} and the remainder is {n} - {d * qq} = {rr}.")
    tr.hmm(f"The remainder must be smaller than {d}; {rr} < {d}, good.", 0.6)
    tr.add(f"Let me check: {d} × {qq} + {rr} = {d * qq + rr}. That matches {n}.")
    return q, f"quotient {qq}, remainder {rr}"


def t_percent(rng: random.Random, tr: Trace):
    p = rng.choice([5, 10, 12.5, 15, 20, 25, 30, 35, 40, 45, 60, 75, 80, 90, 120, 150])
    n = 8 * rng.randint(1, 250)
    P = Fraction(str(p))
    r = P * n / 100
    q = f"What is {fmt_num(Fraction(str(p)))}% of {n}?"
    ten = Fraction(n, 10)
    tr.add(f"10% of {n} is {fmt_num(ten)}.")
    if P == 10:
        tr.add(f"So {fmt_num(P)}% of {n} is {fmt_num(r)}.")
    else:
        k = P / 10
        if rng.random() < 0.25:
            wrong = r * 10
            tr.add(f"{fmt_num(P)}% is {fmt_num(k)} times 10%, so it is {fmt_num(k)} × {fmt_num(ten)} = {fmt_num(wrong)}.")
            tr.add(f"Wait, {fmt_num(k)} × {fmt_num(ten)} is {fmt_num(r)}, not {fmt_num(wrong)}; I shifted the decimal point.")
        else:
            tr.add(f"{fmt_num(P)}% is {fmt_num(k)} times 10%, so it is {fmt_num(k)} × {fmt_num(ten)} = {fmt_num(r)}.")
    if rng.random() < 0.6:
        tr.add(f"Alternatively, {fmt_num(P)}/100 × {n} = {fmt_num(P * n)}/100 = {fmt_num(r)}.")
    tr.add(f"Let me check: {fmt_num(r)} ÷ {n} = {fmt_num(r / n)}, which is {fmt_num(P)}%.")
    tr.add(f"So the answer is {fmt_num(r)}.")
    return q, fmt_num(r)


def t_money(rng: random.Random, tr: Trace):
    name = rng.choice(NAMES)
    one, many = rng.choice(ITEMS)
    k = rng.randint(2, 9)
    price = rng.randint(3, 60) * 25  # cents, multiples of 25
    total = k * price
    bill = next(b for b in (500, 1000, 2000, 5000, 10000, 20000) if b > total)
    change = bill - total
    q = (f"{name} buys {k} {many} at {money(price)} each and pays with a {money(bill)} bill. "
         f"How much change does {name} get?")
    tr.add(f"Cost: {k} × {money(price)}. In cents that is {k} × {price} = {total} cents, i.e. {money(total)}.")
    tr.hmm(f"{money(total)} is less than {money(bill)}, so there is change to give.", 0.6)
    if rng.random() < 0.3:
        wrong = change + rng.choice([100, -100, 10])
        tr.add(f"Change: {money(bill)} - {money(total)} = {money(wrong)}.")
        tr.add(f"Wait, let me redo the subtraction in cents: {bill} - {total} = {change}, so it is {money(change)}.")
    else:
        tr.add(f"Change: {money(bill)} - {money(total)} = {money(change)}.")
    if rng.random() < 0.5:
        tr.add(f"Alternatively, count up from {money(total)} to {money(bill)}: that is {change} cents, {money(change)}.")
    tr.add(f"Let me check: {money(total)} + {money(change)} = {money(bill)}. Yes.")
    tr.add(f"So {name} gets {money(change)} back.")
    return q, money(change)


UNITS = [  # (from, to, factor) exact
    ("kilometers", "meters", Decimal(1000)), ("meters", "centimeters", Decimal(100)),
    ("kilograms", "grams", Decimal(1000)), ("liters", "milliliters", Decimal(1000)),
    ("hours", "minutes", Decimal(60)), ("minutes", "seconds", Decimal(60)),
    ("days", "hours", Decimal(24)), ("weeks", "days", Decimal(7)),
    ("feet", "inches", Decimal(12)), ("yards", "feet", Decimal(3)),
    ("inches", "centimeters", Decimal("2.54")), ("meters", "millimeters", Decimal(1000)),
]
SINGULAR = {"kilometers": "kilometer", "meters": "meter", "kilograms": "kilogram", "liters": "liter", "hours": "hour",
            "minutes": "minute", "days": "day", "weeks": "week", "feet": "foot", "yards": "yard", "inches": "inch"}


def t_units(rng: random.Random, tr: Trace):
    src, dst, f = rng.choice(UNITS)
    if f == Decimal("2.54") or rng.random() < 0.6:  # multiply
        x = Decimal(rng.randint(2, 95)) / (2 if rng.random() < 0.3 else 1)
        r = x * f
        q = f"Convert {fmt_num(x)} {src} to {dst}."
        tr.add(f"1 {SINGULAR[src]} = {fmt_num(f)} {dst}.")
        tr.add(f"Going to a smaller unit, so I multiply: {fmt_num(x)} × {fmt_num(f)}.")
        if rng.random() < 0.3 and f in (Decimal(1000), Decimal(100)):
            wrong = r / 10
            tr.add(f"That is {fmt_num(wrong)}.")
            tr.add(f"Wait, multiplying by {fmt_num(f)} moves the decimal point {len(fmt_num(f)) - 1} places, "
                   f"not {len(fmt_num(f)) - 2}. It is {fmt_num(r)}.")
        else:
            tr.add(f"That is {fmt_num(r)}.")
        tr.add(f"Let me check: {fmt_num(r)} ÷ {fmt_num(f)} = {fmt_num(x)}. Correct.")
        tr.add(f"So {fmt_num(x)} {src} is {fmt_num(r)} {dst}.")
        return q, f"{fmt_num(r)} {dst}"
    # divide: from the smaller unit back to the larger
    r = Decimal(rng.randint(2, 95)) / (2 if rng.random() < 0.3 else 1)
    x = r * f
    q = f"Convert {fmt_num(x)} {dst} to {src}."
    tr.add(f"1 {SINGULAR[src]} = {fmt_num(f)} {dst}.")
    tr.hmm(f"I'm going from the smaller unit to the larger one, so the number should get smaller.", 0.6)
    tr.add(f"So I divide: {fmt_num(x)} ÷ {fmt_num(f)} = {fmt_num(r)}.")
    if rng.random() < 0.4:
        tr.add(f"Wait, did I divide the right way? {fmt_num(r)} {src} × {fmt_num(f)} = {fmt_num(x)} {dst}. Yes.")
    else:
        tr.add(f"Let me check: {fmt_num(r)} × {fmt_num(f)} = {fmt_num(x)}. Correct.")
    tr.add(f"So the answer is {fmt_num(r)} {src}.")
    return q, f"{fmt_num(r)} {src}"


TEMP_FRAMES = ["Convert {x} to {unit}.", "A thermometer shows {x}. What is that in {unit}?",
               "The oven is set to {x}. Express this in {unit}.", "The water is at {x}. How much is that in {unit}?",
               "A weather report says {x}. Convert it to {unit}.", "What is {x} in {unit}?"]


def t_temperature(rng: random.Random, tr: Trace):
    if rng.random() < 0.5:
        c = 5 * rng.randint(-12, 60)
        f = c * 9 // 5 + 32
        q = rng.choice(TEMP_FRAMES).format(x=f"{c} °C", unit="degrees Fahrenheit")
        tr.add("F = C × 9/5 + 32.")
        tr.hmm("it is easier to do the × 9 first and then ÷ 5, since C is a multiple of 5.", 0.5)
        tr.add(f"{c} × 9 = {c * 9}, and {c * 9} ÷ 5 = {c * 9 // 5}.")
        if rng.random() < 0.3:
            tr.add(f"So F = {c * 9 // 5}.")
            tr.add(f"Wait, I forgot to add 32. F = {c * 9 // 5} + 32 = {f}.")
        else:
            tr.add(f"Then add 32: {c * 9 // 5} + 32 = {f}.")
        tr.add(f"Let me check: ({f} - 32) × 5/9 = {f - 32} × 5/9 = {c}. Correct.")
        tr.add(f"So {c} °C is {f} °F.")
        return q, f"{f} °F"
    c = 5 * rng.randint(-12, 60)
    f = c * 9 // 5 + 32
    q = rng.choice(TEMP_FRAMES).format(x=f"{f} °F", unit="degrees Celsius")
    tr.add("C = (F - 32) × 5/9.")
    tr.add(f"{f} - 32 = {f - 32}.")
    tr.hmm("subtract 32 first, then scale; the order matters here.", 0.5)
    tr.add(f"{f - 32} × 5 = {(f - 32) * 5}, and {(f - 32) * 5} ÷ 9 = {c}.")
    if rng.random() < 0.5:
        tr.add(f"Alternatively, each 9 °F step is 5 °C: {f - 32} ÷ 9 = {(f - 32) // 9} steps, × 5 = {c}.")
    tr.add(f"Let me check: {c} × 9/5 + 32 = {f}. Correct.")
    tr.add(f"So {f} °F is {c} °C.")
    return q, f"{c} °C"


def t_time(rng: random.Random, tr: Trace):
    total = rng.randint(3700, 35999)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    q = f"How many hours, minutes and seconds are {total} seconds?"
    tr.hmm(f"{total} seconds is more than an hour, so I start with hours.", 0.5)
    tr.add(f"One hour is 3600 seconds. {total} ÷ 3600 = {h} with {rem} left over, since 3600 × {h} = {3600 * h}.")
    if rng.random() < 0.3:
        wm = m + 1
        tr.add(f"{rem} seconds ÷ 60 = {wm} minutes.")
        tr.add(f"Wait, 60 × {wm} = {60 * wm}, which is more than {rem}. So it is {m} minutes, "
               f"60 × {m} = {60 * m}, with {s} seconds left.")
    else:
        tr.add(f"{rem} ÷ 60 = {m} with {s} left over, since 60 × {m} = {60 * m}.")
    tr.add(f"Let me check: {h} × 3600 + {m} × 60 + {s} = {3600 * h} + {60 * m} + {s} = {total}. Correct.")
    if rng.random() < 0.5:
        tr.add(f"Alternatively, {total} ÷ 60 = {total // 60} min {s} s, and {total // 60} min = {h} h {m} min.")
    tr.add(f"So it is {h} h {m} min {s} s.")
    return q, f"{h} h {m} min {s} s"


def t_weekday(rng: random.Random, tr: Trace):
    start = rng.randrange(7)
    n = rng.randint(8, 400)
    end = (start + n) % 7
    q = f"Today is {WEEKDAYS[start]}. What day of the week will it be in {n} days?"
    tr.add(f"The week repeats every 7 days, so only {n} mod 7 matters.")
    tr.hmm(f"{n} days is about {round(n / 7)} weeks; whole weeks don't change the day.", 0.5)
    k = n // 7
    tr.add(f"7 × {k} = {7 * k}, and {n} - {7 * k} = {n % 7}.")
    tr.add(f"So I move {n % 7} days forward from {WEEKDAYS[start]}.")
    if n % 7 and rng.random() < 0.3:
        wrong = (end + 1) % 7
        tr.add(f"That lands on {WEEKDAYS[wrong]}.")
        tr.add(f"Wait, let me count again: " + ", ".join(WEEKDAYS[(start + i) % 7] for i in range(1, n % 7 + 1))
               + f". It is {WEEKDAYS[end]}.")
    else:
        steps = ", ".join(WEEKDAYS[(start + i) % 7] for i in range(1, n % 7 + 1)) or "no move"
        tr.add(f"Counting: {steps}.")
    if rng.random() < 0.4:
        back = 7 - n % 7
        tr.add(f"Alternatively, {n} = 7 × {k + 1} - {back}: go back {back} days from {WEEKDAYS[start]}, "
               f"which is {WEEKDAYS[(start - back) % 7]}." if n % 7 else f"Alternatively, {n} is exactly {k} weeks.")
    tr.add(f"Let me check: in {7 * k} days it is {WEEKDAYS[start]} again, and {n % 7} more days gives {WEEKDAYS[end]}.")
    tr.add(f"So the answer is {WEEKDAYS[end]}.")
    return q, WEEKDAYS[end]


def t_divisibility(rng: random.Random, tr: Trace):
    d = rng.choice([3, 9])
    n = rng.randint(1000, 99999)
    if rng.random() < 0.5:
        n -= n % d  # make about half of them divisible
        if n < 1000:
            n += d
    digits = [int(ch) for ch in str(n)]
    s = sum(digits)
    yes = n % d == 0
    q = f"Is {n} divisible by {d}?"
    tr.add(f"A number is divisible by {d} exactly when its digit sum is.")
    tr.hmm(f"The last digit doesn't help for {d}, so I use the digit sum.", 0.5)
    if rng.random() < 0.3:
        ws = s + rng.choice([1, -1, 2])
        tr.add(f"Digit sum: {' + '.join(map(str, digits))} = {ws}.")
        tr.add(f"Wait, let me add again: {' + '.join(map(str, digits))} = {s}.")
    else:
        tr.add(f"Digit sum: {' + '.join(map(str, digits))} = {s}.")
    tr.add(f"{s} ÷ {d} = {s // d} remainder {s % d}, so {s} is {'' if yes else 'not '}divisible by {d}.")
    tr.add(f"Let me check directly: {n} ÷ {d} = {n // d} remainder {n % d}.")
    if rng.random() < 0.3:
        tr.add(f"Alternatively, {d} × {n // d} = {d * (n // d)}, which is {'exactly' if yes else 'not'} {n}.")
    tr.add(f"So the answer is {'yes' if yes else 'no'}.")
    return q, "Yes" if yes else "No"


def t_ordering(rng: random.Random, tr: Trace):
    k = rng.randint(3, 5)
    people = rng.sample(NAMES, k)  # people[0] is tallest
    adj, adj_inv = rng.choice([("taller", "shorter"), ("older", "younger"), ("faster", "slower"), ("heavier", "lighter")])
    top_word = {"taller": "tallest", "older": "oldest", "faster": "fastest", "heavier": "heaviest"}[adj]
    bot_word = {"shorter": "shortest", "younger": "youngest", "slower": "slowest", "lighter": "lightest"}[adj_inv]
    facts = []
    for i in range(k - 1):
        a, b = people[i], people[i + 1]
        facts.append(f"{a} is {adj} than {b}." if rng.random() < 0.6 else f"{b} is {adj_inv} than {a}.")
    rng.shuffle(facts)
    ask_top = rng.random() < 0.5
    q = " ".join(facts) + f" Who is the {top_word if ask_top else bot_word}?"
    ans = people[0] if ask_top else people[-1]
    tr.add(f"Let me turn every statement into the form X is {adj} than Y.")
    tr.hmm(f"some statements use \"{adj_inv}\"; \"B is {adj_inv} than A\" means A is {adj} than B.", 0.7)
    for i in range(k - 1):
        tr.add(f"{people[i]} > {people[i + 1]}.")
    tr.add("So the chain is " + " > ".join(people) + ".")
    if rng.random() < 0.3:
        tr.add(f"Alternatively, count for each person how many others are {adj_inv}: "
               + ", ".join(f"{x} {k - 1 - i}" for i, x in enumerate(people)) + ".")
    if rng.random() < 0.5:
        tr.add(f"Wait, is the chain complete? Every name appears and each link comes from one statement, so yes.")
    tr.add(f"Let me check: nobody is {adj} than {people[0]}, and nobody is {adj_inv} than {people[-1]}.")
    tr.add(f"So the {top_word if ask_top else bot_word} is {ans}.")
    return q, ans


CONDITIONALS = [
    ("it rains", "the street gets wet", "it rained", "the street is wet"),
    ("the alarm rings", "Omar wakes up", "the alarm rang", "Omar woke up"),
    ("a number is divisible by 4", "it is even", "the number is divisible by 4", "the number is even"),
    ("the shop is open", "the lights are on", "the shop is open", "the lights are on"),
    ("the switch is on", "the lamp glows", "the switch is on", "the lamp glows"),
    ("Mei finishes her homework", "she plays outside", "Mei finished her homework", "Mei played outside"),
    ("the oven is hot", "the bread bakes", "the oven is hot", "the bread bakes"),
    ("the battery is charged", "the phone turns on", "the battery is charged", "the phone turns on"),
    ("a shape is a square", "it has four sides", "the shape is a square", "the shape has four sides"),
    ("the train is late", "Sami misses the meeting", "the train was late", "Sami missed the meeting"),
    ("the plant gets water", "the plant gets taller", "the plant got water", "the plant got taller"),
    ("the door is locked", "the key is needed", "the door is locked", "the key is needed"),
]


def t_conditional(rng: random.Random, tr: Trace):
    p, qc, p_fact, q_fact = rng.choice(CONDITIONALS)
    form = rng.choice(["ponens", "tollens", "affirm", "deny"])
    neg = {"it rained": "it did not rain", "the street is wet": "the street is not wet",
           "the alarm rang": "the alarm did not ring", "Omar woke up": "Omar did not wake up",
           "the number is divisible by 4": "the number is not divisible by 4", "the number is even": "the number is not even",
           "the shop is open": "the shop is not open", "the lights are on": "the lights are not on",
           "the switch is on": "the switch is not on", "the lamp glows": "the lamp does not glow",
           "Mei finished her homework": "Mei did not finish her homework", "Mei played outside": "Mei did not play outside",
           "the oven is hot": "the oven is not hot", "the bread bakes": "the bread does not bake",
           "the battery is charged": "the battery is not charged", "the phone turns on": "the phone does not turn on",
           "the shape is a square": "the shape is not a square", "the shape has four sides": "the shape does not have four sides",
           "the train was late": "the train was not late", "Sami missed the meeting": "Sami did not miss the meeting",
           "the plant got water": "the plant did not get water",
           "the plant got taller": "the plant did not get taller",
           "the door is locked": "the door is not locked", "the key is needed": "the key is not needed"}
    rule = f"If {p}, then {qc}."
    tr.hmm("with if-then rules the direction is easy to mix up, so I will be careful.", 0.6)
    if form == "ponens":
        q = f"{rule} We know that {p_fact}. Can we conclude that {q_fact}?"
        tr.add(f"The rule says: {p} → {qc}. The given fact is the condition itself.")
        tr.add(f"So by the rule, {q_fact}.")
        tr.add("Let me check that I used the rule in the right direction: condition given, result follows. Yes.")
        ans = "Yes"
    elif form == "tollens":
        q = f"{rule} We know that {neg[q_fact]}. Can we conclude that {neg[p_fact]}?"
        tr.add(f"The rule says: {p} → {qc}. We are told the result did not happen.")
        tr.add(f"If {p_fact}, then {q_fact}, which contradicts what we know.")
        tr.add(f"So {neg[p_fact]}.")
        tr.add("Let me check: this is the contrapositive, not → not, in the reverse order. It is valid.")
        ans = "Yes"
    elif form == "affirm":
        q = f"{rule} We know that {q_fact}. Can we conclude that {p_fact}?"
        tr.add(f"The rule says: {p} → {qc}. We know the result holds.")
        tr.add(f"So it seems that {p_fact}.")
        tr.add(f"Wait, that reverses the rule. The result could have another cause; the rule only says what happens when {p}.")
        tr.add(f"Let me check with the rule alone: {q_fact} is consistent both with {p_fact} and with {neg[p_fact]}.")
        tr.add("So we cannot conclude it.")
        ans = "Cannot be determined"
    else:
        q = f"{rule} We know that {neg[p_fact]}. Can we conclude that {neg[q_fact]}?"
        tr.add(f"The rule says: {p} → {qc}. Here the condition is false.")
        tr.add(f"The rule says nothing about what happens when {neg[p_fact]}.")
        tr.add(f"Wait, could it still be that {q_fact}? Yes, for some other reason.")
        tr.add("Let me check: denying the condition of a rule does not deny its result. That is a classic fallacy.")
        tr.add("So we cannot conclude it.")
        ans = "Cannot be determined"
    if rng.random() < 0.4:
        tr.add(f"Alternatively, list the cases allowed by the rule: ({p_fact}, {q_fact}), ({neg[p_fact]}, {q_fact}), "
               f"({neg[p_fact]}, {neg[q_fact]}). The answer agrees with this table.")
    return q, ans


def t_ages(rng: random.Random, tr: Trace):
    while True:
        k = rng.randint(3, 6)
        m = rng.randint(2, k - 1)
        y = rng.randint(2, 20)
        num = y * (m - 1)
        if num % (k - m) == 0 and 1 <= num // (k - m) <= 25:
            s = num // (k - m)
            break
    t = k * s
    parent, child = rng.choice([("Tom", "his son"), ("Amina", "her daughter"), ("Lena", "her son"), ("Raj", "his daughter"),
                                ("Kofi", "his nephew"), ("Ines", "her niece"), ("Hiro", "his grandson"), ("Olga", "her granddaughter")])
    word = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[m]
    kw = {3: "three times", 4: "four times", 5: "five times", 6: "six times"}[k]
    q = f"{parent} is {kw} as old as {child}. In {y} years, {parent} will be {word} as old as {child}. How old is {parent} now?"
    rel = child.split()[1]
    tr.add(f"Let the {rel}'s age be c. Then {parent} is {k}c.")
    tr.add(f"In {y} years: {k}c + {y} = {m}(c + {y}) = {m}c + {m * y}.")
    kc = "c" if k - m == 1 else f"{k - m}c"
    if rng.random() < 0.3:
        tr.add(f"So {kc} = {m * y + y}.")
        tr.add(f"Wait, I should subtract {y}, not add it: {kc} = {m * y} - {y} = {m * y - y}.")
    else:
        tr.add(f"So {kc} = {m * y} - {y} = {m * y - y}.")
    if k - m == 1:
        tr.add(f"c = {s}, so {parent} is {k} × {s} = {t}.")
    else:
        tr.add(f"c = {m * y - y} ÷ {k - m} = {s}, so {parent} is {k} × {s} = {t}.")
    tr.hmm(f"the question asks for {parent}'s age, not the {rel}'s.", 0.6)
    if rng.random() < 0.4:
        tr.add(f"Alternatively, compare the gap: the age difference {t - s} never changes; in {y} years it is "
               f"{m - 1} times the {rel}'s age, {m - 1} × {s + y} = {(m - 1) * (s + y)}. Same gap.")
    tr.add(f"Let me check: in {y} years {parent} is {t + y} and the {rel} is {s + y}; {m} × {s + y} = {m * (s + y)}. Correct.")
    tr.add(f"So {parent} is {t}.")
    return q, str(t)


TASKS = [("arith", t_arith, 3), ("chain", t_chain, 2), ("divmod", t_divmod, 1), ("percent", t_percent, 2),
         ("money", t_money, 2), ("units", t_units, 3), ("temperature", t_temperature, 1), ("time", t_time, 1),
         ("weekday", t_weekday, 1), ("divisibility", t_divisibility, 1), ("ordering", t_ordering, 2),
         ("conditional", t_conditional, 1), ("ages", t_ages, 1)]


def make_item(rng: random.Random) -> dict:
    name, fn, _ = rng.choices(TASKS, weights=[w for *_, w in TASKS])[0]
    tr = Trace(rng)
    q, ans = fn(rng, tr)
    text = f"{q}\n<think>\n{tr.text()}\n</think>\n{ans}"
    align_id = "r:" + hashlib.sha1(q.encode("utf-8")).hexdigest()[:12]
    return {"text": text, "label": "reasoning", "align_id": align_id, "task": name}


def is_heldout(align_id: str) -> bool:
    return int(hashlib.sha1(("heldout:" + align_id).encode()).hexdigest(), 16) % 11 == 0


def generate(n_train: int = 20000, n_heldout: int = 2000, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, held, seen = [], [], set()
    while len(train) < n_train or len(held) < n_heldout:
        item = make_item(rng)
        if item["align_id"] in seen:
            continue
        seen.add(item["align_id"])
        if is_heldout(item["align_id"]):
            if len(held) < n_heldout:
                held.append(item)
        elif len(train) < n_train:
            train.append(item)
    return train, held


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line; `.gz` paths are gzip-compressed with mtime 0 so rebuilds are byte-identical
    (the big splits are stored compressed to keep the repository, and what travels with it, small)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "corpus"))
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-heldout", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = generate(a.n_train, a.n_heldout, a.seed)
    write_jsonl(out / "reasoning.train.jsonl.gz", train)
    write_jsonl(out / "reasoning.heldout.jsonl.gz", held)
    print(f"reasoning: {len(train)} train, {len(held)} held-out -> {out}")


if __name__ == "__main__":
    main()
