"""meft.data.formats + meft.data.files: every format from every container, one format per file, and
file:line (json: line + record index, parquet: row) for every bad record."""

import json

import pytest

from meft.data.files import load_records
from meft.data.formats import DataError, detect_format, to_canonical
from meft.data.records import build_examples
from meft.data.sources import parse_data_spec
from tests.meft.data.test_records import tiny_tokenizer

CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
# format -> (two records of it, what their first canonical record must contain)
FORMATS = {
    "prompt_completion": ([{"prompt": "Capital of France?", "completion": "Paris"},
                           {"prompt": "Capital of Peru?", "completion": "Lima", "answers": ["Lima"]}],
                          {"prompt": "Capital of France?", "completion": "Paris"}),
    "messages": ([{"messages": CHAT}, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                                    {"role": "assistant", "content": "Hello"}]}],
                 {"messages": CHAT}),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "Capital of France?"},
                                     {"from": "gpt", "value": "Paris"}], "id": "a1"},
                  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                   "system": "Be brief."}],
                 {"messages": CHAT, "id": "a1"}),
    "alpaca": ([{"instruction": "Capital of France?", "input": "", "output": "Paris"},
                {"instruction": "Translate", "input": "chat", "output": "cat", "text": "### rendered prompt"}],
               {"prompt": "Capital of France?", "completion": "Paris"}),
    "text": ([{"text": "Paris is the capital of France."}, {"text": "Lima is the capital of Peru."}],
             {"text": "Paris is the capital of France."}),
}


def _write(path, records, container):
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif container == "json":
        path.write_text(json.dumps(records, indent=2))
    elif container == "json_data":
        path.write_text(json.dumps({"version": 1, "data": records}, indent=1))
    else:
        pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (meft[parquet]) is not installed")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "json_data": ".json", "parquet": ".parquet"}


@pytest.mark.parametrize("container", sorted(SUFFIX))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_from_every_container(tmp_path, fmt, container):
    records, want = FORMATS[fmt]
    if container == "parquet" and fmt == "messages":
        records = [records[0]] * 2  # arrow columns cannot mix string and list content
    path = _write(tmp_path / f"d{SUFFIX[container]}", records, container)
    got = load_records(path)
    assert len(got) == 2 and {r["_format"] for r in got} == {fmt}
    assert {k: got[0][k] for k in want} == want
    assert parse_data_spec(str(path)) == ("file", {"path": str(path)})


def test_conversions():
    sharegpt = FORMATS["sharegpt"][0][1]
    rec, kind, _ = to_canonical(sharegpt)
    assert kind == "chat" and [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    alpaca = FORMATS["alpaca"][0][1]
    rec, kind, _ = to_canonical(alpaca)
    assert kind == "qa" and rec == {"prompt": "Translate\n\nchat", "completion": "cat"}  # 'text' dropped
    rec, kind, _ = to_canonical({"instruction": "Q", "output": "A", "system": "S"})
    assert kind == "chat" and rec["messages"][0] == {"role": "system", "content": "S"}
    rec, _, _ = to_canonical(FORMATS["messages"][0][1])
    assert rec["messages"][0]["content"] == "Hi"  # OpenAI content parts joined


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_tokenizes(tmp_path, fmt):
    tok = tiny_tokenizer()
    recs = load_records(_write(tmp_path / "d.jsonl", FORMATS[fmt][0], "jsonl"))
    ex = build_examples(recs, tok, block_size=8)
    assert ex and all(any(t != -100 for t in e["labels"]) for e in ex)


BAD = {  # format, bad record, reason
    "sharegpt_role": ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from is 'bot'"),
    "sharegpt_value": ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value is int"),
    "sharegpt_no_gpt": ({"conversations": [{"from": "human", "value": "x"}]}, "no 'gpt' / 'assistant' turn"),
    "sharegpt_empty": ({"conversations": []}, "non-empty list of {'from', 'value'}"),
    "alpaca_no_output": ({"instruction": "x"}, "Alpaca 'output' is NoneType"),
    "alpaca_empty_output": ({"instruction": "x", "output": " "}, "Alpaca 'output' is empty"),
    "alpaca_input_type": ({"instruction": "x", "input": 1, "output": "y"}, "Alpaca 'input' is int"),
    "messages_role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role is 'tool'"),
    "no_format": ({"question": "x"}, "none of the keys"),
    "two_formats": ({"instruction": "x", "output": "y", "conversations": []}, "several of"),
}
GOOD = {"sharegpt": FORMATS["sharegpt"][0][0], "alpaca": FORMATS["alpaca"][0][0],
        "messages": FORMATS["messages"][0][0]}


def _good_for(bad: dict) -> dict:
    fmt, _ = detect_format(bad)
    return GOOD.get(fmt, FORMATS["prompt_completion"][0][0])


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_reported_at_its_place_in_every_container(tmp_path, kind):
    bad, reason = BAD[kind]
    good = _good_for(bad)
    records = [good, good, bad, good]  # the bad one is record 2 / jsonl line 3 / parquet row 3
    path = _write(tmp_path / "d.jsonl", records, "jsonl")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.errors == [f"{path}:3: {info.value.errors[0].split(': ', 1)[1]}"]
    assert reason in info.value.errors[0]
    path = _write(tmp_path / "d.json", records, "json")
    with pytest.raises(DataError) as info:
        load_records(path)
    line = path.read_text().splitlines().index("  {", 1 + path.read_text().splitlines()[2:].index("  {") + 2) + 1
    assert info.value.errors[0].startswith(f"{path}:{line} (record 2): ") and reason in info.value.errors[0]


def test_json_lines_point_at_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n\n {"prompt": "a"}\n]\n')
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.errors == [f"{path}:4 (record 1): 'completion' is NoneType, expected a string"]


def test_parquet_rows_are_reported(tmp_path):
    good = FORMATS["sharegpt"][0][0]
    bad = {"conversations": [{"from": "bot", "value": "x"}]}
    path = _write(tmp_path / "d.parquet", [good, bad, good, bad], "parquet")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:row 2", f"{path}:row 4"]


def test_mixed_formats_refused_naming_each_odd_record(tmp_path):
    alp, sg = FORMATS["alpaca"][0][0], FORMATS["sharegpt"][0][0]
    path = _write(tmp_path / "d.jsonl", [sg, alp, alp, sg, alp], "jsonl")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:1", f"{path}:4"]
    assert "a sharegpt record, but this file holds alpaca records (3 of them, first at" in info.value.errors[0]


def test_bad_containers(tmp_path):
    (tmp_path / "a.json").write_text('{"records": []}')
    with pytest.raises(DataError, match=r'a list of records or \{"data": \[records\]\}'):
        load_records(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('[\n {"text": "x"},\n {"text": \n')
    with pytest.raises(DataError, match=r"b.json:4: invalid JSON"):
        load_records(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "c.json")
    (tmp_path / "d.parquet").write_text("not parquet")
    pytest.importorskip("pyarrow", reason="pyarrow (meft[parquet]) is not installed")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_records(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"not a record file \(.jsonl, .json, .parquet\)"):
        parse_data_spec(str(tmp_path / "nope.csv"))
