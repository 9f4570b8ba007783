#!/usr/bin/env python3
"""Prepare parallel data for fairseq: clean, deduplicate, split, SentencePiece, binarize.

Subcommands (run `prepare_data.py SUBCOMMAND -h` for every option):

    gettext   English -> LANG message pairs from the system's gettext catalogs (.mo files)
                  prepare_data.py gettext --lang de --out work/en-de/data
    text      your own parallel text, one sentence per line, line i of --src translates line i of --tgt
                  prepare_data.py text --src corpus.en --tgt corpus.de --out work/en-de/data
    spm       train SentencePiece model(s) on train, encode train/valid/test into pieces
                  prepare_data.py spm --data work/en-de/data --out work/en-de/spm --vocab-size 8000
    binarize  run fairseq-preprocess on the piece files
                  prepare_data.py binarize --data work/en-de/spm --out work/en-de/data-bin
    all       gettext|text -> spm -> binarize under one --work folder; steps whose outputs exist and
              were built with the same parameters and inputs are reused
                  prepare_data.py all --lang de --work work/en-de --vocab-size 8000
                  prepare_data.py all --src my.en --tgt my.de --work work/my --vocab-size 8000

Cleaning (gettext and text): Unicode NFC, control characters become spaces, whitespace runs collapse
to one space and the ends are stripped (so multi-line messages become one line); pairs with an empty
side, a side without any letter (outside printf/format placeholders such as %s, %-5d, {0}), or
source == target (untranslated) are dropped; exact duplicate pairs are removed; when one source has
several targets the most frequent target is kept (ties: the smallest string in code-point order), so
the result does not depend on the order of the input (--keep-all-targets keeps them all).

gettext specifics: catalogs are <dir>/<lang>/LC_MESSAGES/*.mo under the share/locale folders found
with glob (see default_locale_dirs; --locale-dirs replaces them), read with gettext.GNUTranslations;
a catalog Python cannot read (e.g. a header that is not in its declared charset) is skipped with a
warning. Message contexts are dropped; a plural entry gives one pair, the English singular with the
translation form used for n = 1. Menu accelerators ("_Open" / "Ö_ffnen", "&File", "(_O)") are removed
only where that is safe (see strip_accelerators); anything doubtful is left as it is.

Splitting: pairs are grouped by a split key (the source, case-folded, with everything but letters
and digits removed, so "Save", "_Save" and "Save:" share a group), each group is placed by the
SHA-1 of (seed, key); test takes groups from the lowest hashes, then valid, the rest is train.
A source (and its near-duplicates) is therefore never in two splits, and the split does not depend on
the order of the input lines. Output files are sorted by (source, target).

SentencePiece length policy (--max-len, in pieces): long train pairs are dropped (--truncate: cut);
valid and test are never shrunk, so they stay line-aligned with the raw text (--truncate cuts valid on
both sides and test on the source side only).

Errors in the input (missing/unreadable files, invalid UTF-8, line count mismatch, nothing left after
cleaning) are reported as `error: ...` naming the file (and line) with exit status 2.
"""
import argparse
import collections
import gettext
import glob
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import unicodedata

from cli_args import at_least

SPLITS = ("train", "valid", "test")
STAMP = ".stamp.json"
META = "meta.json"
# the rnn_* models' default --max-source-positions and --max-target-positions (as fairseq's lstm)
MODEL_POSITIONS = 1024
STAMP_VERSION = 1  # bump when a change in this script changes what a step writes


class DataError(Exception):
    """A problem with the user's input or parameters; printed as `error: ...`, exit status 2."""


def log(msg):
    print(msg, flush=True)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# normalisation, cleaning, deduplication, splitting


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def normalize_text(s):
    """NFC, control characters (tab, newline, ...) -> space, whitespace runs collapsed, ends stripped."""
    s = unicodedata.normalize("NFC", s).replace("\ufeff", "")
    return " ".join(_CONTROL.sub(" ", s).split())


_PLACEHOLDER = re.compile(r"%(\d+\$)?[-+ #0']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t|I64)?[diouxXeEfFgGaAcspnm%]"
                          r"|%<PRI\w+>|\{[^{}\s]*\}")


def has_letter(s):
    """True if s has a letter outside printf/format placeholders ("%s: %d" and "{0}" have none)."""
    return any(c.isalpha() for c in _PLACEHOLDER.sub("", s))


_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);")
_CJK_MNEMONIC = "\\s*\\(\\s*{m}[^\\W_]\\s*\\)"  # "打开(_O)", "開く(&O)"
_MAX_LABEL_WORDS = 10


def strip_accelerators(src, tgt):
    """Remove menu accelerator markers (`_File`, `&File`) where that is safe; otherwise leave both as is.

    A marker in the source is removed only if the source is short (<= 10 words), has exactly one marker
    character followed by a letter or digit, is not an HTML entity ("&amp;"), and either starts a word
    ("_Open", "Save _As"; not "file_name", "KP_Delete") or sits inside a capitalised word of a label of
    at most 4 words ("Cu_t", "E_xit") while the target has a marker too; and the marked token does not
    occur as a whole token in the target (then it is an identifier such as "_exit", not a mnemonic).
    The target then loses a parenthesised CJK mnemonic "(_O)", or its single marker followed by a letter
    or digit ("Ö_ffnen"). If the target has more markers than that, nothing is stripped on either side.
    """
    for m in "_&":
        if src.count(m) != 1:
            continue
        i = src.index(m)
        if not src[i + 1:i + 2].isalnum() or len(src.split()) > _MAX_LABEL_WORDS:
            continue
        if m == "&" and _ENTITY.match(src, i):
            continue
        before = re.search(r"[^\W_]*$", src[:i]).group(0)
        token = re.match(r"[^\W_]+", src[i + 1:]).group(0)
        if before and not (re.fullmatch(r"[A-Z][a-z]*", before) and re.fullmatch(r"[a-z]+", token)
                           and len(src.split()) <= 4 and tgt.count(m) == 1):
            continue  # inside a word: only label-like "Cu_t" with a mnemonic in the target as well
        if re.search(r"(?<![^\W_])" + re.escape(m + token) + r"(?![^\W_])", tgt):
            continue
        new_tgt, n = re.subn(_CJK_MNEMONIC.format(m=re.escape(m)), "", tgt)
        if n > 1:
            continue
        if n == 0:
            k = new_tgt.count(m)
            if k == 1:
                j = new_tgt.index(m)
                if not new_tgt[j + 1:j + 2].isalnum() or (m == "&" and _ENTITY.match(new_tgt, j)):
                    continue
                new_tgt = new_tgt[:j] + new_tgt[j + 1:]
            elif k > 1:
                continue
        return src[:i] + src[i + 1:], new_tgt
    return src, tgt


def clean_pairs(pairs, stats, accelerators=False, drop_identical=True):
    """Normalise and filter (src, tgt) pairs; counts what was dropped in `stats` (a Counter)."""
    out = []
    for src, tgt in pairs:
        src, tgt = normalize_text(src), normalize_text(tgt)
        if accelerators:
            src2, tgt2 = strip_accelerators(src, tgt)
            if (src2, tgt2) != (src, tgt):
                stats["accelerators stripped"] += 1
                src, tgt = normalize_text(src2), normalize_text(tgt2)
        if not src or not tgt:
            stats["dropped: empty side"] += 1
        elif not has_letter(src) or not has_letter(tgt):
            stats["dropped: no letters"] += 1
        elif drop_identical and src == tgt:
            stats["dropped: source == target"] += 1
        else:
            out.append((src, tgt))
    return out


def dedup_pairs(pairs, stats, keep_all_targets=False):
    """Remove exact duplicates; for a source with several targets keep the most frequent target
    (ties: smallest string). Returns the unique pairs sorted by (source, target)."""
    counts = collections.Counter(pairs)
    stats["dropped: duplicate pair"] += len(pairs) - len(counts)
    if keep_all_targets:
        return sorted(counts)
    best = {}
    for (src, tgt), n in counts.items():
        cur = best.get(src)
        if cur is None or (-n, tgt) < (-cur[1], cur[0]):
            best[src] = (tgt, n)
    stats["dropped: other target for the same source"] += len(counts) - len(best)
    return sorted((src, tgt) for src, (tgt, _) in best.items())


def split_key(src):
    """Sources with the same key always land in the same split (case and punctuation ignored)."""
    return "".join(c for c in src.casefold() if c.isalnum()) or src


def parse_size(text):
    """'1000' -> 1000 pairs; '0.05' -> 5% of the pairs (by hash, stable when the corpus grows).
    Never 0: fairseq-train validates on the valid split, and an empty split cannot be binarised."""
    try:
        v = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pairs or a fraction, got {text!r}")
    if v <= 0 or (isinstance(v, float) and v >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}")
    return v


def _hash(seed, key):
    return hashlib.sha1(f"{seed}\0{key}".encode("utf-8")).hexdigest()


def split_pairs(pairs, valid_size=1000, test_size=1000, seed="0"):
    """Deterministic train/valid/test split of (src, tgt) pairs, independent of their order.

    Groups of pairs with the same split_key() are ordered by SHA-1(seed, key). With counts, test takes
    groups from the front until it holds >= test_size pairs, then valid likewise; with fractions a
    group goes to test if its hash (as a number in [0, 1)) is < test_size, to valid if it is
    < test_size + valid_size. Each split is returned sorted by (source, target).
    """
    groups = collections.defaultdict(list)
    for p in pairs:
        groups[split_key(p[0])].append(p)
    order = sorted(groups, key=lambda k: (_hash(seed, k), k))
    out = {s: [] for s in SPLITS}
    if isinstance(valid_size, float) or isinstance(test_size, float):
        if not (isinstance(valid_size, float) or valid_size == 0) or \
                not (isinstance(test_size, float) or test_size == 0):
            raise DataError("give --valid-size and --test-size both as counts or both as fractions")
        if valid_size + test_size >= 1:
            raise DataError(f"--valid-size {valid_size} + --test-size {test_size} leave no training data")
        for k in order:
            h = int(_hash(seed, k)[:13], 16) / 16 ** 13
            split = "test" if h < test_size else "valid" if h < test_size + valid_size else "train"
            out[split].extend(groups[k])
    else:
        if valid_size + test_size >= len(pairs):
            # sizes that work here (fractions of a corpus this small could leave a split empty)
            k = max(1, len(pairs) // 20)
            hint = (f"use smaller sizes, e.g. --valid-size {k} --test-size {k}" if 2 * k < len(pairs)
                    else "it needs at least 3 pairs")
            raise DataError(
                f"the corpus has only {len(pairs)} pairs after cleaning; --valid-size {valid_size} + "
                f"--test-size {test_size} leave no training data ({hint})")
        it = iter(order)
        for split, size in (("test", test_size), ("valid", valid_size)):
            while len(out[split]) < size:
                out[split].extend(groups[next(it)])
        for k in it:
            out["train"].extend(groups[k])
    if not out["train"]:
        raise DataError(f"no training pairs left after taking valid and test from {len(pairs)} pairs")
    for split, size in (("valid", valid_size), ("test", test_size)):  # fairseq cannot use an empty split
        if not out[split]:
            raise DataError(f"--{split}-size {size} leaves no {split} pairs of {len(pairs)}; "
                            f"give a count or a larger fraction")
    return {s: sorted(v) for s, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# reading files


def _open_error(path, e):
    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return DataError(f"{path}: is a directory, expected a text file")
    if isinstance(e, PermissionError):
        return DataError(f"{path}: cannot read (permission denied)")
    return DataError(f"{path}: cannot read ({e.strerror or e})")


def iter_lines(path):
    """Yield (line number, text) of a UTF-8 file, split on '\\n' only (a CR before it and a BOM at the
    start are removed). Invalid UTF-8 raises DataError naming the file and line, and so does a file
    whose every line holds a carriage return (bare-CR line endings, classic Mac OS: read as lines
    of '\\n', it would be one long line, and the corpus "only 1 pairs")."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise _open_error(path, e) from None
    with fh:
        lineno = with_cr = 0
        try:
            for lineno, raw in enumerate(fh, 1):
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                raw = raw[:-1] if raw.endswith(b"\r") else raw
                with_cr += b"\r" in raw
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                        f"of the line); the file must be UTF-8 (convert it, e.g. with iconv)") from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield lineno, line
        except OSError as e:
            raise DataError(f"{path}:{lineno + 1}: read error ({e.strerror or e})") from None
    if lineno and with_cr == lineno:
        raise DataError(f"{path}: its lines end in a bare carriage return (\\r, classic Mac OS), not "
                        f"\\n; convert them first, e.g. tr '\\r' '\\n' < {shlex.quote(str(path))} > fixed")


def read_parallel(src_path, tgt_path, allow_empty=False):
    """Return the list of (src line, tgt line); the files must have the same number of lines."""
    src_it, tgt_it = iter_lines(src_path), iter_lines(tgt_path)
    pairs = []
    for s, t in itertools.zip_longest(src_it, tgt_it):
        if s is None or t is None:
            n = len(pairs)
            longer, shorter, it = (tgt_path, src_path, tgt_it) if s is None else (src_path, tgt_path, src_it)
            total = n + 1 + sum(1 for _ in it)
            raise DataError(
                f"line count mismatch: {shorter} has {n} lines but {longer} has {total}; "
                f"{longer}:{n + 1} has no counterpart in {shorter}")
        pairs.append((s[1], t[1]))
    if not pairs and not allow_empty:
        raise DataError(f"{src_path} and {tgt_path} are empty (no lines)")
    return pairs


def file_sha1(path):
    h = hashlib.sha1()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise _open_error(path, e) from None
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# gettext catalogs


def default_locale_dirs():
    """Folders laid out as <dir>/<lang>/LC_MESSAGES/*.mo on this system (existing ones only)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr", "/usr/local"}
    patterns = [os.path.join(p, "share", "locale") for p in sorted(prefixes)]
    patterns += ["/usr/share/locale-langpack", "/opt/*/share/locale", "/usr/share/*/locale",
                 "/usr/share/vim/vim*/lang"]
    for key in ("purelib", "platlib"):
        try:
            patterns.append(os.path.join(sysconfig.get_paths()[key], "*", "locale"))
        except KeyError:
            pass
    dirs, seen = [], set()
    for pattern in patterns:
        for d in sorted(glob.glob(pattern)):
            real = os.path.realpath(d)
            if os.path.isdir(real) and real not in seen:
                seen.add(real)
                dirs.append(d)
    return dirs


def find_mo_files(lang, locale_dirs, variants=False):
    """The .mo files of `lang` (e.g. de, pt_BR, sr@latin); with variants also de_AT, de_CH, de@..."""
    names = [lang] + ([f"{lang}_*", f"{lang}@*"] if variants else [])
    files, seen = [], set()
    for d in locale_dirs:
        for name in names:
            for f in glob.glob(os.path.join(glob.escape(d), name, "LC_MESSAGES", "*.mo")):
                real = os.path.realpath(f)
                if real not in seen:
                    seen.add(real)
                    files.append(f)
    return sorted(files)


def read_mo(path):
    """(msgid, msgstr) pairs of a .mo file, read with gettext.GNUTranslations.

    The header (empty msgid) is skipped, a message context ("ctx\\x04msgid") is removed from the msgid,
    empty translations are skipped. Plural entries (keys (msgid, i)) contribute one pair: the singular
    msgid with the form the catalog's Plural-Forms uses for n = 1 (form 0 for most languages), so
    singular English is paired with a singular translation; the English plural (msgid_plural) is not
    kept by GNUTranslations and the other forms are dropped.
    """
    with open(path, "rb") as fh:
        t = gettext.GNUTranslations(fh)
    try:
        singular = int(t.plural(1))
    except Exception:  # a malformed Plural-Forms expression
        singular = 0
    out = []
    for key, msgstr in t._catalog.items():
        if isinstance(key, tuple):
            msgid, form = key
            if form != singular:
                continue
        else:
            msgid = key
        msgid = msgid.rsplit("\x04", 1)[-1]
        if msgid and msgstr:
            out.append((msgid, msgstr))
    return sorted(out)


def gettext_corpus(lang, locale_dirs=None, variants=False):
    """Raw (English, LANG) pairs from every catalog of `lang`, plus stats and the files read."""
    dirs = default_locale_dirs() if locale_dirs is None else locale_dirs
    files = find_mo_files(lang, dirs, variants)
    if not files:
        raise DataError(f"no gettext catalogs (*.mo) for language {lang!r} under "
                        f"{', '.join(dirs) or '(no locale folders found)'}; try --locale-dirs or --variants")
    stats = collections.Counter()
    pairs, used, skipped = [], [], []
    for f in files:
        try:
            entries = read_mo(f)
        except (OSError, UnicodeDecodeError, LookupError, ValueError, IndexError) as e:
            skipped.append(f"{f} ({type(e).__name__}: {e})")
            warn(f"skipping unreadable catalog {f}: {e}")
            continue
        used.append(f)
        pairs.extend(entries)
    stats["catalogs read"] = len(used)
    stats["catalogs skipped"] = len(skipped)
    stats["messages"] = len(pairs)
    return pairs, stats, used, skipped


# ----------------------------------------------------------------------------------------------------
# writing corpora and stamps


def check_lang(lang, what):
    if not re.fullmatch(r"[A-Za-z0-9_@]+", lang or ""):
        raise DataError(f"{what} {lang!r} is not a usable language code (letters, digits, _ and @ only; "
                        f"fairseq file names use '.' and '-' as separators)")
    return lang


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line + "\n")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def stamp_is_current(out_dir, stamp, outputs):
    """True if out_dir was built with exactly `stamp` and all `outputs` (names in out_dir) exist."""
    old = read_json(os.path.join(out_dir, STAMP))
    return old == json.loads(json.dumps(stamp)) and all(os.path.exists(os.path.join(out_dir, f))
                                                        for f in outputs)


def refuse_overwriting_inputs(inputs, out_dir, outputs, advice):
    """Stops before a step writes over one of its own inputs: a user's corpus named train.en
    given as --src with --out (or --work's data folder) where it lies was cut to its train split,
    and `all` cut it again on every rerun (its checksum had changed)."""
    written = {os.path.realpath(os.path.join(out_dir, f)) for f in outputs}
    for path in inputs:
        if os.path.realpath(path) in written:
            raise DataError(f"{path} would be overwritten: this step writes "
                            f"{os.path.basename(path)} in {out_dir}; {advice}")


def begin_step(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    try:
        os.remove(os.path.join(out_dir, STAMP))  # an interrupted rebuild must not look current
    except FileNotFoundError:
        pass


def corpus_outputs(src_lang, tgt_lang):
    return [f"{s}.{l}" for s in SPLITS for l in (src_lang, tgt_lang)] + [META]


def write_corpus(out_dir, splits, src_lang, tgt_lang, meta):
    for split in SPLITS:
        write_lines(os.path.join(out_dir, f"{split}.{src_lang}"), (s for s, _ in splits[split]))
        write_lines(os.path.join(out_dir, f"{split}.{tgt_lang}"), (t for _, t in splits[split]))
    meta = dict(meta, src_lang=src_lang, tgt_lang=tgt_lang,
                sizes={s: len(splits[s]) for s in SPLITS})
    write_json(os.path.join(out_dir, META), meta)


def check_disjoint(splits):
    seen = {}
    for split in SPLITS:
        for src, _ in splits[split]:
            other = seen.setdefault(src, split)
            if other != split:  # cannot happen with split_pairs(); kept as a guard
                raise AssertionError(f"source {src!r} in both {other} and {split}")


def _report(stats, n_unique, splits, out_dir):
    for k in sorted(stats):
        log(f"  {k}: {stats[k]}")
    log(f"  unique pairs: {n_unique} (distinct sources: {len({s for s, _ in itertools.chain(*splits.values())})})")
    log("  split: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS) + f" -> {out_dir}")


def split_params(args):
    return {"valid_size": args.valid_size, "test_size": args.test_size, "seed": args.split_seed,
            "keep_all_targets": args.keep_all_targets, "keep_identical": args.keep_identical}


def prepare_gettext(lang, out_dir, locale_dirs=None, variants=False, src_lang="en", valid_size=1000,
                    test_size=1000, seed="0", keep_all_targets=False, keep_identical=False, stamp=None):
    """gettext catalogs -> cleaned, deduplicated, split corpus in out_dir. Returns the split sizes."""
    check_lang(lang, "--lang")
    check_lang(src_lang, "--src-lang")
    if lang == src_lang:
        raise DataError(f"--lang {lang} is the source language")
    raw, stats, used, skipped = gettext_corpus(lang, locale_dirs, variants)
    pairs = clean_pairs(raw, stats, accelerators=True, drop_identical=not keep_identical)
    pairs = dedup_pairs(pairs, stats, keep_all_targets)
    if not pairs:
        raise DataError(f"no usable pairs in the {len(used)} catalogs of {lang!r} after cleaning")
    splits = split_pairs(pairs, valid_size, test_size, seed)
    check_disjoint(splits)
    begin_step(out_dir)
    write_corpus(out_dir, splits, src_lang, lang, {
        "source": "gettext", "catalogs": used, "skipped_catalogs": skipped, "stats": dict(stats)})
    if stamp is not None:
        write_json(os.path.join(out_dir, STAMP), stamp)
    log(f"gettext {src_lang}-{lang}: {len(used)} catalogs")
    _report(stats, len(pairs), splits, out_dir)
    return {s: len(v) for s, v in splits.items()}


def lang_from_path(path, default):
    ext = os.path.splitext(path)[1][1:]
    return ext if re.fullmatch(r"[A-Za-z0-9_@]+", ext or "") else default


def text_langs(src, tgt, src_lang=None, tgt_lang=None):
    """Explicit codes, else the file suffixes (corpus.en, corpus.de), else src / tgt."""
    if src_lang and tgt_lang:
        if src_lang == tgt_lang:
            raise DataError(f"--src-lang and --tgt-lang are both {src_lang!r}")
        return src_lang, tgt_lang
    s, t = src_lang or lang_from_path(src, "src"), tgt_lang or lang_from_path(tgt, "tgt")
    if s == t:
        s, t = src_lang or "src", tgt_lang or "tgt"
    if s == t:
        raise DataError(f"source and target language are both {s!r}; give --src-lang and --tgt-lang")
    return s, t


def prepare_text(src, tgt, out_dir, src_lang=None, tgt_lang=None, valid_size=1000, test_size=1000,
                 seed="0", keep_all_targets=False, keep_identical=False, stamp=None):
    """Plain parallel text files -> cleaned, deduplicated, split corpus in out_dir."""
    src_lang, tgt_lang = text_langs(src, tgt, src_lang, tgt_lang)
    check_lang(src_lang, "--src-lang")
    check_lang(tgt_lang, "--tgt-lang")
    raw = read_parallel(src, tgt)
    stats = collections.Counter({"lines": len(raw)})
    pairs = clean_pairs(raw, stats, drop_identical=not keep_identical)
    pairs = dedup_pairs(pairs, stats, keep_all_targets)
    if not pairs:
        dropped = ", ".join(f"{v} {k.split(': ', 1)[1]}" for k, v in sorted(stats.items())
                            if k.startswith("dropped") and v)
        raise DataError(f"no usable sentence pairs in {src} and {tgt}: all {len(raw)} lines were dropped "
                        f"({dropped})")
    splits = split_pairs(pairs, valid_size, test_size, seed)
    check_disjoint(splits)
    refuse_overwriting_inputs([src, tgt], out_dir, corpus_outputs(src_lang, tgt_lang),
                              "choose another output folder (--out, or --work for `all`)")
    begin_step(out_dir)
    write_corpus(out_dir, splits, src_lang, tgt_lang, {
        "source": "text", "inputs": [os.path.abspath(src), os.path.abspath(tgt)], "stats": dict(stats)})
    if stamp is not None:
        write_json(os.path.join(out_dir, STAMP), stamp)
    log(f"text {src_lang}-{tgt_lang}: {src} / {tgt}")
    _report(stats, len(pairs), splits, out_dir)
    return {s: len(v) for s, v in splits.items()}


# ----------------------------------------------------------------------------------------------------
# SentencePiece


def resolve_langs(data_dir, src_lang=None, tgt_lang=None):
    """Languages of a data folder: the arguments, else its meta.json, else the two train.* suffixes."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such folder")
    meta = read_json(os.path.join(data_dir, META)) or {}
    src_lang = src_lang or meta.get("src_lang")
    tgt_lang = tgt_lang or meta.get("tgt_lang")
    if not (src_lang and tgt_lang):
        exts = sorted({f[len("train."):] for f in os.listdir(data_dir) if f.startswith("train.")} - {"raw"})
        if len(exts) != 2:
            raise DataError(f"{data_dir}: cannot tell the languages (no {META}, train.* files: "
                            f"{', '.join(exts) or 'none'}); give --src-lang and --tgt-lang")
        if not src_lang and not tgt_lang:
            raise DataError(f"{data_dir}: found train.{exts[0]} and train.{exts[1]}; "
                            f"give --src-lang and --tgt-lang")
        other = [e for e in exts if e != (src_lang or tgt_lang)]
        if len(other) != 1:
            raise DataError(f"{data_dir}: no train.{src_lang or tgt_lang}")
        src_lang, tgt_lang = (src_lang, other[0]) if src_lang else (other[0], tgt_lang)
    check_lang(src_lang, "--src-lang")
    check_lang(tgt_lang, "--tgt-lang")
    return src_lang, tgt_lang


def present_splits(data_dir, src_lang, tgt_lang):
    """train is required; valid and test are used when both language files exist."""
    splits = []
    for split in SPLITS:
        have = [os.path.exists(os.path.join(data_dir, f"{split}.{l}")) for l in (src_lang, tgt_lang)]
        if split == "train" or any(have):
            splits.append(split)  # a missing file is reported by the reader
    return splits


def train_spm(inputs, model_prefix, vocab_size, model_type="unigram", character_coverage=1.0,
              input_sentence_size=1000000, seed=1, threads=1, normalization="identity"):
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=inputs, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=threads, normalization_rule_name=normalization,
            bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training on {', '.join(inputs)} failed: {e}") from None
    return model_prefix + ".model"


def remove_stale_models(out_dir, previous, models):
    """Removes the models an earlier run wrote in out_dir (its meta.json's) that this one does
    not: after --joint then --separate, spm.model stayed beside spm.en.model and spm.de.model,
    and the commands that name spm/spm.model read the old joint model without a word."""
    kept = {os.path.basename(m) for m in models.values()}
    for name in sorted(set(previous.values()) - kept):
        if os.path.basename(name) != name or not name.endswith(".model"):
            continue  # not a file name this script wrote
        for path in (os.path.join(out_dir, name), os.path.join(out_dir, name[:-len(".model")] + ".vocab")):
            if os.path.isfile(path):
                os.remove(path)
                log(f"  removed {path} (a model of the earlier run, not of this one)")


def _fit(pieces, max_len):
    return len(pieces) <= max_len


def prepare_spm(data_dir, out_dir, vocab_size, joint=True, max_len=128, truncate=False,
                model_type="unigram", character_coverage=1.0, input_sentence_size=1000000, seed=1,
                threads=1, normalization="identity", src_lang=None, tgt_lang=None, stamp=None):
    """Train SentencePiece on train, encode every split into piece files in out_dir.

    Length policy (max_len > 0, counted in pieces, each side separately):
      train: pairs with a side longer than max_len are dropped (truncated to max_len with truncate);
      valid: kept as they are (both sides truncated with truncate);
      test:  kept as they are (only the source truncated with truncate; references stay whole),
    so valid/test lines stay in one-to-one correspondence with the raw files in data_dir.
    """
    import sentencepiece as spm

    src_lang, tgt_lang = resolve_langs(data_dir, src_lang, tgt_lang)
    if vocab_size < 2:
        raise DataError(f"--vocab-size must be at least 2, got {vocab_size}")
    splits = present_splits(data_dir, src_lang, tgt_lang)
    data = {s: read_parallel(os.path.join(data_dir, f"{s}.{src_lang}"), os.path.join(data_dir, f"{s}.{tgt_lang}"),
                             allow_empty=s != "train") for s in splits}
    refuse_overwriting_inputs([os.path.join(data_dir, f"{s}.{l}") for s in splits for l in (src_lang, tgt_lang)],
                              out_dir, spm_outputs(src_lang, tgt_lang, joint),
                              "the piece files would replace the text they are made from: give --out "
                              "another folder than --data")
    previous = (read_json(os.path.join(out_dir, META)) or {}).get("models", {})
    begin_step(out_dir)
    langs = (src_lang, tgt_lang)
    train_files = [os.path.join(data_dir, f"train.{l}") for l in langs]
    opts = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                input_sentence_size=input_sentence_size, seed=seed, threads=threads,
                normalization=normalization)
    if joint:
        model = train_spm(train_files, os.path.join(out_dir, "spm"), **opts)
        models = {l: model for l in langs}
    else:
        models = {l: train_spm([f], os.path.join(out_dir, f"spm.{l}"), **opts) for l, f in zip(langs, train_files)}
    remove_stale_models(out_dir, previous, models)
    procs = {l: spm.SentencePieceProcessor(model_file=m) for l, m in models.items()}
    stats = collections.Counter()
    over_limit = collections.Counter()
    sizes = {}
    for split in splits:
        enc = [procs[l].encode([p[i] for p in data[split]], out_type=str) for i, l in enumerate(langs)]
        out_src, out_tgt = [], []
        for s, t in zip(*enc):
            long_s, long_t = max_len > 0 and len(s) > max_len, max_len > 0 and len(t) > max_len
            if long_s or long_t:
                if split == "train" and not truncate:
                    stats[f"{split}: dropped, longer than {max_len} pieces"] += 1
                    continue
                if truncate:
                    s = s[:max_len]
                    if split != "test":
                        t = t[:max_len]
                    stats[f"{split}: truncated to {max_len} pieces"] += 1
                else:
                    stats[f"{split}: kept although longer than {max_len} pieces"] += 1
            if split != "train" and max(len(s), len(t)) + 1 > MODEL_POSITIONS:  # with </s>
                over_limit[split] += 1
            out_src.append(" ".join(s))
            out_tgt.append(" ".join(t))
        if split == "train" and not out_src:
            raise DataError(f"no training pairs of at most {max_len} pieces in {train_files[0]}; "
                            f"raise --max-len or use --truncate")
        write_lines(os.path.join(out_dir, f"{split}.{src_lang}"), out_src)
        write_lines(os.path.join(out_dir, f"{split}.{tgt_lang}"), out_tgt)
        sizes[split] = len(out_src)
    write_json(os.path.join(out_dir, META), {
        "src_lang": src_lang, "tgt_lang": tgt_lang, "joint": joint, "raw_dir": os.path.abspath(data_dir),
        "models": {l: os.path.basename(m) for l, m in models.items()}, "max_len": max_len,
        "truncate": truncate, "sizes": sizes, "stats": dict(stats), **{k: v for k, v in opts.items()}})
    if stamp is not None:
        write_json(os.path.join(out_dir, STAMP), stamp)
    log(f"spm {'joint' if joint else 'separate'} {model_type} vocab {vocab_size}: "
        + ", ".join(f"{s} {n}" for s, n in sizes.items()) + f" -> {out_dir}")
    for k in sorted(stats):
        log(f"  {k}: {stats[k]}")
    for split in splits:
        if split != "train" and stats[f"{split}: kept although longer than {max_len} pieces"]:
            warn(f"{split} has lines longer than --max-len {max_len} pieces (kept; --truncate cuts them)")
        if over_limit[split]:
            tool = "fairseq-train" if split == "valid" else "fairseq-generate"
            warn(f"{split} has {over_limit[split]} line(s) of {MODEL_POSITIONS} pieces or more, over "
                 f"the models' default --max-source-positions / --max-target-positions with </s>: "
                 f"{tool} will refuse them; raise those options when training, or use a larger "
                 f"--vocab-size")
    return sizes


def spm_outputs(src_lang, tgt_lang, joint, splits=SPLITS):
    models = ["spm.model"] if joint else [f"spm.{src_lang}.model", f"spm.{tgt_lang}.model"]
    return models + [f"{s}.{l}" for s in splits for l in (src_lang, tgt_lang)] + [META]


# ----------------------------------------------------------------------------------------------------
# fairseq-preprocess


def preprocess_command():
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-m", "fairseq_cli.preprocess"]


def binarize_outputs(src_lang, tgt_lang, splits=SPLITS):
    out = [f"dict.{src_lang}.txt", f"dict.{tgt_lang}.txt"]
    for s in splits:
        for l in (src_lang, tgt_lang):
            out += [f"{s}.{src_lang}-{tgt_lang}.{l}.bin", f"{s}.{src_lang}-{tgt_lang}.{l}.idx"]
    return out


def binarize(data_dir, out_dir, src_lang=None, tgt_lang=None, joined_dictionary=None, workers=None,
             stamp=None):
    """fairseq-preprocess the piece files of data_dir into the data-bin out_dir."""
    src_lang, tgt_lang = resolve_langs(data_dir, src_lang, tgt_lang)
    if joined_dictionary is None:
        joined_dictionary = bool((read_json(os.path.join(data_dir, META)) or {}).get("joint", False))
    splits = present_splits(data_dir, src_lang, tgt_lang)
    for split in splits:  # fail here, with a clear message, rather than inside fairseq
        read_parallel(os.path.join(data_dir, f"{split}.{src_lang}"), os.path.join(data_dir, f"{split}.{tgt_lang}"),
                      allow_empty=split != "train")
    begin_step(out_dir)
    for f in binarize_outputs(src_lang, tgt_lang) + ["preprocess.log"]:  # fairseq refuses to overwrite dicts
        try:
            os.remove(os.path.join(out_dir, f))
        except FileNotFoundError:
            pass
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = preprocess_command() + ["--source-lang", src_lang, "--target-lang", tgt_lang, "--destdir", out_dir,
                                  "--workers", str(workers)]
    for split in splits:
        cmd += [f"--{split}pref", os.path.join(data_dir, split)]
    if joined_dictionary:
        cmd.append("--joined-dictionary")
    log("running: " + shlex.join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
        raise DataError(f"fairseq-preprocess failed with exit status {proc.returncode}:\n{tail}")
    missing = [f for f in binarize_outputs(src_lang, tgt_lang, splits) if not os.path.exists(os.path.join(out_dir, f))]
    if missing:
        raise DataError(f"fairseq-preprocess did not write {', '.join(missing)} in {out_dir}")
    if stamp is not None:
        write_json(os.path.join(out_dir, STAMP), stamp)
    sizes = {}
    for l in (src_lang, tgt_lang):
        with open(os.path.join(out_dir, f"dict.{l}.txt"), encoding="utf-8") as fh:
            # fairseq pads the dictionary to a multiple of 8 with madeupword0000, ... entries
            sizes[l] = sum(1 for line in fh if not line.startswith("madeupword"))
    log(f"binarized {src_lang}-{tgt_lang} ({', '.join(splits)}; "
        f"{'joined' if joined_dictionary else 'separate'} dictionaries: "
        + ", ".join(f"{l} {n} symbols + 4 special" for l, n in sizes.items()) + f") -> {out_dir}")
    return sizes


# ----------------------------------------------------------------------------------------------------
# all


def inputs_fingerprint(paths, base=None):
    """{path: SHA-1}; paths inside the work folder relative to it (``base``), so a moved or copied
    work folder is still up to date; the user's own files (and catalogs) by absolute path."""
    return {os.path.relpath(p, base) if base else os.path.abspath(p): file_sha1(p) for p in paths}


def run_all(args):
    work = args.work
    data_dir, spm_dir, bin_dir = (os.path.join(work, d) for d in ("data", "spm", "data-bin"))
    split = split_params(args)
    # 1. corpus
    if args.lang:
        src_lang, tgt_lang = args.src_lang or "en", args.lang
        dirs = args.locale_dirs if args.locale_dirs else default_locale_dirs()
        files = find_mo_files(args.lang, dirs, args.variants)
        stamp = {"step": "gettext", "version": STAMP_VERSION, "lang": args.lang, "src_lang": src_lang,
                 "variants": args.variants, "split": split, "inputs": inputs_fingerprint(files)}
        if not args.force and stamp_is_current(data_dir, stamp, corpus_outputs(src_lang, tgt_lang)):
            log(f"gettext: up to date, reusing {data_dir}")
        else:
            prepare_gettext(args.lang, data_dir, dirs, args.variants, src_lang, args.valid_size, args.test_size,
                            args.split_seed, args.keep_all_targets, args.keep_identical, stamp=stamp)
    else:
        src_lang, tgt_lang = text_langs(args.src, args.tgt, args.src_lang, args.tgt_lang)
        stamp = {"step": "text", "version": STAMP_VERSION, "src_lang": src_lang, "tgt_lang": tgt_lang,
                 "split": split, "inputs": inputs_fingerprint([args.src, args.tgt])}
        if not args.force and stamp_is_current(data_dir, stamp, corpus_outputs(src_lang, tgt_lang)):
            log(f"text: up to date, reusing {data_dir}")
        else:
            prepare_text(args.src, args.tgt, data_dir, src_lang, tgt_lang, args.valid_size, args.test_size,
                         args.split_seed, args.keep_all_targets, args.keep_identical, stamp=stamp)
    src_lang, tgt_lang = resolve_langs(data_dir)
    # 2. sentencepiece
    corpus_files = [os.path.join(data_dir, f"{s}.{l}") for s in SPLITS for l in (src_lang, tgt_lang)]
    stamp = {"step": "spm", "version": STAMP_VERSION, **spm_params(args),
             "inputs": inputs_fingerprint(corpus_files, work)}
    if not args.force and stamp_is_current(spm_dir, stamp, spm_outputs(src_lang, tgt_lang, args.joint)):
        log(f"spm: up to date, reusing {spm_dir}")
    else:
        prepare_spm(data_dir, spm_dir, stamp=stamp, **spm_params(args))
    # 3. fairseq-preprocess
    joined = args.joint if args.joined_dictionary is None else args.joined_dictionary
    piece_files = [os.path.join(spm_dir, f"{s}.{l}") for s in SPLITS for l in (src_lang, tgt_lang)]
    stamp = {"step": "binarize", "version": STAMP_VERSION, "src_lang": src_lang, "tgt_lang": tgt_lang,
             "joined_dictionary": joined, "inputs": inputs_fingerprint(piece_files, work)}
    if not args.force and stamp_is_current(bin_dir, stamp, binarize_outputs(src_lang, tgt_lang)):
        log(f"binarize: up to date, reusing {bin_dir}")
    else:
        binarize(spm_dir, bin_dir, src_lang, tgt_lang, joined, args.workers, stamp=stamp)
    log(f"done: {bin_dir} (SentencePiece model(s) and piece files in {spm_dir}, raw text in {data_dir})")


def spm_params(args):
    return dict(vocab_size=args.vocab_size, joint=args.joint, max_len=args.max_len, truncate=args.truncate,
                model_type=args.model_type, character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size, seed=args.spm_seed, threads=args.threads,
                normalization=args.normalization)


# ----------------------------------------------------------------------------------------------------
# command line


def seed_type(text):
    """argparse type: SentencePiece's seed, an unsigned 32-bit integer (a TypeError inside
    SentencePiece otherwise)."""
    value = at_least(0)(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be at most {2**32 - 1}, got {text!r}")
    return value


def coverage_type(text):
    """argparse type: --character-coverage in SentencePiece's range [0.98, 1] (its own check
    printed a C++ source line, not the option)."""
    value = at_least(0.98, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text!r}")
    return value


def add_split_args(p):
    g = p.add_argument_group("cleaning and splitting")
    g.add_argument("--valid-size", type=parse_size, default=1000,
                   help="validation pairs (fairseq-train validates on them): a count >= 1, or a "
                        "fraction in (0, 1) such as 0.05 (default 1000)")
    g.add_argument("--test-size", type=parse_size, default=1000,
                   help="test pairs: a count >= 1, or a fraction in (0, 1) such as 0.05 (default 1000)")
    g.add_argument("--split-seed", default="0", help="salt of the split hash; another value gives another split")
    g.add_argument("--keep-all-targets", action="store_true",
                   help="keep every distinct target of a source (default: the most frequent one)")
    g.add_argument("--keep-identical", action="store_true", help="keep pairs whose target equals the source")


def add_gettext_args(p, required):
    p.add_argument("--lang", required=required, help="target language as named in the locale folders: de, fr, pt_BR")
    p.add_argument("--locale-dirs", nargs="+", metavar="DIR",
                   help="folders holding <lang>/LC_MESSAGES/*.mo (default: the system's share/locale folders, "
                        "found with glob)")
    p.add_argument("--variants", action="store_true", help="also read regional variants: de_AT, de_CH, de@...")


def add_spm_args(p):
    g = p.add_argument_group("SentencePiece")
    g.add_argument("--vocab-size", type=at_least(2), default=8000, help="pieces per model (default 8000)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--joint", dest="joint", action="store_true", default=True,
                   help="one model for both languages (default)")
    m.add_argument("--separate", dest="joint", action="store_false", help="one model per language")
    g.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    g.add_argument("--max-len", type=at_least(0), default=128,
                   help="longest sequence in pieces; 0: no limit (default 128). Longer train pairs are dropped")
    g.add_argument("--truncate", action="store_true",
                   help="truncate instead: train and valid pairs on both sides, test on the source side only")
    g.add_argument("--character-coverage", type=coverage_type, default=1.0,
                   help="share of the characters the model covers, 0.98 to 1 (SentencePiece's "
                        "range; default 1)")
    g.add_argument("--input-sentence-size", type=at_least(0), default=1000000,
                   help="train SentencePiece on at most this many sentences (a seeded sample; "
                        "0: all)")
    g.add_argument("--normalization", default="identity",
                   help="SentencePiece normalization rule (default identity: the text is already NFC and "
                        "whitespace-normalised, and decoded output must match the raw references)")
    g.add_argument("--spm-seed", type=seed_type, default=1, help="SentencePiece's random seed, "
                   "0 to 4294967295 (default 1)")
    g.add_argument("--threads", type=at_least(1), default=1, help="training threads (1 keeps training reproducible)")


def add_binarize_args(p):
    p.add_argument("--joined-dictionary", action=argparse.BooleanOptionalAction, default=None,
                   help="one fairseq dictionary for both languages (default: yes after a --joint model)")
    p.add_argument("--workers", type=at_least(1), default=None, help="fairseq-preprocess workers (default min(4, cores))")


def build_parser():
    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("gettext", help="English -> LANG pairs from the system's gettext catalogs")
    add_gettext_args(p, required=True)
    p.add_argument("--src-lang", default="en", help="name of the source side (msgid) files (default en)")
    p.add_argument("--out", required=True, help="output folder: {train,valid,test}.{en,LANG}, meta.json")
    add_split_args(p)

    p = sub.add_parser("text", help="your own parallel text files, one sentence per line")
    p.add_argument("--src", required=True, help="source sentences, UTF-8, one per line")
    p.add_argument("--tgt", required=True, help="target sentences, line i translates line i of --src")
    p.add_argument("--src-lang", help="source language code (default: the --src file suffix, else 'src')")
    p.add_argument("--tgt-lang", help="target language code (default: the --tgt file suffix, else 'tgt')")
    p.add_argument("--out", required=True, help="output folder: {train,valid,test}.{SRC,TGT}, meta.json")
    add_split_args(p)

    p = sub.add_parser("spm", help="train SentencePiece and encode a corpus folder into pieces")
    p.add_argument("--data", required=True, help="folder written by gettext/text (or any {split}.{lang} files)")
    p.add_argument("--out", required=True, help="output folder: piece files, spm model(s), meta.json")
    p.add_argument("--src-lang", help="default: from the --data folder")
    p.add_argument("--tgt-lang", help="default: from the --data folder")
    add_spm_args(p)

    p = sub.add_parser("binarize", help="fairseq-preprocess piece files into a data-bin")
    p.add_argument("--data", required=True, help="folder with {split}.{lang} piece files (written by spm)")
    p.add_argument("--out", required=True, help="data-bin folder to write")
    p.add_argument("--src-lang", help="default: from the --data folder")
    p.add_argument("--tgt-lang", help="default: from the --data folder")
    add_binarize_args(p)

    p = parser.all_parser = sub.add_parser("all", help="gettext|text -> spm -> binarize, reusing up-to-date steps",
                       description="Writes WORK/data (raw splits), WORK/spm (pieces, models), WORK/data-bin. "
                                   "Each folder has a .stamp.json of the parameters and input checksums that "
                                   "built it; a step is skipped when its stamp and outputs match.")
    add_gettext_args(p, required=False)
    p.add_argument("--src", help="source text file (instead of --lang)")
    p.add_argument("--tgt", help="target text file (instead of --lang)")
    p.add_argument("--src-lang", help="source language code (gettext default en; text default: file suffix)")
    p.add_argument("--tgt-lang", help="target language code for --src/--tgt (default: file suffix)")
    p.add_argument("--work", required=True, help="working folder")
    p.add_argument("--force", action="store_true", help="rebuild every step")
    add_split_args(p)
    add_spm_args(p)
    add_binarize_args(p)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "gettext":
            prepare_gettext(args.lang, args.out, args.locale_dirs, args.variants, args.src_lang, args.valid_size,
                            args.test_size, args.split_seed, args.keep_all_targets, args.keep_identical)
        elif args.command == "text":
            prepare_text(args.src, args.tgt, args.out, args.src_lang, args.tgt_lang, args.valid_size,
                         args.test_size, args.split_seed, args.keep_all_targets, args.keep_identical)
        elif args.command == "spm":
            prepare_spm(args.data, args.out, src_lang=args.src_lang, tgt_lang=args.tgt_lang, **spm_params(args))
        elif args.command == "binarize":
            binarize(args.data, args.out, args.src_lang, args.tgt_lang, args.joined_dictionary, args.workers)
        elif args.command == "all":
            if bool(args.lang) == bool(args.src or args.tgt):
                parser.all_parser.error("give either --lang (gettext catalogs) or --src and --tgt (text files)")
            if not args.lang and not (args.src and args.tgt):
                parser.all_parser.error("--src and --tgt go together")
            run_all(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output folder that cannot be written
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
