"""Tests of scripts/prepare_data.py on tiny data made in tmp_path (no system catalogs, no network)."""
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "prepare_data.py"
sys.path.insert(0, str(SCRIPTS))
import prepare_data as prep  # noqa: E402


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path):
    return path.read_text(encoding="utf-8").splitlines()


def write_mo(path, entries):
    """A GNU .mo file (little endian, no hash table) holding `entries` {msgid: msgstr}.
    Plural entries: "sing\\0plural" -> "form0\\0form1"; context: "ctx\\x04msgid"."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in entries.items())
    n = len(items)
    key_table, value_table = 28, 28 + 8 * n
    data = 28 + 16 * n
    ids = strs = b""
    key_offs, value_offs = [], []
    for k, v in items:
        key_offs.append((len(k), len(ids)))
        ids += k + b"\0"
        value_offs.append((len(v), len(strs)))
        strs += v + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, key_table, value_table, 0, 0)
    out += b"".join(struct.pack("<2I", ln, data + off) for ln, off in key_offs)
    out += b"".join(struct.pack("<2I", ln, data + len(ids) + off) for ln, off in value_offs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out + ids + strs)
    return path


HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


# ---------------------------------------------------------------------------------------------------
# normalisation, cleaning, dedup


def test_normalize_text():
    assert prep.normalize_text("  Hello\n\tworld  \r\n") == "Hello world"
    assert prep.normalize_text("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert prep.normalize_text("\ufeffa\x00b\x1b[1mc") == "a b [1mc"
    assert prep.normalize_text("line one\nline two\n") == "line one line two"


def test_clean_pairs_filters_and_counts():
    stats = prep.collections.Counter()
    pairs = [("Open", "Öffnen"), ("  Open ", "Öffnen\n"), ("OK", "OK"), ("%s: %d", "%s : %d"),
             ("42", "zweiundvierzig"), ("", "leer"), ("File\nname", "Datei-\nname")]
    out = prep.clean_pairs(pairs, stats)
    assert out == [("Open", "Öffnen"), ("Open", "Öffnen"), ("File name", "Datei- name")]
    assert stats["dropped: source == target"] == 1
    assert stats["dropped: no letters"] == 2
    assert not prep.has_letter("%s: %-10d {0} %1$s %%") and prep.has_letter("%s files")
    assert stats["dropped: empty side"] == 1


def test_dedup_keeps_most_frequent_target_independent_of_order():
    pairs = [("Open", "Aufmachen"), ("Open", "Öffnen"), ("Open", "Öffnen"), ("Save", "Speichern"),
             ("Save", "Sichern"), ("Save", "Speichern"), ("Quit", "Verlassen"), ("Quit", "Beenden")]
    expected = [("Open", "Öffnen"), ("Quit", "Beenden"), ("Save", "Speichern")]  # tie: smallest string
    for seed in range(5):
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        stats = prep.collections.Counter()
        assert prep.dedup_pairs(shuffled, stats) == expected
        assert stats["dropped: duplicate pair"] == 2
        assert stats["dropped: other target for the same source"] == 3
    assert len(prep.dedup_pairs(pairs, prep.collections.Counter(), keep_all_targets=True)) == 6


@pytest.mark.parametrize("src,tgt,expected", [
    ("_Open", "Ö_ffnen", ("Open", "Öffnen")),
    ("Save _As", "Speichern _unter", ("Save As", "Speichern unter")),
    ("&Cancel", "&Abbrechen", ("Cancel", "Abbrechen")),
    ("_Open", "打开(_O)", ("Open", "打开")),
    ("Cu_t", "_Ausschneiden", ("Cut", "Ausschneiden")),
    ("_Quit", "Beenden", ("Quit", "Beenden")),
    ("file_name is missing", "file_name fehlt", None),       # identifier, not a mnemonic
    ("_exit failed", "_exit fehlgeschlagen", None),         # token kept verbatim in the target
    ("Tom & Jerry", "Tom & Jerry", None),
    ("&amp;Save", "&amp;Speichern", None),                  # HTML entity
    ("KP_Delete", "NB_Entf", None),
    ("Save _As", "_Speichern _unter", None),                # two markers in the target: unsafe
])
def test_strip_accelerators(src, tgt, expected):
    assert prep.strip_accelerators(src, tgt) == (expected or (src, tgt))


# ---------------------------------------------------------------------------------------------------
# splitting


def make_corpus(n=300):
    src, tgt = [], []
    for i in range(n):
        src.append(f"message number {i} about item {i % 17}")
        tgt.append(f"Nachricht Nummer {i} über Ding {i % 17}")
    # near-duplicates that must share a split
    src += ["Save", "Save:", "_Save", "save", "Open file", "Open File…"]
    tgt += ["Speichern", "Speichern:", "_Speichern", "speichern", "Datei öffnen", "Datei öffnen …"]
    # exact duplicates and a second target
    src += ["message number 1 about item 1", "message number 2 about item 2"]
    tgt += ["Nachricht Nummer 1 über Ding 1", "Meldung Nummer 2 über Ding 2"]
    return src, tgt


def split_files(out, langs=("en", "de")):
    return {s: (read(out / f"{s}.{langs[0]}"), read(out / f"{s}.{langs[1]}")) for s in prep.SPLITS}


def test_split_deterministic_and_independent_of_input_order(tmp_path):
    src, tgt = make_corpus()
    results = []
    for seed in (None, 1, 2):
        order = list(range(len(src)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        d = tmp_path / f"in{seed}"
        d.mkdir()
        write(d / "c.en", [src[i] for i in order])
        write(d / "c.de", [tgt[i] for i in order])
        sizes = prep.prepare_text(d / "c.en", d / "c.de", tmp_path / f"out{seed}", valid_size=20, test_size=30)
        assert sizes["test"] >= 30 and sizes["valid"] >= 20
        assert sum(sizes.values()) == len(src) - 2  # one exact duplicate, one second target
        results.append(split_files(tmp_path / f"out{seed}"))
    assert results[0] == results[1] == results[2]
    # files are sorted, aligned, and a source (or a near-duplicate of it) is never in two splits
    where = {}
    for split, (s, t) in results[0].items():
        assert len(s) == len(t) and s == sorted(s)
        for line in s:
            key = prep.split_key(line)
            assert where.setdefault(key, split) == split, (line, split, where[key])
    assert len({where[prep.split_key(x)] for x in ("Save", "Save:", "_Save", "save")}) == 1
    # a different seed gives a different split
    prep.prepare_text(tmp_path / "inNone/c.en", tmp_path / "inNone/c.de", tmp_path / "other", valid_size=20,
                      test_size=30, seed="7")
    assert split_files(tmp_path / "other")["test"] != results[0]["test"]


def test_split_fractions_and_size_errors():
    pairs = [(f"sentence {i}", f"Satz {i}") for i in range(1000)]
    splits = prep.split_pairs(pairs, 0.1, 0.2)
    assert 60 < len(splits["valid"]) < 140 and 150 < len(splits["test"]) < 250
    assert prep.split_pairs(list(reversed(pairs)), 0.1, 0.2) == splits
    with pytest.raises(prep.DataError, match="leave no training data") as e:
        prep.split_pairs(pairs[:10], 5, 5)
    # the sizes the error suggests work (it suggested fractions of 0.05, a second error for 10 pairs)
    assert "--valid-size 1 --test-size 1" in str(e.value)
    assert len(prep.split_pairs(pairs[:10], 1, 1)["train"]) == 8
    with pytest.raises(prep.DataError, match="it needs at least 3 pairs"):
        prep.split_pairs(pairs[:2], 1, 1)
    with pytest.raises(prep.DataError):
        prep.split_pairs(pairs, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------
# gettext


def make_locale(root):
    write_mo(root / "de/LC_MESSAGES/app.mo", {
        "": HEADER,
        "_Open": "Ö_ffnen",
        "Save _As…": "Speichern _unter …",
        "menu\x04_Quit": "_Beenden",                        # message context
        "%d file\0%d files": "%d Datei\0%d Dateien",         # plural: singular English + singular form
        "Line one\nline two\n": "Zeile eins\nZeile zwei\n",  # multi-line
        "OK": "OK",                                          # untranslated
        "%s: %s": "%s: %s",                                  # no letters
        "Close": "Schließen",
        "Color": "Farbe",
    })
    write_mo(root / "de/LC_MESSAGES/other.mo", {
        "": HEADER,
        "Close": "Schließen",
        "Color": "Farbe",
        "Help": "Hilfe",
    })
    write_mo(root / "de/LC_MESSAGES/third.mo", {"": HEADER, "Color": "Färbung", "Help": "Hilfe"})
    # a catalog whose Plural-Forms use form 1 for n == 1, a variant, another language, a broken file
    write_mo(root / "de_CH/LC_MESSAGES/app.mo", {
        "": "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n == 1 ? 1 : 0);\n",
        "%d apple\0%d apples": "%d Äpfel\0%d Apfel"})
    write_mo(root / "fr/LC_MESSAGES/app.mo", {"": HEADER, "Close": "Fermer"})
    (root / "de/LC_MESSAGES/broken.mo").write_bytes(b"not a catalog at all")
    return root


def test_read_mo(tmp_path):
    root = make_locale(tmp_path / "locale")
    entries = prep.read_mo(root / "de/LC_MESSAGES/app.mo")
    assert ("_Quit", "_Beenden") in entries
    assert ("%d file", "%d Datei") in entries
    assert not any(src.startswith("%d files") or "Dateien" in tgt for src, tgt in entries)
    assert not any(src == "" for src, _ in entries)  # header skipped
    assert prep.read_mo(root / "de_CH/LC_MESSAGES/app.mo") == [("%d apple", "%d Apfel")]


def test_find_mo_files(tmp_path):
    root = make_locale(tmp_path / "locale")
    names = [os.path.relpath(f, root) for f in prep.find_mo_files("de", [str(root)])]
    assert names == ["de/LC_MESSAGES/app.mo", "de/LC_MESSAGES/broken.mo", "de/LC_MESSAGES/other.mo",
                     "de/LC_MESSAGES/third.mo"]
    assert "de_CH/LC_MESSAGES/app.mo" in [os.path.relpath(f, root) for f in
                                          prep.find_mo_files("de", [str(root)], variants=True)]


def test_gettext_cli(tmp_path):
    root = make_locale(tmp_path / "locale")
    out = tmp_path / "data"
    r = run_cli("gettext", "--lang", "de", "--locale-dirs", root, "--out", out, "--valid-size", 1, "--test-size", 1)
    assert r.returncode == 0, r.stderr
    assert "broken.mo" in r.stderr and "Traceback" not in r.stderr  # skipped with a warning
    pairs = sorted(p for split in split_files(out).values() for p in zip(*split))
    assert pairs == sorted([
        ("Open", "Öffnen"), ("Save As…", "Speichern unter …"), ("Quit", "Beenden"), ("%d file", "%d Datei"),
        ("Line one line two", "Zeile eins Zeile zwei"), ("Close", "Schließen"),
        ("Color", "Farbe"),  # two catalogs say Farbe, one says Färbung
        ("Help", "Hilfe"),
    ])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["src_lang"] == "en" and meta["tgt_lang"] == "de" and meta["sizes"]["test"] == 1
    assert meta["stats"]["catalogs read"] == 3 and meta["stats"]["catalogs skipped"] == 1
    r = run_cli("gettext", "--lang", "xx", "--locale-dirs", root, "--out", tmp_path / "none")
    assert r.returncode == 2 and "error: no gettext catalogs" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------
# sentencepiece, binarize, all

WORDS = "the a cat dog sat on mat and ran to house big small red blue".split()
WÖRTER = "die eine Katze Hund saß auf Matte und lief zum Haus groß klein rot blau".split()


def make_piece_data(d, n_train=150):
    rng = random.Random(0)
    d.mkdir(parents=True, exist_ok=True)

    def sent(k):
        idx = [rng.randrange(len(WORDS)) for _ in range(k)]
        return " ".join(WORDS[i] for i in idx), " ".join(WÖRTER[i] for i in idx)

    for split, n in (("train", n_train), ("valid", 5), ("test", 5)):
        pairs = [sent(rng.randint(2, 4)) for _ in range(n)]  # <= 24 pieces even one per character
        pairs += [sent(40)]  # one long pair per split
        write(d / f"{split}.en", [s for s, _ in pairs])
        write(d / f"{split}.de", [t for _, t in pairs])
    return d


def lengths(path):
    return [len(line.split()) for line in read(path)]


def test_spm_filter_and_truncate(tmp_path):
    data = make_piece_data(tmp_path / "data")
    out = tmp_path / "spm"
    sizes = prep.prepare_spm(str(data), str(out), vocab_size=40, max_len=30, src_lang="en", tgt_lang="de")
    assert sizes == {"train": 150, "valid": 6, "test": 6}  # the long train pair is dropped, valid/test kept
    assert (out / "spm.model").exists()
    assert max(lengths(out / "train.en")) <= 30 and max(lengths(out / "train.de")) <= 30
    assert max(lengths(out / "test.de")) > 30 and max(lengths(out / "valid.en")) > 30
    assert read(out / "train.en")[0].startswith("▁")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["joint"] and meta["stats"]["train: dropped, longer than 30 pieces"] == 1

    out2 = tmp_path / "spm_trunc"
    sizes = prep.prepare_spm(str(data), str(out2), vocab_size=40, max_len=30, truncate=True, joint=False,
                             model_type="bpe", src_lang="en", tgt_lang="de")
    assert sizes == {"train": 151, "valid": 6, "test": 6}
    assert (out2 / "spm.en.model").exists() and (out2 / "spm.de.model").exists()
    for f in ("train.en", "train.de", "valid.en", "valid.de", "test.en"):
        assert max(lengths(out2 / f)) == 30, f
    assert max(lengths(out2 / "test.de")) > 30  # references are never cut

    # deterministic: a second run writes the same pieces
    prep.prepare_spm(str(data), str(tmp_path / "again"), vocab_size=40, max_len=30, src_lang="en", tgt_lang="de")
    for f in ("train.en", "test.de"):
        assert read(tmp_path / "again" / f) == read(out / f)
    assert (tmp_path / "again/spm.vocab").read_bytes() == (out / "spm.vocab").read_bytes()


def test_binarize_writes_data_bin(tmp_path):
    data = make_piece_data(tmp_path / "data", n_train=30)
    prep.prepare_spm(str(data), str(tmp_path / "spm"), vocab_size=40, max_len=30, src_lang="en", tgt_lang="de")
    r = run_cli("binarize", "--data", tmp_path / "spm", "--out", tmp_path / "bin", "--workers", 1)
    assert r.returncode == 0, r.stdout + r.stderr
    # the count leaves out fairseq's madeupword fillers (the dictionary is padded to a multiple of 8)
    words = [ln for ln in read(tmp_path / "bin/dict.en.txt") if not ln.startswith("madeupword")]
    assert f"en {len(words)} symbols + 4 special" in r.stdout
    assert (len(words) + 4) % 8 != 0  # else nothing was padded: the check would not test the count
    names = set(os.listdir(tmp_path / "bin"))
    assert set(prep.binarize_outputs("en", "de")) <= names
    assert read(tmp_path / "bin/dict.en.txt") == read(tmp_path / "bin/dict.de.txt")  # joined after a joint model


def test_all_reuses_steps_and_rebuilds_on_changed_parameters(tmp_path, monkeypatch, capsys):
    src, tgt = make_corpus(120)
    write(tmp_path / "c.en", src)
    write(tmp_path / "c.de", tgt)
    calls = []

    def fake_binarize(data_dir, out_dir, src_lang, tgt_lang, joined, workers, stamp=None):
        calls.append(joined)
        os.makedirs(out_dir, exist_ok=True)
        for f in prep.binarize_outputs(src_lang, tgt_lang):
            Path(out_dir, f).write_text("")
        prep.write_json(os.path.join(out_dir, prep.STAMP), stamp)

    monkeypatch.setattr(prep, "binarize", fake_binarize)
    work = tmp_path / "work"
    args = ["all", "--src", tmp_path / "c.en", "--tgt", tmp_path / "c.de", "--work", work, "--valid-size", 5,
            "--test-size", 5, "--vocab-size", 60]
    assert prep.main(list(map(str, args))) == 0
    assert calls == [True]
    model = (work / "spm/spm.model").stat().st_mtime_ns
    capsys.readouterr()

    assert prep.main(list(map(str, args))) == 0
    log = capsys.readouterr().out
    assert "text: up to date" in log and "spm: up to date" in log and "binarize: up to date" in log
    assert calls == [True] and (work / "spm/spm.model").stat().st_mtime_ns == model

    assert prep.main(list(map(str, args + ["--vocab-size", 50]))) == 0  # changed spm parameter
    log = capsys.readouterr().out
    assert "text: up to date" in log and "spm: up to date" not in log and calls == [True, True]

    os.rename(work, tmp_path / "moved")  # a moved work folder is still up to date (was: spm and
    args[args.index(work)] = tmp_path / "moved"  # binarize rebuilt, stamps held absolute paths)
    assert prep.main(list(map(str, args + ["--vocab-size", 50]))) == 0
    log = capsys.readouterr().out
    assert log.count("up to date") == 3 and calls == [True, True], log
    work = tmp_path / "moved"

    write(tmp_path / "c.de", tgt[:-1] + ["Etwas anderes"])  # changed input: everything rebuilds
    assert prep.main(list(map(str, args + ["--vocab-size", 50]))) == 0
    log = capsys.readouterr().out
    assert "up to date" not in log and len(calls) == 3


def test_inputs_are_never_overwritten(tmp_path):
    """A corpus named train.en given as --src with --out where it lies was cut to its train split
    (and `all` cut it again on every rerun); spm with --out equal to --data replaced the text by
    its pieces. Each is now refused before anything is written."""
    src, tgt = make_corpus(120)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / "train.en", src)
    write(corpus / "train.de", tgt)
    before = (corpus / "train.en").read_bytes()
    r = run_cli("text", "--src", corpus / "train.en", "--tgt", corpus / "train.de", "--out", corpus,
                "--valid-size", 5, "--test-size", 5)
    check_error(r, f"{corpus / 'train.en'} would be overwritten")
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.en").symlink_to(corpus / "train.en")  # the same file by another name
    write(work / "data" / "train.de", tgt)
    r = run_cli("all", "--src", work / "data" / "train.en", "--tgt", work / "data" / "train.de", "--work", work,
                "--valid-size", 5, "--test-size", 5, "--vocab-size", 60)
    check_error(r, "would be overwritten", "--work")
    assert (corpus / "train.en").read_bytes() == before and sorted(os.listdir(corpus)) == ["train.de", "train.en"]
    data = make_piece_data(tmp_path / "data")
    text = read(data / "valid.en")
    r = run_cli("spm", "--data", data, "--out", data, "--vocab-size", 40, "--src-lang", "en", "--tgt-lang", "de")
    check_error(r, "would be overwritten", "another folder than --data")
    assert read(data / "valid.en") == text and not (data / "spm.model").exists()


def test_switching_joint_and_separate_removes_the_other_models(tmp_path, capsys):
    """After --joint then --separate, the joint spm.model stayed beside the new models, and the
    commands that name spm/spm.model (plot_attention, fairseq-interactive) read it silently."""
    data = make_piece_data(tmp_path / "data")
    out = tmp_path / "spm"
    common = dict(vocab_size=30, max_len=30, src_lang="en", tgt_lang="de")
    prep.prepare_spm(str(data), str(out), joint=True, **common)
    assert (out / "spm.model").exists() and (out / "spm.vocab").exists()
    prep.prepare_spm(str(data), str(out), joint=False, **common)
    assert sorted(f for f in os.listdir(out) if f.startswith("spm")) == [
        "spm.de.model", "spm.de.vocab", "spm.en.model", "spm.en.vocab"]
    assert f"removed {out / 'spm.model'}" in capsys.readouterr().out
    prep.prepare_spm(str(data), str(out), joint=True, **common)
    assert sorted(f for f in os.listdir(out) if f.startswith("spm")) == ["spm.model", "spm.vocab"]


def test_lines_beyond_the_models_positions_are_announced(tmp_path, monkeypatch, capsys):
    """A valid or test line longer than the models' 1024 positions made fairseq-train (valid) or
    fairseq-generate (test, after the whole training) refuse the set; only --max-len was warned of."""
    data = make_piece_data(tmp_path / "data")  # one 40-word pair per split, > 40 pieces
    prep.prepare_spm(str(data), str(tmp_path / "spm"), vocab_size=40, max_len=0, src_lang="en", tgt_lang="de")
    longest = max(max(lengths(tmp_path / "spm" / f"{s}.{l}")) for s in ("valid", "test") for l in ("en", "de"))
    assert "line(s) of 1024 pieces or more" not in capsys.readouterr().err
    # fairseq counts </s>: a line of exactly MODEL_POSITIONS pieces is already refused
    monkeypatch.setattr(prep, "MODEL_POSITIONS", longest)
    prep.prepare_spm(str(data), str(tmp_path / "spm2"), vocab_size=40, max_len=0, src_lang="en", tgt_lang="de")
    err = capsys.readouterr().err
    assert f"line(s) of {longest} pieces or more" in err, err
    monkeypatch.setattr(prep, "MODEL_POSITIONS", longest + 1)
    prep.prepare_spm(str(data), str(tmp_path / "spm3"), vocab_size=40, max_len=0, src_lang="en", tgt_lang="de")
    assert "pieces or more" not in capsys.readouterr().err
    monkeypatch.setattr(prep, "MODEL_POSITIONS", 40)
    prep.prepare_spm(str(data), str(tmp_path / "spm4"), vocab_size=40, max_len=0, src_lang="en", tgt_lang="de")
    err = capsys.readouterr().err
    assert "valid has 1 line(s) of 40 pieces or more" in err and "fairseq-train will refuse" in err
    assert "test has 1 line(s) of 40 pieces or more" in err and "fairseq-generate will refuse" in err


# ---------------------------------------------------------------------------------------------------
# errors: `error: ...` naming the file (and line), exit status 2, no traceback


@pytest.mark.parametrize("args, message", [
    (["--spm-seed", -5], "--spm-seed: must be at least 0"),  # were TypeErrors inside SentencePiece
    (["--spm-seed", 2**33], "--spm-seed: must be at most 4294967295"),
    (["--input-sentence-size", -1], "--input-sentence-size: must be at least 0"),  # a ValueError
    (["--character-coverage", 2], "--character-coverage: must be at most 1"),  # a C++ source line
    (["--threads", 0], "--threads: must be at least 1"),
])
def test_spm_options_out_of_range_are_refused(tmp_path, args, message):
    r = run_cli("spm", "--data", tmp_path, "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("binarize", "--data", tmp_path, "--out", tmp_path / "o", "--workers", -1)
    assert "--workers: must be at least 1" in r.stderr and "Traceback" not in r.stderr  # was fairseq's


def check_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") or "\nerror: " in r.stderr, r.stderr
    for needle in needles:
        assert str(needle) in r.stderr, (needle, r.stderr)


def test_error_mismatched_line_counts(tmp_path):
    src = write(tmp_path / "a.en", ["one", "two", "three"])
    tgt = write(tmp_path / "a.de", ["eins", "zwei", "drei", "vier"])
    r = run_cli("text", "--src", src, "--tgt", tgt, "--out", tmp_path / "o", "--valid-size", 1, "--test-size", 1)
    check_error(r, "line count mismatch", src, f"{tgt}:4")


def test_error_empty_corpus(tmp_path):
    src = write(tmp_path / "e.en", [])
    tgt = write(tmp_path / "e.de", [])
    check_error(run_cli("text", "--src", src, "--tgt", tgt, "--out", tmp_path / "o"), src, "empty")
    # lines, but nothing left after cleaning
    src = write(tmp_path / "n.en", ["OK", "123", ""])
    tgt = write(tmp_path / "n.de", ["OK", "456", "leer"])
    check_error(run_cli("text", "--src", src, "--tgt", tgt, "--out", tmp_path / "o"),
                "no usable sentence pairs", src, tgt)


def test_error_missing_or_unreadable_file(tmp_path):
    tgt = write(tmp_path / "a.de", ["eins"])
    check_error(run_cli("text", "--src", tmp_path / "missing.en", "--tgt", tgt, "--out", tmp_path / "o"),
                tmp_path / "missing.en", "no such file")
    check_error(run_cli("text", "--src", tmp_path, "--tgt", tgt, "--out", tmp_path / "o"), tmp_path, "directory")
    check_error(run_cli("spm", "--data", tmp_path / "nodata", "--out", tmp_path / "o"), tmp_path / "nodata")
    check_error(run_cli("binarize", "--data", tmp_path / "nodata", "--out", tmp_path / "o"), tmp_path / "nodata")
    if os.geteuid() != 0:  # root reads anything
        locked = write(tmp_path / "locked.en", ["one"])
        locked.chmod(0)
        check_error(run_cli("text", "--src", locked, "--tgt", tgt, "--out", tmp_path / "o"), locked, "permission")


def test_error_invalid_utf8(tmp_path):
    src = write(tmp_path / "a.en", ["good", "also good", "fine"])
    tgt = tmp_path / "a.de"
    tgt.write_bytes("gut\n".encode() + "gr\u00fcn\n".encode("latin-1") + b"prima\n")
    check_error(run_cli("text", "--src", src, "--tgt", tgt, "--out", tmp_path / "o"), f"{tgt}:2:", "UTF-8")
    # also when the bad file reaches spm directly
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.en", ["x", "y"])
    (data / "train.de").write_bytes(b"ok\n\xff\xfe\n")
    check_error(run_cli("spm", "--data", data, "--out", tmp_path / "o", "--src-lang", "en", "--tgt-lang", "de"),
                f"{data / 'train.de'}:2:")


def test_error_bare_cr_line_endings(tmp_path):
    """A file with classic Mac OS line endings (bare CR) read as one line: the corpus had "only 1
    pairs" with no word of why. Now named, both when one file and when both have them; CRLF files
    and a stray CR inside a line (cleaned to a space) still read."""
    n = 40
    src_lines, tgt_lines = make_corpus(n)
    mac_src, mac_tgt = tmp_path / "mac.en", tmp_path / "mac.de"
    mac_src.write_bytes("\r".join(src_lines).encode() + b"\r")
    mac_tgt.write_bytes("\r".join(tgt_lines).encode() + b"\r")
    unix_tgt = write(tmp_path / "unix.de", tgt_lines)
    for src, tgt in ((mac_src, mac_tgt), (mac_src, unix_tgt)):
        check_error(run_cli("text", "--src", src, "--tgt", tgt, "--out", tmp_path / "o"),
                    f"{mac_src}: its lines end in a bare carriage return", "tr '\\r' '\\n'")
        assert not (tmp_path / "o").exists()
    crlf_src, crlf_tgt = tmp_path / "crlf.en", tmp_path / "crlf.de"
    crlf_src.write_bytes("".join(f"{s}\r\n" for s in src_lines).encode())
    stray = list(tgt_lines)
    stray[3] = stray[3].replace(" ", "\r", 1)
    crlf_tgt.write_bytes("".join(f"{t}\r\n" for t in stray).encode())
    assert prep.read_parallel(crlf_src, crlf_tgt) == [(s, t) for s, t in zip(src_lines, stray)]


def argument_error(capsys, argv):
    """prepare_data.main(argv) stops in argparse: exit status 2, one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        prep.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_error_bad_sizes_up_front(tmp_path, capsys):
    """An empty valid split crashes fairseq-train (`cannot mmap an empty file`), an empty test split
    cannot be binarised: 0 is refused, as are --vocab-size < 2 and a negative --max-len, before any
    step runs."""
    src, tgt = make_corpus(60)
    write(tmp_path / "c.en", src)
    write(tmp_path / "c.de", tgt)
    work = tmp_path / "work"
    base = ["all", "--src", tmp_path / "c.en", "--tgt", tmp_path / "c.de", "--work", work]
    for option, value, needle in (("--valid-size", 0, "expected a count >= 1 or a fraction in (0, 1)"),
                                  ("--test-size", 0, "expected a count >= 1 or a fraction in (0, 1)"),
                                  ("--valid-size", "0.0", "expected a count >= 1 or a fraction in (0, 1)"),
                                  ("--vocab-size", 0, "must be at least 2, got '0'"),
                                  ("--max-len", -1, "must be at least 0, got '-1'")):
        line = argument_error(capsys, base + [option, value])
        assert f"error: argument {option}: {needle}" in line, line
        assert not work.exists()  # nothing ran
    with pytest.raises(SystemExit):
        prep.main(["text", "--src", "a", "--tgt", "b", "--out", str(tmp_path / "o"), "--valid-size", "0"])
    # a fraction too small for the corpus: no pairs in the split, refused before anything is written
    pairs = [(f"sentence {i}", f"Satz {i}") for i in range(20)]
    with pytest.raises(prep.DataError, match="--valid-size 0.001 leaves no valid pairs of 20"):
        prep.split_pairs(pairs, 0.001, 0.5)
