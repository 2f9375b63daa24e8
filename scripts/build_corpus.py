#!/usr/bin/env python3
"""Build the routelens corpus (data/corpus/) offline from registry packages. Deterministic.

Parallel text: sentence/phrase-aligned UI strings from gettext catalogs. The English msgid is the source
side, every translated msgstr is an aligned item in its language.
  * Django's message catalogs (the ``.mo`` files inside the PyPI wheel ``django==5.2.19``; read as a zip).
  * Debian bookworm packages that ship ``/usr/share/locale/<ll>/LC_MESSAGES/<domain>.mo``
    (GTK, GLib, iso-codes, GNOME / MATE / Cinnamon applications, VLC, Pidgin, Minetest, ...), fetched
    with ``apt-get download`` and read directly from the ``.deb`` (ar + tar; nothing is installed).
Reasoning text: scripts/make_reasoning.py (seeded generator), written by this script as well.

Outputs (UTF-8, one JSON object per line, sorted): data/corpus/parallel.{train,heldout}.jsonl
({"text","lang","align_id","source"}), reasoning.{train,heldout}.jsonl ({"text","label","align_id","task"}),
demo.jsonl ({"text","lang","align_id","label"}) and stats.json. See data/README.md.

Usage:
    python scripts/build_corpus.py                 # fetch into the cache (if needed) and rebuild data/corpus
    python scripts/build_corpus.py --no-fetch      # use only what is in the cache
    python scripts/build_corpus.py --check         # rebuild into a temp dir and compare bytes with data/corpus

Needs: Python >= 3.11 (stdlib only; ``zstandard`` only if a .deb uses data.tar.zst), pip (for
``pip download``) and apt (``apt-get download``; run ``apt-get update`` once) on Debian 12 (bookworm).
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import html
import io
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reasoning  # noqa: E402

DEFAULT_OUT = ROOT / "data" / "corpus"
DEFAULT_CACHE = Path(os.environ.get("ROUTELENS_CORPUS_CACHE", Path.home() / ".cache" / "routelens" / "corpus-sources"))

# ------------------------------------------------------------------------------------------- sources
DJANGO_VERSION = "5.2.19"  # the newest Django installable on py3.11 (6.x needs py>=3.12)

# (Debian package, version the committed corpus was built from, [gettext domains]). Order = priority:
# when the same English string occurs in several catalogs, the translation of the earliest one wins.
DEB_SOURCES: list[tuple[str, str, list[str]]] = [
    # GTK / GLib / iso-codes
    ("libgtk-3-common", "3.24.38-2~deb12u3", ["gtk30", "gtk30-properties"]),
    ("libglib2.0-data", "2.74.6-2+deb12u9", ["glib20"]),
    ("libgtk2.0-common", "2.24.33-2+deb12u1", ["gtk20"]),
    ("iso-codes", "4.15.0-1", ["iso_3166-1", "iso_639-2"]),
    # GNOME
    ("nautilus-data", "43.2-1", ["nautilus"]),
    ("gnome-control-center-data", "1:43.6-2~deb12u1", ["gnome-control-center-2.0"]),
    ("gnome-shell-common", "43.9-0+deb12u2", ["gnome-shell"]),
    ("mutter-common", "43.8-0+deb12u1", ["mutter"]),
    ("gnome-desktop3-data", "43.2-2", ["gnome-desktop-3.0"]),
    ("evolution-data-server-common", "3.46.4-2+deb12u1", ["evolution-data-server"]),
    ("gedit-common", "44.2-1", ["gedit"]),
    ("epiphany-browser-data", "43.1-1", ["epiphany"]),
    ("evince-common", "43.1-2+deb12u1", ["evince"]),
    ("totem-common", "43.0-2", ["totem"]),
    ("eog", "43.2-1+deb12u1", ["eog"]),
    ("file-roller", "43.0-1", ["file-roller"]),
    ("gnome-terminal-data", "3.46.8-1", ["gnome-terminal"]),
    ("gnome-system-monitor", "42.0-2", ["gnome-system-monitor"]),
    ("seahorse", "43.0-1", ["seahorse"]),
    ("zenity-common", "3.44.0-1", ["zenity"]),
    ("gnome-panel-data", "3.46.0-1", ["gnome-panel"]),
    ("gdm3", "43.0-3", ["gdm"]),
    # MATE
    ("caja-common", "1.26.1-1+deb12u1", ["caja"]),
    ("mate-desktop-common", "1.26.0-2", ["mate-desktop"]),
    ("mate-panel-common", "1.27.0-1", ["mate-panel"]),
    ("marco-common", "1.26.1-3+deb12u2", ["marco"]),
    ("pluma-common", "1.26.0-1+deb12u1", ["pluma"]),
    ("mate-control-center-common", "1.26.0-2+deb12u1", ["mate-control-center"]),
    ("atril-common", "1.26.0-2+deb12u4", ["atril"]),
    ("engrampa-common", "1.26.0-1+deb12u2", ["engrampa"]),
    ("eom-common", "1.26.0-2", ["eom"]),
    ("mate-terminal-common", "1.26.0-2", ["mate-terminal"]),
    ("mate-system-monitor-common", "1.26.0-1", ["mate-system-monitor"]),
    # Cinnamon
    ("cinnamon-l10n", "5.6.1-2", ["cinnamon", "nemo", "cinnamon-control-center", "cinnamon-session",
                                  "cinnamon-screensaver", "cinnamon-settings-daemon"]),
    # applications with unusually wide language coverage (Swahili, Yoruba, Amharic, ...)
    ("vlc-l10n", "3.0.24-0+deb12u1", ["vlc"]),
    ("pidgin-data", "2.14.12-1", ["pidgin"]),
    ("minetest-data", "5.6.1+dfsg+~1.9.0mt8+dfsg-2", ["minetest"]),
    ("tuxpaint-data", "1:0.9.28-sdl2-1", ["tuxpaint"]),
    ("navit-data", "0.5.6+dfsg.1-2", ["navit"]),
    ("sugar-session", "0.120-1", ["sugar"]),
]

# Source label written into each row (the gettext domain, with iso-codes' domains shortened).
SOURCE_LABEL = {"iso_3166-1": "iso_3166", "iso_639-2": "iso_639"}

# lang code -> (Debian locale dirs in order of preference, Django locale dirs in order of preference)
LANGS: dict[str, tuple[list[str], list[str]]] = {
    "de": (["de"], ["de"]),
    "fr": (["fr"], ["fr"]),
    "es": (["es"], ["es"]),
    "pt": (["pt_BR"], ["pt_BR"]),            # Brazilian Portuguese
    "ru": (["ru"], ["ru"]),
    "zh": (["zh_CN"], ["zh_Hans"]),          # Simplified Chinese
    "ja": (["ja"], ["ja"]),
    "ko": (["ko"], ["ko"]),
    "ar": (["ar"], ["ar"]),
    "hi": (["hi"], ["hi"]),
    "bn": (["bn", "bn_IN"], ["bn"]),
    "tr": (["tr"], ["tr"]),
    "vi": (["vi"], ["vi"]),
    "sw": (["sw"], ["sw"]),
    "yo": (["yo"], ["yo"]),
    "am": (["am", "am_ET"], ["am"]),
    "is": (["is"], ["is"]),
    "ga": (["ga"], ["ga"]),
    "cy": (["cy"], ["cy"]),
}
# Languages written in a non-Latin script: a translation must contain at least one letter of it.
SCRIPT_RE = {
    "ru": re.compile(r"[\u0400-\u04FF]"), "zh": re.compile(r"[\u4E00-\u9FFF\u3400-\u4DBF]"),
    "ja": re.compile(r"[\u3040-\u30FF\u4E00-\u9FFF]"), "ko": re.compile(r"[\uAC00-\uD7AF\u1100-\u11FF]"),
    "ar": re.compile(r"[\u0600-\u06FF]"), "hi": re.compile(r"[\u0900-\u097F]"), "bn": re.compile(r"[\u0980-\u09FF]"),
    "am": re.compile(r"[\u1200-\u139F]"),
}
CJK = {"zh", "ja", "ko"}

HELDOUT_MOD = 10  # 1 in 10 align_ids is held out
SCARCE = ("sw", "yo", "am")  # always kept whole by the subsampling
PARALLEL_BUDGET = 27_000_000  # bytes of parallel.{train,heldout}.jsonl together (whole corpus < 40 MB)
MAX_CHARS = 400
DEMO_LANGS = ["en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi", "sw", "tr", "ko"]
DEMO_ITEMS = 14
DEMO_REASONING = 40

# -------------------------------------------------------------------------------------------- fetch


def run(cmd: list[str], cwd: Path) -> None:
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def deb_version(path: Path) -> str:
    return path.name.split("_")[1].replace("%3a", ":")


def find_deb(cache: Path, pkg: str, version: str) -> Path | None:
    """The cached .deb of pkg: the pinned version if present, else the last one in sort order."""
    found = sorted((cache / "deb").glob(f"{pkg}_*.deb"))
    exact = [p for p in found if deb_version(p) == version]
    return (exact or found or [None])[-1]


def fetch(cache: Path, allow: bool) -> dict[str, str]:
    """Make sure the Django wheel and every .deb are in the cache; return {package: version used}."""
    (cache / "pip").mkdir(parents=True, exist_ok=True)
    (cache / "deb").mkdir(parents=True, exist_ok=True)
    wheel = cache / "pip" / f"django-{DJANGO_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        if not allow:
            sys.exit(f"missing {wheel} (run without --no-fetch)")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache / "pip"),
             f"django=={DJANGO_VERSION}"], cache)
    versions = {"django (PyPI)": DJANGO_VERSION}
    for pkg, ver, _ in DEB_SOURCES:
        path = find_deb(cache, pkg, ver)
        if path is None or deb_version(path) != ver:
            if path is None and not allow:
                sys.exit(f"missing {pkg} (run without --no-fetch)")
            if allow:
                try:
                    run(["apt-get", "download", f"{pkg}={ver}"], cache / "deb")
                except subprocess.CalledProcessError:
                    print(f"  ! {pkg}={ver} is no longer in the archive; taking the current candidate", flush=True)
                    run(["apt-get", "download", pkg], cache / "deb")
                path = find_deb(cache, pkg, ver)
        assert path is not None, pkg
        used = deb_version(path)
        if used != ver:
            print(f"  ! {pkg}: using {used}, the committed corpus was built from {ver} (output will differ)", flush=True)
        versions[pkg] = used
    return versions


# ---------------------------------------------------------------------------------------- reading
def parse_mo(data: bytes) -> dict[tuple[str, str], str]:
    """Minimal GNU .mo reader -> {(msgctxt, msgid): msgstr}; plural entries and the header are skipped."""
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic == 0x950412DE else ">"
    _, n, o_orig, o_tr = struct.unpack(end + "4I", data[4:20])
    raw = []
    for i in range(n):
        ln, off = struct.unpack(end + "2I", data[o_orig + 8 * i:o_orig + 8 * i + 8])
        tl, toff = struct.unpack(end + "2I", data[o_tr + 8 * i:o_tr + 8 * i + 8])
        raw.append((data[off:off + ln], data[toff:toff + tl]))
    charset = "utf-8"
    for k, v in raw:
        if k == b"":
            m = re.search(rb"charset=([\w-]+)", v)
            if m and m.group(1).lower() != b"charset":  # "CHARSET" is the template's placeholder
                charset = m.group(1).decode("ascii")
    out = {}
    for k, v in raw:
        if not k or b"\x00" in k or not v:
            continue
        try:
            ks, vs = k.decode(charset), v.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
        ctx, _, msgid = ks.rpartition("\x04")
        out[(ctx, msgid)] = vs
    return out


def deb_data_tar(path: Path) -> tarfile.TarFile:
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"!<arch>\n", path
    pos = 8
    while pos < len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58])
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard
                body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise ValueError(f"no data.tar in {path}")


LOCALE_MO = re.compile(r"^\./usr/share/locale/([^/]+)/LC_MESSAGES/([^/]+)\.mo$")


def read_deb(path: Path, domains: list[str], locales: set[str]) -> dict[str, dict[str, dict]]:
    """-> {domain: {locale: catalog}} for the wanted domains/locales (symlinks inside the package followed)."""
    tar = deb_data_tar(path)
    members = {m.name: m for m in tar.getmembers()}
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for name in sorted(members):
        m = LOCALE_MO.match(name)
        if not m or m.group(2) not in domains or m.group(1) not in locales:
            continue
        mem = members[name]
        hops = 0
        while mem.issym() and hops < 5:
            target = os.path.normpath(os.path.join(os.path.dirname(mem.name), mem.linkname))
            mem = members.get("./" + target.lstrip("./")) or members.get(target)
            hops += 1
            if mem is None:
                break
        if mem is None or not mem.isfile():
            continue
        out[m.group(2)][m.group(1)] = parse_mo(tar.extractfile(mem).read())
    return out


def read_django(wheel: Path, locales: set[str]) -> dict[str, dict[str, dict]]:
    """All Django .mo catalogs (core + contrib apps, django and djangojs domains) -> {"django": {locale: catalog}}."""
    merged: dict[str, dict] = defaultdict(dict)
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = re.search(r"/locale/([^/]+)/LC_MESSAGES/(django|djangojs)\.mo$", name)
            if m and m.group(1) in locales:
                cat = parse_mo(z.read(name))
                for k, v in cat.items():
                    merged[m.group(1)].setdefault(k, v)
    return {"django": dict(merged)}


# ---------------------------------------------------------------------------------------- cleaning
RE_PRINTF = re.compile(
    r"%(?:\d+\$)?(?:\([^()\s]{1,40}\))?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t|I)*"
    r"[diouxXeEfFgGcrsaAp]"
    r"|%<[A-Za-z0-9_]+>|%\d+|%[nN]\b")
RE_OTHER_PH = re.compile(r"\$\{[^{}]{0,40}\}|\{[^{}\s]{0,40}\}|\$\d+|@\d+|@[A-Z_]{2,}@")
RE_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:_-]*(?:\s[^<>]*)?/?>")
RE_CJK_MNEMONIC = re.compile(r"\s*[(（]\s*[_&][^\W_]\s*[)）]")
RE_AMP_MNEMONIC = re.compile(r"&(?!(?:[A-Za-z]+|#\d+|#[xX][0-9A-Fa-f]+);)(?=[^\W_])")
RE_US_MNEMONIC = re.compile(r"_(?=[^\W_])")
_PAIRS = ["“”", "„“", "„”", "‘’", "‚‘", "«»", "»«", "‹›", "「」", "『』", '""', "''", "`'", "()", "（）", "[]", "【】",
          "〈〉", "《》", "””", "““"]
# quotes/brackets around nothing but removed placeholders (\x01) and spaces (mismatched quote styles included)
RE_PH_IN_PAIR = re.compile(r"[“„‘‚«»‹\"'`「『(\[（【〈《]\s*\x01[\s\x01]*[”“’‘»«›\"'」』)\]）】〉》]")
# an empty pair of quotes/brackets
RE_EMPTY_PAIR = re.compile("|".join(re.escape(a + b) for a, b in _PAIRS))
RE_PH_BEFORE_PUNCT = re.compile(r"\s*\x01[\s\x01]*(?=[?!.,;:)…」』”’»、。，：；？！）]|$)")
RE_PH_AFTER_OPEN = re.compile(r"(?<=[(（「『“‘«])[\s\x01]*\x01\s*|^[\s\x01]*\x01\s*")
RE_RESIDUE = re.compile(r"%[-+#0-9.(<]*[A-Za-z(]|[{}_\\<>|`]|&[A-Za-z]+;|&#|@\d|\$\d|https?:|www\.|(?:\. ){3}"
                        r"|00:00|\b0000\b")
RE_KEYLIKE = re.compile(r"^\S*[:/=.@\\]\S*$")
EDGE_CHARS = " \t:;,、，：；-–—/|·•"
EN_STOP = {"translator-credits", "translator_credits", "translator credits", "your names", "your emails"}


def _n_placeholders(s: str) -> int:
    return len(RE_PRINTF.findall(s)) + len(RE_OTHER_PH.findall(s))


def clean(s: str) -> str | None:
    """Strip placeholders, markup and mnemonics; normalise whitespace. None if nothing usable remains."""
    s = unicodedata.normalize("NFC", s)
    s = s.replace("\x01", "").replace("%%", "\x00")  # \x00: a literal percent sign
    s = RE_PRINTF.sub("\x01", s)  # \x01: a removed placeholder
    s = RE_OTHER_PH.sub("\x01", s)
    s = RE_TAG.sub("", s)
    s = RE_CJK_MNEMONIC.sub("", s)
    s = RE_AMP_MNEMONIC.sub("", s)
    s = html.unescape(s)
    if s.count("_") == 1:
        s = RE_US_MNEMONIC.sub("", s)
    s = s.replace("\x01\x00", "\x01").replace("\x00", "%")  # "%d%%" is one placeholder
    for _ in range(2):
        s = RE_PH_IN_PAIR.sub("\x01", s)
    s = RE_PH_BEFORE_PUNCT.sub("", s)
    s = RE_PH_AFTER_OPEN.sub("", s)
    s = re.sub(r"[,;:](?=[!?.])", "", s.replace("\x01", " "))
    for _ in range(2):
        s = RE_EMPTY_PAIR.sub(" ", s)
        s = " ".join(s.split()).strip(EDGE_CHARS)
    if not s or RE_RESIDUE.search(s) or len(s) > MAX_CHARS:
        return None
    if sum(ch.isalpha() for ch in s) < 2:
        return None
    return s


def clean_english(msgid: str) -> str | None:
    if msgid.strip().casefold() in EN_STOP or RE_KEYLIKE.match(msgid.strip()):
        return None
    if _n_placeholders(msgid) > 2:
        return None
    s = clean(msgid)
    if s is None or not re.search(r"[A-Za-z]{2}", s):
        return None
    return s


def clean_translation(lang: str, en: str, msgstr: str) -> str | None:
    s = clean(msgstr)
    if s is None or s.casefold() == en.casefold():
        return None
    if lang in SCRIPT_RE and not SCRIPT_RE[lang].search(s):
        return None
    ratio = len(s) / len(en)
    lo = 0.08 if lang in CJK else 0.2
    if not (lo <= ratio <= 5.0) and abs(len(s) - len(en)) > 12:
        return None
    return s


def dedup_key(en: str) -> str:
    return re.sub(r"(?:\s|[.:…!?])+$", "", en.casefold()).strip()


def align_id_of(key: str) -> str:
    return "p:" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def is_heldout(align_id: str) -> bool:
    return int(hashlib.sha1(("routelens-heldout:" + align_id).encode()).hexdigest(), 16) % HELDOUT_MOD == 0


# ------------------------------------------------------------------------------------------ build
def collect(cache: Path) -> tuple[list, Counter]:
    """-> candidates [(priority, source, ctx, en_clean, {lang: text})], raw counts per (source, lang)."""
    deb_locales = {loc for d, _ in LANGS.values() for loc in d}
    dj_locales = {loc for _, d in LANGS.values() for loc in d}
    catalogs: list[tuple[str, dict[str, dict]]] = []  # (source label, {locale: catalog}) in priority order
    wheel = cache / "pip" / f"django-{DJANGO_VERSION}-py3-none-any.whl"
    catalogs.append(("django", read_django(wheel, dj_locales)["django"]))
    for pkg, ver, domains in DEB_SOURCES:
        got = read_deb(find_deb(cache, pkg, ver), domains, deb_locales)
        for dom in domains:
            catalogs.append((SOURCE_LABEL.get(dom, dom), got.get(dom, {})))
    cands = []
    raw = Counter()
    for prio, (src, by_loc) in enumerate(catalogs):
        per_lang: dict[str, dict] = {}
        for lang, (deb_locs, dj_locs) in LANGS.items():
            for loc in (dj_locs if src == "django" else deb_locs):
                if loc in by_loc:
                    per_lang[lang] = by_loc[loc]
                    break
        msgids = sorted({k for cat in per_lang.values() for k in cat})
        for ctx, msgid in msgids:
            en = clean_english(msgid)
            if en is None:
                continue
            trs = {}
            for lang, cat in per_lang.items():
                v = cat.get((ctx, msgid))
                if v is not None:
                    raw[(src, lang)] += 1
                    t = clean_translation(lang, en, v)
                    if t is not None:
                        trs[lang] = t
            if trs:
                cands.append((prio, src, ctx, en, trs))
    return cands, raw


def align(cands: list) -> dict[str, dict]:
    """Deduplicate by normalised English -> {align_id: {"en": (text, source), lang: (text, source)}}."""
    by_key: dict[str, list] = defaultdict(list)
    for c in cands:
        by_key[dedup_key(c[3])].append(c)
    items = {}
    for key, cs in by_key.items():
        cs.sort(key=lambda c: (c[0], c[2] != "", c[2], c[3]))
        rep = cs[0][3]
        # prefer catalogs whose English is exactly the representative string, then by priority
        order = sorted(cs, key=lambda c: (c[3] != rep, c[0], c[2] != "", c[2], c[3]))
        item = {"en": (rep, cs[0][1])}
        for lang in LANGS:
            for c in order:
                if lang in c[4]:
                    item[lang] = (c[4][lang], c[1])
                    break
        items[align_id_of(key)] = item
    return items


def line_bytes(text: str, lang: str, aid: str, src: str) -> int:
    return len(json.dumps({"text": text, "lang": lang, "align_id": aid, "source": src}, ensure_ascii=False).encode()) + 1


def subsample(items: dict[str, dict], budget: int) -> tuple[dict[str, dict], dict]:
    """Keep the corpus under `budget` bytes of JSONL, deterministically.

    Every align_id with a translation in a SCARCE language is kept; the others are taken in order of
    (number of languages covered, descending; align_id) until the budget is reached. Strings that are
    translated into many languages are the most useful for cross-lingual comparisons, and are mostly the
    core GTK/GLib/Django strings."""
    size = {aid: sum(line_bytes(t, l, aid, s) for l, (t, s) in it.items()) for aid, it in items.items()}
    keep = {aid for aid, it in items.items() if any(l in it for l in SCARCE)}
    used = sum(size[a] for a in keep)
    rest = sorted((a for a in items if a not in keep), key=lambda a: (-len(items[a]), a))
    for aid in rest:
        if used + size[aid] > budget:
            break
        keep.add(aid)
        used += size[aid]
    before = Counter(l for it in items.values() for l in it)
    info = {"align_ids_before": len(items), "align_ids_after": len(keep), "bytes_budget": budget,
            "aligned_items_before_by_lang": {l: before[l] for l in ["en", *LANGS]},
            "rule": "keep every align_id with a translation in " + "/".join(SCARCE) + "; then by number of "
                    "languages (desc), then align_id, until the byte budget of the two parallel files is reached"}
    return {a: items[a] for a in sorted(keep)}, info


def rows_of(items: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for aid in sorted(items):
        dest = held if is_heldout(aid) else train
        for lang in sorted(items[aid]):
            text, src = items[aid][lang]
            dest.append({"text": text, "lang": lang, "align_id": aid, "source": src})
    # A held-out text never occurs in train, not even under another align_id.
    held_texts = {(r["lang"], r["text"]) for r in held}
    n = len(train)
    train = [r for r in train if (r["lang"], r["text"]) not in held_texts]
    return train, held, n - len(train)


def make_demo(held: list[dict], rheld: list[dict]) -> list[dict]:
    by_id: dict[str, dict[str, str]] = defaultdict(dict)
    for r in held:
        by_id[r["align_id"]][r["lang"]] = r["text"]
    full = [a for a in sorted(by_id) if all(l in by_id[a] for l in DEMO_LANGS)
            and 3 <= len(by_id[a]["en"].split()) <= 12]
    demo = []
    for aid in full[:DEMO_ITEMS]:
        for lang in DEMO_LANGS:
            demo.append({"text": by_id[aid][lang], "lang": lang, "align_id": aid, "label": "parallel"})
    by_task: dict[str, list] = defaultdict(list)
    for r in rheld:
        by_task[r["task"]].append(r)
    picked, i = [], 0
    while len(picked) < DEMO_REASONING:  # round-robin over the tasks, for variety
        for task in sorted(by_task):
            if i < len(by_task[task]) and len(picked) < DEMO_REASONING:
                picked.append(by_task[task][i])
        i += 1
    for r in picked:
        demo.append({"text": r["text"], "lang": "en", "align_id": r["align_id"], "label": "reasoning"})
    return demo


write_jsonl = make_reasoning.write_jsonl  # one writer for every corpus file (gzip with mtime 0 for .gz)


def build(out: Path, cache: Path, fetch_ok: bool) -> dict:
    t0 = time.time()
    versions = fetch(cache, fetch_ok)
    cands, raw = collect(cache)
    items = align(cands)
    items, sub_info = subsample(items, PARALLEL_BUDGET)
    train, held, n_dup = rows_of(items)
    rtrain, rheld = make_reasoning.generate()
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "parallel.train.jsonl.gz", train)
    write_jsonl(out / "parallel.heldout.jsonl.gz", held)
    write_jsonl(out / "reasoning.train.jsonl.gz", rtrain)
    write_jsonl(out / "reasoning.heldout.jsonl.gz", rheld)
    demo = make_demo(held, rheld)
    write_jsonl(out / "demo.jsonl", demo)

    langs = {}
    for lang in ["en", *LANGS]:
        ntr = sum(r["lang"] == lang for r in train)
        nhe = sum(r["lang"] == lang for r in held)
        langs[lang] = {"train": ntr, "heldout": nhe, "total": ntr + nhe}
    src_lines: dict[str, Counter] = defaultdict(Counter)
    for r in train + held:
        src_lines[r["source"]][r["lang"]] += 1
    raw_by_src: dict[str, dict] = defaultdict(dict)
    for (src, lang), n in sorted(raw.items()):
        raw_by_src[src][lang] = n
    stats = {
        "parallel": {
            "align_ids": {"train": len({r["align_id"] for r in train}), "heldout": len({r["align_id"] for r in held})},
            "lines": {"train": len(train), "heldout": len(held)},
            "languages": langs,
            "languages_with_1000_aligned": sorted(l for l, v in langs.items() if l != "en" and v["total"] >= 1000),
            "sources": {s: {"lines": sum(c.values()), "by_lang": dict(sorted(c.items()))}
                        for s, c in sorted(src_lines.items())},
            "subsampling": sub_info,
            "train_lines_dropped_because_text_is_in_heldout": n_dup,
            "raw_translated_msgids": dict(sorted(raw_by_src.items())),
            "split_rule": f"heldout iff int(sha1('routelens-heldout:' + align_id), 16) % {HELDOUT_MOD} == 0",
        },
        "reasoning": {
            "train": len(rtrain), "heldout": len(rheld), "seed": make_reasoning.SEED,
            "tasks": {s: dict(sorted(Counter(r["task"] for r in rows).items()))
                      for s, rows in (("train", rtrain), ("heldout", rheld))},
            "markers_per_trace_with_marker": {m: sum(m in r["text"].split("<think>")[1] for r in rtrain)
                                              for m in make_reasoning.MARKERS},
        },
        "demo": {"lines": len(demo), "parallel_align_ids": DEMO_ITEMS, "languages": DEMO_LANGS,
                 "reasoning": DEMO_REASONING},
        "packages": versions,
        "files": {},
    }
    for name in sorted(p.name for p in out.glob("*.jsonl*")):
        b = (out / name).read_bytes()
        if name.endswith(".gz"):
            b = gzip.decompress(b)  # counts and hash describe the text, whatever the container
        stats["files"][name] = {"lines": b.count(b"\n"), "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    with open(out / "stats.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(stats, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write("\n")
    print(f"built {out} in {time.time() - t0:.1f} s")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description="Rebuild data/corpus from registry packages (deterministic).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default %(default)s)")
    ap.add_argument("--no-fetch", action="store_true", help="do not call pip/apt-get; use the cache only")
    ap.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out")
    a = ap.parse_args()
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), a.cache, not a.no_fetch)
            names = sorted(p.name for p in Path(tmp).iterdir())
            bad = [n for n in names if not (a.out / n).exists() or not filecmp.cmp(Path(tmp) / n, a.out / n, shallow=False)]
            if bad:
                sys.exit(f"differs from {a.out}: {bad}")
            print(f"identical: {names}")
        return
    stats = build(a.out, a.cache, not a.no_fetch)
    langs = stats["parallel"]["languages"]
    print("lang  train  heldout  total")
    for lang, v in langs.items():
        print(f"{lang:4s} {v['train']:6d} {v['heldout']:8d} {v['total']:6d}")


if __name__ == "__main__":
    main()
