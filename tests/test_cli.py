"""The CLI end to end, and every bad input of the foundation issue: one clear line, non-zero exit,
nothing already stored lost."""
from __future__ import annotations

import json

import pytest

from routelens.cli import main
from routelens.store import Store


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def texts(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"text": "hello world", "lang": "en", "align_id": "a1"}\n'
                 '{"text": "hallo Welt", "lang": "de", "align_id": "a1", "label": "greeting"}\n', encoding="utf-8")
    return p


@pytest.fixture()
def store_with_run(tmp_path, texts, capsys):
    db = tmp_path / "s.duckdb"
    code, out, err = run_cli(capsys, "trace", "tiny:olmoe", "--input", texts, "--db", db, "--json")
    assert code == 0, err
    return db, json.loads(out)


def _assert_one_line_error(code, err):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("routelens: error: ")
    assert "Traceback" not in err


def test_trace_runs_export_import_roundtrip(tmp_path, store_with_run, capsys):
    db, info = store_with_run
    assert info["status"] == "complete" and info["family"] == "olmoe" and info["n_sequences"] == 2
    code, out, _ = run_cli(capsys, "runs", "--db", db, "--json")
    runs = json.loads(out)
    assert code == 0 and [r["run_id"] for r in runs] == [info["run_id"]]
    seqs = Store.open(db).run(info["run_id"]).sequences()
    assert sorted(seqs["lang"].to_list()) == ["de", "en"]
    code, out, _ = run_cli(capsys, "export", info["run_id"], "--db", db, "--parquet", tmp_path / "exp", "--json")
    assert code == 0
    path = json.loads(out)["path"]
    code, out, _ = run_cli(capsys, "import", path, "--db", tmp_path / "other.duckdb", "--json")
    assert code == 0
    (imported,) = json.loads(out)
    a = Store.open(db).run(info["run_id"]).routing().drop("run_id").sort(["seq_id", "pos", "layer", "rank"])
    b = Store.open(tmp_path / "other.duckdb").run(imported["run_id"]).routing().drop("run_id").sort(
        ["seq_id", "pos", "layer", "rank"])
    assert a.equals(b)


def _bad_inputs(tmp_path):
    """(name, argv builder) for each bad input the issue lists."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("first\n\nthird\n")
    longtext = tmp_path / "long.txt"
    longtext.write_text("word " * 400 + "\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ok\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text("fine text\n")
    notdb = tmp_path / "notes.txt"
    notdb.write_text("this is not a database\n")
    dense = tmp_path / "dense_model"
    from transformers import LlamaConfig, LlamaForCausalLM

    from routelens.tiny import byte_tokenizer

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert_model"
    BertModel(BertConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)).save_pretrained(bert)
    byte_tokenizer().save_pretrained(bert)
    return {
        "model without MoE layers": (["trace", dense, "--input", good], "MoE"),
        "missing model path": (["trace", tmp_path / "nope", "--input", good], "does not exist"),
        "unsupported architecture": (["trace", bert, "--input", good], "supported: olmoe"),
        "unsupported tiny family": (["trace", "tiny:bert", "--input", good], "bert"),
        "empty input file": (["trace", "tiny:olmoe", "--input", empty], "empty"),
        "empty line": (["trace", "tiny:olmoe", "--input", blank], ":2: empty line"),
        "text longer than the context": (["trace", "tiny:olmoe", "--input", longtext, "--max-tokens", "64"],
                                         "--overflow chunk"),
        "non-UTF-8 bytes": (["trace", "tiny:olmoe", "--input", latin1], "UTF-8"),
        "missing input file": (["trace", "tiny:olmoe", "--input", tmp_path / "nope.txt"], "does not exist"),
        "--db not a store": (["trace", "tiny:olmoe", "--input", good, "--db-override", notdb], "not a routelens store"),
        "run id that does not exist": (["export", "999", "--parquet", tmp_path / "x"], "999"),
        "run name that does not exist": (["export", "no-such-run", "--parquet", tmp_path / "x"], "no-such-run"),
    }


def test_bad_inputs_give_one_line_and_lose_nothing(tmp_path, store_with_run, capsys):
    db, info = store_with_run
    before = Store.open(db).run(info["run_id"]).routing()
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()  # building the fixtures prints save_pretrained progress; not the CLI's
    for name, (argv, needle) in cases.items():
        argv = list(argv)
        if "--db-override" in argv:
            i = argv.index("--db-override")
            argv[i] = "--db"
        else:
            argv += ["--db", db]
        code, out, err = run_cli(capsys, *argv)
        _assert_one_line_error(code, err)
        assert needle in err, (name, err)
        after = Store.open(db)
        assert after.run(info["run_id"]).routing().equals(before), name
    assert [r.run_id for r in Store.open(db).runs() if r.status == "complete"] == [info["run_id"]]


def test_newer_schema_is_refused(tmp_path, store_with_run, capsys):
    import duckdb

    db, info = store_with_run
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    code, out, err = run_cli(capsys, "runs", "--db", db)
    _assert_one_line_error(code, err)
    assert "newer" in err


def test_old_transformers_is_refused_with_one_line():
    from routelens._compat import check_transformers
    from routelens.errors import VersionError

    with pytest.raises(VersionError) as exc:
        check_transformers("4.57.6")
    assert "4.57.6" in str(exc.value) and "\n" not in str(exc.value)
    assert check_transformers("5.23.0") == "5.23.0"
