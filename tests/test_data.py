"""SFT data: chat masks, packing against literal arrays, file formats, bad rows, the loader."""

import json

import grain
import numpy as np
import pytest

from qedjax import data, loader


def _stream(examples):
    pairs = [{"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]} for ids, mask in examples]
    return grain.MapDataset.source(pairs).to_iter_dataset()


def test_pack_literal_arrays():
    examples = [(np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1])),
                (np.array([20, 21, 22]), np.array([0, 1, 1])),
                (np.array([30, 31, 32, 33, 34, 35]), np.array([0, 0, 0, 1, 1, 1]))]
    rows = list(loader.pack(_stream(examples), seq_len=6, pad_id=0))
    out = {k: np.stack([r[k] for r in rows]) for k in data.ARRAYS}
    # example 0 (3 pairs) and 1 (2 pairs) share row 0; example 2 (5 pairs) does not fit there.
    np.testing.assert_array_equal(out["tokens"], [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 34, 0]])
    np.testing.assert_array_equal(out["targets"], [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 35, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
    unpacked = list(loader.pack(_stream(examples), seq_len=6, packing=False, pad_id=7))
    assert len(unpacked) == 3
    np.testing.assert_array_equal(unpacked[1]["tokens"], [20, 21, 7, 7, 7, 7])
    np.testing.assert_array_equal(unpacked[1]["segment_ids"], [1, 1, 0, 0, 0, 0])


def test_chat_mask_covers_the_assistant_turn_only(toy_tokenizer):
    messages = [{"role": "user", "content": "Reverse the list: 1 2 3"},
                {"role": "assistant", "content": "Answer: 3 2 1", "reasoning_content": "Reading from the end."}]
    ids, mask = data.tokenize_chat(toy_tokenizer, messages)
    prompt = toy_tokenizer.decode(ids[mask == 0])
    target = toy_tokenizer.decode(ids[mask == 1])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and "Reverse the list" in prompt
    assert target == "Reading from the end.\n</think>\n\nAnswer: 3 2 1<|im_end|>\n"
    assert mask.tolist() == sorted(mask.tolist())  # one contiguous target span at the end


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"problem": "Reverse the list: 4 5", "reasoning_content": "Easy.", "proof": "Answer: 5 4"}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hf"])
def test_formats_give_the_same_examples(tmp_path, toy_tokenizer, fmt):
    import datasets

    rows = [GOOD, {**GOOD, "problem": "Reverse the list: 1 2"}]
    ds = datasets.Dataset.from_list(rows)
    path = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "csv": tmp_path / "d.csv",
            "parquet": tmp_path / "d.parquet", "hf": tmp_path / "d_hf"}[fmt]
    if fmt == "hf":
        ds.save_to_disk(str(path))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(ds, {"jsonl": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[fmt])(str(path))
    examples, stats = data.build_examples(data.DataConfig(path=str(path), seq_len=128), toy_tokenizer)
    ref = data.tokenize_chat(toy_tokenizer, data.row_messages(GOOD, data.Columns(), "x"))
    assert stats["examples"] == 2
    np.testing.assert_array_equal(examples[0][0], ref[0])


def test_messages_column_and_column_mapping(tmp_path, toy_tokenizer):
    chat = {"messages": [{"role": "user", "content": "Reverse the list: 4 5"},
                         {"role": "assistant", "content": "Answer: 5 4", "reasoning_content": "Easy."}]}
    renamed = {"question": "Reverse the list: 4 5", "thoughts": "Easy.", "solution": "Answer: 5 4"}
    a, _ = data.build_examples(data.DataConfig(path=_write_jsonl(tmp_path / "a.jsonl", [chat])), toy_tokenizer)
    cols = data.Columns(problem="question", reasoning="thoughts", answer="solution")
    b, _ = data.build_examples(data.DataConfig(path=_write_jsonl(tmp_path / "b.jsonl", [renamed]), columns=cols),
                               toy_tokenizer)
    np.testing.assert_array_equal(a[0][0], b[0][0])


def test_bad_rows_raise_with_file_and_row_or_are_counted(tmp_path, toy_tokenizer):
    rows = [GOOD, {"problem": "Reverse the list: 1", "reasoning_content": "x"}, {**GOOD, "proof": "  "},
            {**GOOD, "problem": 7}, GOOD]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows[:2] + rows[4:])
    with pytest.raises(data.BadRowError, match=r"bad.jsonl:2: missing column 'proof'"):
        data.build_examples(data.DataConfig(path=path), toy_tokenizer)
    path = _write_jsonl(tmp_path / "empty.jsonl", [GOOD, rows[2]])
    with pytest.raises(data.BadRowError, match=r"empty.jsonl:2: column 'proof' is empty"):
        data.build_examples(data.DataConfig(path=path), toy_tokenizer)
    with pytest.raises(data.BadRowError, match=r"row 0: column 'problem' is int, expected a string"):
        data.row_messages(rows[3], data.Columns(), "row 0")
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows[:3] + [GOOD])
    examples, stats = data.build_examples(data.DataConfig(path=path, bad_rows="skip"), toy_tokenizer)
    assert (stats["examples"], stats["bad_rows"]) == (2, 2)


def test_malformed_jsonl_names_the_line_or_is_skipped_and_counted(tmp_path, toy_tokenizer, capsys):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(GOOD), '{"problem": "Reverse the list: 1", "proof": "x",', "", json.dumps({**GOOD, "problem": 7}),
             "[1, 2]", json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.BadRowError, match=r"broken.jsonl:2: not valid JSON \(Expecting"):
        data.build_examples(data.DataConfig(path=str(path)), toy_tokenizer)
    path.write_text("\n".join(lines[:1] + lines[2:4] + lines[5:]) + "\n")
    with pytest.raises(data.BadRowError, match=r"broken.jsonl:3: column 'problem' is int, expected a string"):
        data.build_examples(data.DataConfig(path=str(path)), toy_tokenizer)
    path.write_text("\n".join(lines) + "\n")
    examples, stats = data.build_examples(data.DataConfig(path=str(path), bad_rows="skip"), toy_tokenizer)
    assert (stats["rows"], stats["examples"], stats["bad_rows"]) == (5, 2, 3)
    assert "skipped 3 bad row(s) (data.bad_rows=skip); first: " in capsys.readouterr().out


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, toy_tokenizer):
    long = {**GOOD, "proof": "Answer: " + " ".join(["9"] * 200)}
    path = _write_jsonl(tmp_path / "long.jsonl", [GOOD, long])
    ex, stats = data.build_examples(data.DataConfig(path=path, seq_len=64), toy_tokenizer)
    assert stats["truncated"] == 1 and max(len(e[0]) for e in ex) == 65
    ex, stats = data.build_examples(data.DataConfig(path=path, seq_len=64, overlong="drop"), toy_tokenizer)
    assert stats["dropped_overlong"] == 1 and stats["examples"] == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_examples(data.DataConfig(path=str(tmp_path / "nope.jsonl")), toy_tokenizer)


def _toy_examples(n, seed=0):
    """n examples of 3-40 tokens; every token of example i is 1000 + i (so a row names its examples)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 41))
        out.append({"tokens": np.full(length, 1000 + i, np.int32), "targets": np.full(length, 1000 + i, np.int32),
                    "loss_mask": np.ones(length, np.int32)})
    return out


def _loader(examples, **kw):
    kw = {"global_batch": 4, "seq_len": 48, "micro_batches": 2, "seed": 3, **kw}
    return loader.Loader(len(examples), lambda k: examples[k], **kw)


def _ids(row_tokens, segments):
    """The examples of packed rows, in order: (stream position, example id) per segment."""
    return [int(row_tokens[segments == s][0]) - 1000 for s in range(1, segments.max() + 1)]


def test_loader_is_seeded_and_resumes_exactly():
    examples = _toy_examples(50)
    a = _loader(examples)
    first = [next(a) for _ in range(3)]
    assert first[0]["tokens"].shape == (2, 2, 48)
    a._ahead.result()  # the batch read ahead is packed: the state must still be the one after batch 3
    state = json.loads(json.dumps(a.get_state()))  # as a checkpoint stores it
    rest = [next(a)["tokens"] for _ in range(12)]
    b = _loader(examples)
    b.set_state(state)
    for x, y in zip(rest, [next(b)["tokens"] for _ in range(12)]):
        np.testing.assert_array_equal(x, y)
    c = _loader(examples)
    np.testing.assert_array_equal(next(c)["tokens"], first[0]["tokens"])  # seeded
    assert not np.array_equal(next(_loader(examples, seed=4))["tokens"], first[0]["tokens"])
    with pytest.raises(ValueError, match=r"\(8, 50\): the data or sft.global_batch changed"):
        _loader(examples, global_batch=8).set_state(state)
    with pytest.raises(ValueError, match=r"\(4, 49\): the data or sft.global_batch changed"):
        _loader(examples[:49]).set_state(state)


def test_two_processes_feed_one_process_rows_and_every_example_once_per_epoch():
    examples = _toy_examples(60)
    one = _loader(examples, global_batch=8, micro_batches=2)  # [2 micro, 4 rows]
    halves = [_loader(examples, global_batch=8, micro_batches=2, rows=slice(p * 2, p * 2 + 2)) for p in (0, 1)]
    steps = 12
    for _ in range(steps):
        batch = next(one)
        parts = [next(h) for h in halves]
        for k in data.ARRAYS:  # process p holds rows [2p, 2p + 2) of every micro-batch
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1), batch[k])
        assert (batch["targets"][batch["segment_ids"] == 0] == 0).all()
    # one epoch's rows hold every example exactly once, and two processes' rows are one process's
    def epoch(ld):
        return [(r["tokens"], r["segment_ids"]) for r in ld.first_epoch()]

    whole, parts = epoch(one), [epoch(h) for h in halves]
    assert sorted(i for t, s in whole for i in _ids(t, s)) == list(range(len(examples)))
    assert len(whole) == len(parts[0]) + len(parts[1])
    for (t, s), (u, v) in zip(sorted(whole, key=lambda r: r[0].tobytes()),
                              sorted(parts[0] + parts[1], key=lambda r: r[0].tobytes())):
        np.testing.assert_array_equal(t, u)
        np.testing.assert_array_equal(s, v)
    with pytest.raises(ValueError, match="must divide"):
        _loader(examples, global_batch=5, micro_batches=2)


def test_a_stream_that_drops_everything_says_so(tmp_path, toy_tokenizer):
    path = _write_jsonl(tmp_path / "long.jsonl", [{**GOOD, "proof": "Answer: " + " ".join(["9"] * 200)}] * 3)
    cfg = data.DataConfig(path=path, seq_len=16, overlong="drop")
    rows = data.open_rows(cfg)
    usable, stats = loader.usable_rows(cfg, toy_tokenizer, rows)
    assert stats == {"rows": 3, "usable_rows": 3, "bad_rows": 0}
    it = loader.Loader(len(usable), loader.encoder(cfg, toy_tokenizer, rows, usable), global_batch=1, seq_len=16)
    with pytest.raises(ValueError, match="no usable examples: 4 in a row were dropped"):
        next(it)
