"""Data as people have it: pairs()/responses() read JSONL, JSON, CSV, Parquet, datasets'
save_to_disk folders and Hub-layout folders, written here with pyarrow and `datasets`;
the field mapping and the presets (rewardbench, autoj, hh-rlhf); bad rows named by file
and row; an end-to-end evaluate() on a Parquet file."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, disable_progress_bars

from algebra import AlgError, Options
from algebra.errors import AlgIOError
from algebra.interpreter import Session
from algebra.reward import engine
from algebra.reward.data import read_pairs, read_responses
from algebra.reward.formats import AUTOJ_GROUPS, preset_table
from algebra.source import Source

disable_progress_bars()
ROOT = Path(__file__).resolve().parent.parent

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math-prm", "id": 7},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "subset": "alpacaeval-easy", "id": 8},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "subset": "alpacaeval-easy", "id": 9},
]
EXPECTED = [(r["prompt"], r["chosen"], r["rejected"], r["subset"], r["id"]) for r in PAIRS]


def check(ws: Path, text: str):
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    return session.check(Source(text, "t.alg")).result


def error(ws: Path, text: str, caret: str) -> AlgError:
    with pytest.raises(AlgError) as e:
        check(ws, text)
    assert isinstance(e.value, AlgIOError), e.value
    assert e.value.span is not None and e.value.span.text() == caret, (e.value.message, e.value.span)
    return e.value


def got(pairs) -> list[tuple]:
    return [(r.prompt, r.chosen, r.rejected, r.subset, r.id) for r in pairs.rows]


# ---- the formats -------------------------------------------------------------------------------


def write_all(tmp: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows in every format alg reads, written by datasets and pyarrow."""
    ds = Dataset.from_list(rows)
    out = {}
    out["jsonl"] = tmp / "p.jsonl"
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["json-list"] = tmp / "list.json"
    out["json-list"].write_text(json.dumps(rows, indent=1))
    out["json-datasets"] = tmp / "ds.json"  # datasets' to_json: one row per line
    ds.to_json(out["json-datasets"])
    out["csv"] = tmp / "p.csv"
    ds.to_csv(out["csv"], index=False)
    out["parquet"] = tmp / "p.parquet"
    ds.to_parquet(out["parquet"])
    out["saved"] = tmp / "saved"
    ds.save_to_disk(out["saved"])
    out["saved-dict"] = tmp / "saved_dict"
    DatasetDict(train=Dataset.from_list(rows[:1]), test=ds).save_to_disk(out["saved-dict"])
    hub = tmp / "hub"
    (hub / "data").mkdir(parents=True)
    Dataset.from_list(rows[:1]).to_parquet(hub / "data" / "train-00000-of-00001.parquet")
    Dataset.from_list(rows[:2]).to_parquet(hub / "data" / "test-00000-of-00002.parquet")
    Dataset.from_list(rows[2:]).to_parquet(hub / "data" / "test-00001-of-00002.parquet")
    (hub / "README.md").write_text("---\nlicense: mit\n---\n")
    out["hub"] = hub
    by_folder = tmp / "hub_folders"
    for split, part in (("train", rows[:1]), ("test", rows)):
        (by_folder / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), by_folder / split / "0000.parquet")
    out["hub-folders"] = by_folder
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-datasets", "csv", "parquet", "saved", "saved-dict",
                                  "hub", "hub-folders"])
def test_every_format_reads_the_exact_rows(tmp_path, kind):
    files = write_all(tmp_path, PAIRS)
    split = "test" if kind in ("saved-dict", "hub", "hub-folders") else None
    pairs = read_pairs(files[kind], kind, split=split)
    assert got(pairs) == EXPECTED
    assert [r.line for r in pairs.rows] == [1, 2, 3]
    # responses() reads the same files: the chosen column as the response
    resp = read_responses(files[kind], kind, fields={"response": "chosen"}, split=split)
    assert resp.points() == [(r["prompt"], r["chosen"]) for r in PAIRS]
    assert [r.raw["id"] for r in resp.rows] == [7, 8, 9]  # every column kept for score()


def test_split_selection(tmp_path):
    files = write_all(tmp_path, PAIRS)
    for kind in ("saved-dict", "hub", "hub-folders"):
        assert got(read_pairs(files[kind], kind, split="train")) == EXPECTED[:1]
    ws = tmp_path
    err = error(ws, 'pairs("hub")', '"hub"')
    assert "holds several splits ('test', 'train')" in err.message or "holds several splits ('train', 'test')" \
        in err.message
    err = error(ws, 'pairs("hub", split="tset")', '"tset"')
    assert "has no split 'tset'; did you mean 'test'?" in err.message
    err = error(ws, 'pairs("saved_dict", split="dev")', '"dev"')
    assert "has no split 'dev'" in err.message and "'train'" in err.message
    err = error(ws, 'pairs("p.parquet", split="test")', '"test"')
    assert "is one file, which has no splits" in err.message
    # a folder with one split needs no split=
    assert got(check(ws, 'pairs("saved")')) == EXPECTED


def test_rewardbench_preset_takes_the_filtered_split(tmp_path):
    hub = tmp_path / "rb" / "data"
    hub.mkdir(parents=True)
    Dataset.from_list(PAIRS).to_parquet(hub / "filtered-00000-of-00001.parquet")
    Dataset.from_list(PAIRS[:1]).to_parquet(hub / "raw-00000-of-00001.parquet")
    assert got(check(tmp_path, 'pairs("rb", format="rewardbench")')) == EXPECTED
    assert got(check(tmp_path, 'pairs("rb", format="rewardbench", split="raw")')) == EXPECTED[:1]
    err = error(tmp_path, 'pairs("rb")', '"rb"')  # no preset: no split is preferred
    assert "choose one with split=" in err.message
    err = error(tmp_path, 'pairs("rb", format="reward-bench")', '"reward-bench"')
    assert "did you mean 'rewardbench'?" in err.message


# ---- the field mapping ------------------------------------------------------------------------


def test_field_mapping_with_split(tmp_path):
    rows = [{"question": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"],
             "category": r["subset"], "extra": [1, 2]} for r in PAIRS]
    hub = tmp_path / "arena" / "data"
    hub.mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(hub / "test-00000-of-00001.parquet")
    Dataset.from_list(rows[:1]).to_parquet(hub / "train-00000-of-00001.parquet")
    p = check(tmp_path, 'pairs("arena", prompt="question", chosen="response_a", rejected="response_b", '
                        'subset="category", split="test")')
    assert got(p) == [e[:4] + (None,) for e in EXPECTED]  # no 'id' column: none
    # CSV reads the named text columns as text even when they look like numbers
    Dataset.from_list([{"q": "12", "a": "3", "b": "4"}]).to_csv(tmp_path / "n.csv", index=False)
    p = check(tmp_path, 'pairs("n.csv", prompt="q", chosen="a", rejected="b")')
    assert got(p) == [("12", "3", "4", None, None)]


def test_an_unknown_column_lists_the_columns(tmp_path):
    rows = [{"question": "q", "response_a": "a", "response_b": "b"}]
    Dataset.from_list(rows).to_parquet(tmp_path / "a.parquet")
    err = error(tmp_path, 'pairs("a.parquet", prompt="questoin", chosen="response_a", rejected="response_b")',
                '"questoin"')
    assert "'a.parquet' has no column 'questoin' (for prompt); did you mean 'question'?" in err.message
    assert "its columns: 'question', 'response_a', 'response_b'" in err.message
    # the default names, absent: said at the path
    err = error(tmp_path, 'pairs("a.parquet")', '"a.parquet"')
    assert "has no column 'prompt'" in err.message and "'question'" in err.message
    # an optional column the recipe names must be there
    err = error(tmp_path, 'pairs("a.parquet", prompt="question", chosen="response_a", rejected="response_b", '
                          'subset="category")', '"category"')
    assert "no column 'category' (for subset)" in err.message
    # JSONL has no schema: the row says what it lacks
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    err = error(tmp_path, 'pairs("a.jsonl", prompt="questoin", chosen="response_a", rejected="response_b")',
                '"questoin"')
    assert "a.jsonl:1: row has no 'questoin' field; did you mean 'question'?" in err.message


def test_bad_rows_name_file_and_row(tmp_path):
    bad = [dict(PAIRS[0]), dict(PAIRS[1], prompt=3), dict(PAIRS[2])]
    pq.write_table(pa.Table.from_pylist(bad[:1] + bad[2:] + [dict(PAIRS[1], chosen=None)]), tmp_path / "n.parquet")
    err = error(tmp_path, 'pairs("n.parquet")', '"n.parquet"')
    assert "n.parquet: row 3: 'chosen' must be text, not null" in err.message
    (tmp_path / "b.json").write_text(json.dumps(bad))
    err = error(tmp_path, 'pairs("b.json")', '"b.json"')
    assert "b.json: row 2: 'prompt' must be text or a list of messages, not 3" in err.message
    (tmp_path / "m.json").write_text(json.dumps([PAIRS[0], {"prompt": "x", "chosen": "y"}]))
    err = error(tmp_path, 'pairs("m.json")', '"m.json"')
    assert "m.json: row 2: row has no 'rejected' field" in err.message
    (tmp_path / "s.csv").write_text("prompt,chosen,rejected,subset\na,b,c,d\ne,f,g,7\n")
    assert got(check(tmp_path, 'pairs("s.csv")'))[1][3] == "7"  # subset is a text column in CSV
    pq.write_table(pa.Table.from_pylist([dict(PAIRS[0], subset=5)]), tmp_path / "s.parquet")
    err = error(tmp_path, 'pairs("s.parquet")', '"s.parquet"')
    assert "s.parquet: row 1: 'subset' must be text, not 5" in err.message
    # in a folder, the file inside it and the row in that file
    hub = tmp_path / "h" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(PAIRS[:2]), hub / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([PAIRS[2], dict(PAIRS[0], rejected=None)]), hub / "test-00001-of-00002.parquet")
    err = error(tmp_path, 'pairs("h")', '"h"')
    assert "h/data/test-00001-of-00002.parquet: row 2: 'rejected' must be text, not null" in err.message
    # a file that is not Parquet
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    err = error(tmp_path, 'pairs("x.parquet")', '"x.parquet"')
    assert "cannot read 'x.parquet'" in err.message
    (tmp_path / "empty").mkdir()
    err = error(tmp_path, 'pairs("empty")', '"empty"')
    assert "a folder with no data files" in err.message


def test_chat_message_prompts(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rows = [{"prompt": conv, "chosen": "Hello.", "rejected": "Go away."},
            {"prompt": [{"role": "user", "content": "One turn."}], "chosen": "a", "rejected": "b"}]
    Dataset.from_list(rows).to_parquet(tmp_path / "c.parquet")
    p = read_pairs(tmp_path / "c.parquet", "c.parquet")
    assert p.rows[0].prompt == (("system", "Be brief."), ("user", "Hi?"))
    assert p.rows[1].prompt == "One turn."  # one user turn is the plain prompt
    # Parquet gives every message every key any message has: the missing ones are not fields
    tool = [{"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": None, "name": "calc"}, {"role": "user", "content": "And?"}]
    Dataset.from_list([{"prompt": tool, "chosen": "5", "rejected": "6"}]).to_parquet(tmp_path / "t.parquet")
    p = read_pairs(tmp_path / "t.parquet", "t.parquet")
    from algebra.reward.data import to_messages

    assert to_messages(p.rows[0].prompt) == tool
    # a list that is not messages
    pq.write_table(pa.Table.from_pylist([{"prompt": ["a", "b"], "chosen": "x", "rejected": "y"}]), tmp_path / "l.parquet")
    err = error(tmp_path, 'pairs("l.parquet")', '"l.parquet"')
    assert "l.parquet: row 1: 'prompt' must be text or a list of messages" in err.message


# ---- the presets ----------------------------------------------------------------------------


AUTOJ = [
    {"prompt": "p0", "response 1": "r1a", "response 2": "r2a", "label": 0, "scenario": "math_reasoning"},
    {"prompt": "p1", "response 1": "r1b", "response 2": "r2b", "label": 1, "scenario": "code_generation"},
    {"prompt": "p2", "response 1": "r1c", "response 2": "r2c", "label": 2, "scenario": "writing_email"},
    {"prompt": "p3", "response 1": "r1d", "response 2": "r2d", "label": 1, "scenario": "writing_email"},
    {"prompt": "p4", "response 1": "r1e", "response 2": "r2e", "label": 0,
     "scenario": "solving_exam_question_with_math"},
]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_autoj_labels_ties_and_groups(tmp_path, suffix):
    path = tmp_path / f"autoj.{suffix}"
    ds = Dataset.from_list(AUTOJ)
    {"jsonl": lambda: ds.to_json(path), "parquet": lambda: ds.to_parquet(path),
     "csv": lambda: ds.to_csv(path, index=False)}[suffix]()
    p = check(tmp_path, f'pairs("autoj.{suffix}", format="autoj")')
    assert [(r.prompt, r.chosen, r.rejected, r.subset) for r in p.rows] == [
        ("p0", "r1a", "r2a", "Math"), ("p1", "r2b", "r1b", "Code"), ("p3", "r2d", "r1d", "Other"),
        ("p4", "r1e", "r2e", "Math")]
    assert [r.line for r in p.rows] == [1, 2, 4, 5]  # the tie (row 3) dropped; rows keep their numbers


def test_autoj_groups_are_dogerms():
    assert AUTOJ_GROUPS == {"Math": ("math_reasoning", "solving_exam_question_with_math"),
                            "Code": ("code_simplification", "code_generation", "explaining_code",
                                     "code_to_code_translation", "code_correction_rewriting")}


def test_autoj_bad_rows(tmp_path):
    Dataset.from_list(AUTOJ[:2] + [dict(AUTOJ[0], label=3)]).to_parquet(tmp_path / "a.parquet")
    err = error(tmp_path, 'pairs("a.parquet", format="autoj")', '"a.parquet"')
    assert "a.parquet: row 3: 'label' must be 0 ('response 1' preferred), 1 ('response 2' preferred) or 2 " \
           "(a tie), not 3" in err.message
    err = error(tmp_path, 'pairs("a.parquet", format="autoj", chosen="x")', '"x"')
    assert "chosen= does not apply to format=\"autoj\"" in err.message
    Dataset.from_list([dict(AUTOJ[0], label=2)]).to_parquet(tmp_path / "t.parquet")
    err = error(tmp_path, 'pairs("t.parquet", format="autoj")', '"t.parquet"')
    assert "holds no rows (every pair was a tie)" in err.message
    Dataset.from_list([{k: v for k, v in AUTOJ[0].items() if k != "scenario"}]).to_parquet(tmp_path / "s.parquet")
    err = error(tmp_path, 'pairs("s.parquet", format="autoj")', '"s.parquet"')
    assert "no column 'scenario' (for subset)" in err.message
    # subset= renames the scenario column; the grouping stays
    Dataset.from_list([{("kind" if k == "scenario" else k): v for k, v in AUTOJ[1].items()}]).to_parquet(
        tmp_path / "k.parquet")
    assert check(tmp_path, 'pairs("k.parquet", format="autoj", subset="kind")').rows[0].subset == "Code"


H1 = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"


def test_hh_rlhf_splits_multi_turn_transcripts(tmp_path):
    rows = [{"chosen": H1 + " 6.", "rejected": H1 + " 7, I think."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:"}]
    hub = tmp_path / "hh"
    (hub / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(hub / "data" / "test-00000-of-00001.parquet")
    Dataset.from_list(rows[1:]).to_parquet(hub / "data" / "train-00000-of-00001.parquet")
    p = check(tmp_path, 'pairs("hh", format="hh-rlhf")')  # the test split, by the preset
    assert p.rows[0].prompt == (("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"))
    assert (p.rows[0].chosen, p.rows[0].rejected) == ("6.", "7, I think.")
    assert (p.rows[1].prompt, p.rows[1].chosen, p.rows[1].rejected) == ("Hi", "Hello!", "")
    assert len(check(tmp_path, 'pairs("hh", format="hh-rlhf", split="train")').rows) == 1
    # a generate() over these prompts gets the conversation as chat messages
    from algebra.reward.data import to_messages

    assert to_messages(p.rows[0].prompt)[-1] == {"role": "user", "content": "And 3+3?"}


def test_hh_rlhf_rows_that_share_no_prompt_are_dropped_with_a_warning(tmp_path):
    apart = {"chosen": H1 + " 6.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5.\n\nHuman: And 3+3?"
                                              "\n\nAssistant: 6."}
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, apart, apart, good)))
    warnings = []
    session = Session(Options(device="cpu", out=lambda _: None, warn=warnings.append), tmp_path, mode="file")
    p = session.check(Source('pairs("hh.jsonl", format="hh-rlhf")', "t.alg")).result
    assert [r.line for r in p.rows] == [1, 4]
    said = [w.message for w in warnings if "dropped" in w.message]
    assert said == ["2 row(s) of 'hh.jsonl' dropped: their 'chosen' and 'rejected' transcripts differ before the "
                    "final assistant turn, so they share no prompt (the first: hh.jsonl:2)"]
    (tmp_path / "all.jsonl").write_text(json.dumps(apart) + "\n")
    err = error(tmp_path, 'pairs("all.jsonl", format="hh-rlhf")', '"all.jsonl"')
    assert "holds no rows (no pair shared its prompt)" in err.message


@pytest.mark.parametrize("chosen, rejected, message", [
    ("\n\nHuman: Hi", "\n\nHuman: Hi\n\nAssistant: x", "'chosen' does not end with an assistant turn"),
    ("just text", "\n\nHuman: Hi\n\nAssistant: x", "'chosen' has no"),
    ("\n\nHuman: Hi\n\nAssistant: x", 5, "'rejected' must be a transcript (text), not 5"),
])
def test_hh_rlhf_bad_transcripts(tmp_path, chosen, rejected, message):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": chosen, "rejected": rejected}]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = error(tmp_path, 'pairs("hh.jsonl", format="hh-rlhf")', '"hh.jsonl"')
    assert err.message.startswith("hh.jsonl:2: ") and message in err.message


def test_hh_rlhf_gzip_jsonl_as_the_hub_ships_it(tmp_path):
    import gzip

    folder = tmp_path / "hh" / "helpful-base"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.write(json.dumps({"chosen": f"\n\nHuman: {split}?\n\nAssistant: yes",
                                "rejected": f"\n\nHuman: {split}?\n\nAssistant: no"}) + "\n")
    p = check(tmp_path, 'pairs("hh/helpful-base", format="hh-rlhf")')
    assert [(r.prompt, r.chosen, r.rejected) for r in p.rows] == [("test?", "yes", "no")]


# ---- responses() -------------------------------------------------------------------------------


def test_responses_field_mapping_and_raw_rows(tmp_path):
    day = datetime.date(2024, 5, 1)
    rows = [{"q": "a?", "answer": "yes", "when": day}, {"q": "a?", "answer": "no", "when": day}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    r = check(tmp_path, 'responses("r.parquet", prompt="q", response="answer")')
    assert r.by_prompt() == {"a?": ["yes", "no"]}
    assert r.rows[0].raw == {"q": "a?", "answer": "yes", "when": "2024-05-01"}  # JSON can hold it
    err = error(tmp_path, 'responses("r.parquet", prompt="question", response="answer")', '"question"')
    assert "no column 'question' (for prompt)" in err.message and "its columns: 'q', 'answer', 'when'" in err.message


def test_only_the_needed_columns_are_read(tmp_path):
    from algebra.reward.formats import open_source

    files = write_all(tmp_path, PAIRS)
    for kind in ("parquet", "csv", "saved"):
        src = open_source(files[kind], kind, None, None, None)
        assert src.columns() == ["prompt", "chosen", "rejected", "subset", "id"]
        assert [row for _, _, row in src.rows(["prompt", "id"])] == [{"prompt": r["prompt"], "id": r["id"]}
                                                                   for r in PAIRS]


def test_generate_prompts_from_a_parquet_file(tmp_path):
    from algebra.reward.data import read_prompts

    Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}], "n": 1}, {"prompt": [{"role": "user", "content": "b"},
                                                           {"role": "assistant", "content": "c"},
                                                           {"role": "user", "content": "d"}], "n": 2}]
                      ).to_parquet(tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet", "p.parquet") == ("a", (("user", "b"), ("assistant", "c"), ("user", "d")))


# ---- the table in the docs, and lazy imports ---------------------------------------------------


def test_docs_show_the_preset_table():
    table = preset_table()
    assert '`"autoj"`' in table and '`"hh-rlhf"`' in table and '`"rewardbench"`' in table
    for doc in ("README.md", "docs/design.md"):
        assert table in (ROOT / doc).read_text(), f"{doc} does not show formats.preset_table(); paste it in"


def test_reading_modules_import_no_pyarrow_or_datasets():
    code = ("import sys, algebra.reward.data, algebra.reward.formats; "
            "print(sorted(m for m in ('pyarrow', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- end to end ----------------------------------------------------------------------------------


def test_evaluate_a_reward_model_on_a_parquet_file(ws, rms, tmp_path_factory, monkeypatch):
    from test_reward import Direct

    # scores computed here stay here: other files' tests count what they score
    monkeypatch.setenv("ALG_CACHE", str(tmp_path_factory.mktemp("alg-cache")))

    rows = [json.loads(line) for line in (ws / "data" / "prefs.jsonl").read_text().splitlines()]
    renamed = [{"question": r["prompt"], "a": r["chosen"], "b": r["rejected"], "cat": r["subset"]} for r in rows]
    Dataset.from_list(renamed).to_parquet(ws / "data" / "prefs.parquet")
    session = Session(Options(device="cpu", out=lambda _: None), ws, mode="file")
    checked = session.check(Source('evaluate(reward("models/rm-helpful"), pairs("data/prefs.parquet", '
                                   'prompt="question", chosen="a", rejected="b", subset="cat"), "out/e.json")',
                                   "t.alg"))
    engine.run_sinks(checked.sinks, session.options)
    out = json.loads((ws / "out" / "e.json").read_text())
    H = Direct(rms["rm-helpful"])
    wins = [H(r["prompt"], r["chosen"]) > H(r["prompt"], r["rejected"]) for r in rows]
    assert out["n"] == len(rows) == 12
    assert out["accuracy"] == pytest.approx(sum(wins) / len(wins))
    for name in {r["subset"] for r in rows}:
        sub = [w for w, r in zip(wins, rows, strict=True) if r["subset"] == name]
        assert out["subsets"][name]["accuracy"] == pytest.approx(sum(sub) / len(sub))
    # score() of a Parquet responses file writes its rows back whole, a date column as ISO text
    day = datetime.date(2024, 5, 1)
    pq.write_table(pa.Table.from_pylist([{"q": r["prompt"], "a": r["chosen"], "day": day} for r in rows[:3]]),
                   ws / "data" / "resp.parquet")
    checked = session.check(Source('score(reward("models/rm-helpful"), responses("data/resp.parquet", prompt="q", '
                                   'response="a"), "out/s.jsonl")', "t.alg"))
    engine.run_sinks(checked.sinks, session.options)
    scored = [json.loads(line) for line in (ws / "out" / "s.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == [
        {"q": r["prompt"], "a": r["chosen"], "day": "2024-05-01"} for r in rows[:3]]
    for s, r in zip(scored, rows, strict=False):
        assert s["reward"] == pytest.approx(H(r["prompt"], r["chosen"]), abs=2e-5)


# ---- alg score --data: every format responses() reads --------------------------------------------


def test_alg_score_reads_dataset_folders(ws, rms, tmp_path_factory, monkeypatch):
    """`alg score --data` takes a save_to_disk folder and a Hub-layout Parquet folder, with
    --field and --split as responses() takes prompt=, response= and split=: each row's
    reward is the reward model's own score of that row (transformers, directly)."""
    from conftest import alg_main
    from test_reward import Direct

    monkeypatch.setenv("ALG_CACHE", str(tmp_path_factory.mktemp("alg-cache")))
    rows = [json.loads(line) for line in (ws / "data" / "prompts_responses.jsonl").read_text().splitlines()][:4]
    renamed = [{"question": r["prompt"], "answer": r["response"], "id": r["id"]} for r in rows]
    (ws / "t.alg").write_text('h = reward("models/rm-helpful")\n')
    # the train split differs from test, so a wrong split shows in the rows
    DatasetDict(train=Dataset.from_list(renamed[:1]), test=Dataset.from_list(renamed)).save_to_disk(ws / "saved")
    (ws / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(renamed[:1]), ws / "hub" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(renamed[:2]), ws / "hub" / "data" / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(renamed[2:]), ws / "hub" / "data" / "test-00001-of-00002.parquet")
    H = Direct(rms["rm-helpful"])
    for folder in ("saved", "hub"):
        out = f"out/{folder}.jsonl"
        r = alg_main("score", "t.alg", "h", "--data", folder, "--field", "prompt=question", "--field",
                     "response=answer", "--split", "test", "--out", out, "--device", "cpu", "--quiet", cwd=ws)
        assert r.returncode == 0, r.stderr
        scored = [json.loads(line) for line in (ws / out).read_text().splitlines()]
        assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == renamed
        for s, row in zip(scored, rows, strict=True):
            assert s["reward"] == pytest.approx(H(row["prompt"], row["response"]), abs=2e-5)


def test_alg_score_data_errors(ws, tmp_path_factory, monkeypatch):
    """What cannot be read is said at the file (inside a folder) and the options that named
    it; bad --data and --field are usage errors, before the recipe is checked."""
    from conftest import alg_main

    monkeypatch.setenv("ALG_CACHE", str(tmp_path_factory.mktemp("alg-cache")))
    (ws / "t.alg").write_text('h = reward("models/rm-helpful")\n')
    (ws / "empty").mkdir()
    (ws / "bad" / "data").mkdir(parents=True)
    (ws / "bad" / "data" / "test-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    (ws / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"q": "Hi?", "a": "Hello."}]), ws / "hub" / "data" / "test.parquet")

    def score(*args):
        return alg_main("score", "t.alg", "h", *args, "--out", "out/x.jsonl", "--device", "cpu", cwd=ws)

    cases = [
        (("--data", "empty"), 1, ["alg: error: 'empty' is a folder with no data files", "note: reading --data empty"]),
        (("--data", "bad"), 1, ["alg: error: cannot read 'bad/data/test-00000-of-00001.parquet': ",
                                "note: reading --data bad"]),
        (("--data", "hub", "--field", "prompt=question"), 1,
         ["alg: error: 'hub' has no column 'question' (for prompt); its columns: 'q', 'a'",
          "note: reading --data hub --field prompt=question"]),
        (("--data", "hub", "--field", "prompt=q", "--field", "response=a", "--split", "tset"), 1,
         ["alg: error: 'hub' has no split 'tset'; did you mean 'test'?",
          "note: reading --data hub --field prompt=q --field response=a --split tset"]),
        (("--data", "nope"), 2, ["alg score: error: no such data file or folder: 'nope'"]),
        (("--data", "hub", "--field", "promt=q"), 2,
         ["alg score: error: --field promt=q: the roles are prompt and response, not 'promt'; did you mean "
          "'prompt'?"]),
        (("--data", "hub", "--field", "prompt"), 2,
         ["alg score: error: --field expects ROLE=COLUMN (like --field prompt=question), got 'prompt'"]),
        (("--data", "hub", "--field", "prompt=q", "--field", "prompt=a"), 2,
         ["alg score: error: --field prompt=a: prompt is already given as --field prompt=q"]),
    ]
    for args, code, lines in cases:
        r = score(*args)
        assert r.returncode == code, (args, r.stderr)
        for line in lines:
            assert line in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and not (ws / "out" / "x.jsonl").exists()
