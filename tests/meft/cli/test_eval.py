"""`meft eval` / `meft generate` on a trained adapter: the scores equal those `meft train` reported."""

import json

from tests.meft.cli.test_train import MEFT, _cmd, _run


def test_eval_and_generate_reload_the_trained_adapter(tiny, tmp_path):
    """Also: the adapter records the run's --system-prompt and eval / generate ask with it by default."""
    out = tmp_path / "run"
    data = str(tiny / "train.jsonl")
    res = _run(_cmd(tiny, out, "--steps", "4", "--eval-data", data, "--eval-limit", "0", "--eval-before", "false",
                    "--system-prompt", "Be brief."))
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())["after"]["eval"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["training"] == {
        "system_prompt": "Be brief."}

    scored = tmp_path / "scores.json"
    res = _run(MEFT + ["eval", "--model", str(tiny / "model"), "--adapter", str(out / "adapter"), "--data", data,
                       "--max-new-tokens", "12", "--progress", "false", "--json-out", str(scored)])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(scored.read_text())
    assert (got["n"], got["exact_match"], got["contains"]) == (after["n"], after["exact_match"], after["contains"])
    assert [i["prediction"] for i in got["items"][:5]] == [e["prediction"] for e in after["examples"]]

    res = _run(MEFT + ["generate", "--model", str(tiny / "model"), "--adapter", str(out / "adapter"),
                       "--max-new-tokens", "12", got["items"][0]["prompt"]])
    assert res.returncode == 0, res.stderr[-3000:]
    assert got["items"][0]["prediction"] in res.stdout


def test_eval_missing_adapter_is_one_line(tiny, tmp_path):
    res = _run(MEFT + ["eval", "--model", str(tiny / "model"), "--adapter", str(tmp_path / "none"),
                       "--data", str(tiny / "train.jsonl")])
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--adapter" in res.stderr


def test_eval_reads_every_record_file_kind(tiny, tmp_path):
    """The same QA records as .jsonl, as an Alpaca .json array and as .parquet score the same; text records
    in a .json file are scored by perplexity."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()][:8]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in recs]))
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(recs), parquet)
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    scores = []
    for path in (jsonl, alpaca, parquet):
        out = tmp_path / f"{path.name}.scores.json"
        res = _run(MEFT + ["eval", "--model", str(tiny / "model"), "--data", str(path), "--progress", "false",
                           "--json-out", str(out)])
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(out.read_text())
        scores.append((got["n"], got["exact_match"], [i["prediction"] for i in got["items"]]))
    assert scores[0][0] == 8 and scores[0] == scores[1] == scores[2]
    text = tmp_path / "text.json"
    text.write_text(json.dumps([{"text": "The sea is wide and the sky is blue. " * 4}] * 3))
    res = _run(MEFT + ["eval", "--model", str(tiny / "model"), "--data", str(text), "--progress", "false"])
    assert res.returncode == 0 and "perplexity" in res.stdout, res.stderr[-3000:]


def test_eval_refuses_an_adapter_of_another_base_unless_forced(tiny, tmp_path):
    """The adapter folder records its base model; `meft eval` onto a model with other weights is a one-line
    error naming --force-base, and --force-base loads it anyway."""
    from tests.meft.data.test_records import tiny_model, tiny_tokenizer

    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "1", "--eval-before", "false", "--eval-after", "false",
                    "--retention", "false", "--generations", "false", "--general", "false"))
    assert res.returncode == 0, res.stderr[-3000:]
    other = tmp_path / "other"
    tok = tiny_tokenizer()
    tiny_model(len(tok), seed=1).save_pretrained(other)  # same shape, other weights
    tok.save_pretrained(other)
    args = ["eval", "--model", str(other), "--adapter", str(out / "adapter"), "--data", str(tiny / "train.jsonl"),
            "--limit", "2", "--max-new-tokens", "2", "--progress", "false"]
    res = _run(MEFT + args)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "--force-base" in res.stderr, res.stderr[-2000:]
    res = _run(MEFT + args + ["--force-base"])
    assert res.returncode == 0, res.stderr[-3000:]
