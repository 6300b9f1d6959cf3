"""Training data: indexed text/JSONL files, malformed input errors, reproducible sharded orders, resumable sources."""

import json
import random

import numpy as np
import pytest

from llm2vec_fast.tiny import build_tokenizer
from llm2vec_fast.training.data import line_index
from llm2vec_fast.training.data.line_index import LineIndex
from llm2vec_fast.training.data.masking import add_mask_token, masking_rule
from llm2vec_fast.training.data.records import ContrastiveFile, TextLines, contrastive_files
from llm2vec_fast.training.data.sampling import GroupedBatchOrder, StridedOrder
from llm2vec_fast.training.data.sources import MNTPSource, SimCSESource, SupervisedSource, tokenize_for_embedding


def test_line_index_matches_a_plain_reading_across_chunk_boundaries(tmp_path, monkeypatch):
    rng = random.Random(3)
    lines = []
    for i in range(300):
        kind = rng.random()
        lines.append("" if kind < 0.15 else "  \t " if kind < 0.2 else f"line {i} é ✓ " + "x" * rng.randrange(40))
    raw = "\r\n".join(lines[:100]) + "\n" + "\n".join(lines[100:])
    path = tmp_path / "text.txt"
    path.write_bytes(("\ufeff" + raw).encode())
    monkeypatch.setattr(line_index, "_CHUNK_BYTES", 37)  # many chunks, boundaries everywhere
    index = LineIndex(path)
    expected = [line.rstrip("\r") for line in raw.split("\n") if line.strip()]
    assert [index.read(i) for i in range(len(index))] == expected
    assert index.location(0) == f"{path}:1"


def test_text_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff byte\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: not valid UTF-8"):
        TextLines([bad])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="hold no non-blank lines"):
        TextLines([empty])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        TextLines([tmp_path / "missing.txt"])


def _write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "q", "positive": "p"', r"invalid JSON"),
        ('["q", "p"]', r"a record must be a JSON object"),
        ('{"query": "q"}', r"missing key\(s\) positive"),
        ('{"query": "q", "positive": "p", "label": 1}', r"unknown key\(s\) label"),
        ('{"query": "q", "positive": 3}', r"'positive' must be a non-empty string"),
        ('{"query": " ", "positive": "p"}', r"'query' must be a non-empty string"),
        ('{"query": "q", "positive": "p", "negatives": "n"}', r"'negatives' must be a list"),
        ('{"query": "q", "positive": "p", "negative": "n", "negatives": ["m"]}', r"either 'negative' or 'negatives'"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "set.jsonl", [{"query": "a", "positive": "b"}, "", line])
    with pytest.raises(ValueError, match=rf"{path}:3: .*{message}"):
        ContrastiveFile(path)


def test_jsonl_records_and_instructions(tmp_path):
    directory = tmp_path / "e5"
    directory.mkdir()
    _write_jsonl(
        directory / "nq.jsonl",
        [
            {"query": "q1", "positive": "p1", "negative": "n1"},
            {"query": "q2", "positive": "p2", "negatives": ["n2", "n3"], "instruction": "Own"},
        ],
    )
    _write_jsonl(directory / "allnli.jsonl", [{"query": f"q{i}", "positive": "p"} for i in range(3)])
    sets = contrastive_files([str(directory)], {"nq": "Find passages", "allnli": ["A", "B"]}, validate=True)
    by_name = {s.name: s for s in sets}
    assert by_name["nq"][0].instruction == "Find passages" and by_name["nq"][0].negatives == ("n1",)
    assert by_name["nq"][1].instruction == "Own" and by_name["nq"][1].negatives == ("n2", "n3")
    assert [by_name["allnli"][i].instruction for i in range(3)] == ["A", "B", "A"]
    with pytest.raises(ValueError, match="'instructions' names data set\\(s\\) fevr"):
        contrastive_files([str(directory)], {"fevr": "x"}, validate=True)


def test_strided_order_covers_each_epoch_and_shards_disjointly():
    shards = [StridedOrder(10, seed=5, rank=r, world_size=3) for r in range(3)]
    epoch0 = [[s.next() for _ in range(3)] for s in shards]
    items = [item for shard in epoch0 for _, item in shard]
    assert sorted(items) != list(range(10)) and len(set(items)) == 9  # 10 // 3 * 3 distinct items
    assert all(epoch == 0 for shard in epoch0 for epoch, _ in shard)
    assert shards[0].next()[0] == 1  # next call starts epoch 1
    resumed = StridedOrder(10, seed=5, rank=0, world_size=3)
    resumed.load_state_dict(shards[0].state_dict())
    assert [resumed.next() for _ in range(7)] == [shards[0].next() for _ in range(7)]
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        StridedOrder(3, seed=0, world_size=4)


def test_grouped_batches_come_from_one_data_set_and_split_across_processes():
    sizes = [10, 7, 25]
    single = GroupedBatchOrder(sizes, batch_size=4, seed=1)
    ranks = [GroupedBatchOrder(sizes, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    offsets = np.cumsum([0] + sizes)
    for _ in range(9):  # 2 + 1 + 6 full global batches per epoch
        _, batch = single.next()
        groups = {int(np.searchsorted(offsets, i, side="right") - 1) for i in batch}
        assert len(groups) == 1 and len(batch) == 4
        assert np.array_equal(np.concatenate([r.next()[1] for r in ranks]), batch)
    assert single.next()[0] == 1
    with pytest.raises(ValueError, match="no data set holds a full global batch of 16"):
        GroupedBatchOrder([5, 6], batch_size=8, seed=0, world_size=2)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    add_mask_token(tok, "blank")
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog masked token prediction bidirectional".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randrange(3, 30))) for _ in range(60)) + "\n")
    return path


@pytest.mark.parametrize("layout, budget", [("concat", None), ("lines", None), ("lines", 200)])
def test_mntp_source_resumes_exactly(tokenizer, text_file, layout, budget):
    def make():
        rule = masking_rule(tokenizer, 0.3, "default")
        return MNTPSource(
            TextLines([text_file]),
            tokenizer,
            rule,
            layout=layout,
            max_seq_length=32,
            batch_size=3,
            max_tokens_per_batch=budget,
            seed=7,
        )

    straight = make()
    first = [straight.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(straight.state_dict()))  # must survive serialisation
    rest = [straight.next_batch() for _ in range(40)]  # crosses epochs
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(rest, [resumed.next_batch() for _ in range(40)]):
        assert a.sequences == b.sequences and np.array_equal(a.target_ids, b.target_ids)
    for batch in first + rest:
        lengths = batch.lengths
        assert lengths.max() <= 32
        if layout == "concat":
            assert (lengths == 32).all() and len(lengths) == 3
        if budget is not None:
            assert lengths.sum() <= budget
        elif layout == "lines":
            assert len(lengths) == 3


def test_instruction_tokens_are_counted_in_instruction_lengths(tokenizer):
    pairs = [("Retrieve passages", "the quick brown fox"), ("", "the quick brown fox")]
    ids, instruction_lengths = tokenize_for_embedding(tokenizer, pairs, max_length=64)
    own = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    # LLM2Vec's rule (and the encoder's): pool the last len(tokens of the text alone) tokens
    assert ids[1][instruction_lengths[1] :] == own and len(ids[0]) - instruction_lengths[0] == len(own)
    assert tokenizer.decode(ids[0]) == "<s>Retrieve passages; the quick brown fox"
    assert ids[1][0] == tokenizer.bos_token_id and instruction_lengths[1] == 1
    assert tokenizer.decode(ids[0][1 : instruction_lengths[0]]).startswith("Retrieve passages")
    templated, lead_t = tokenize_for_embedding(tokenizer, pairs[1:], 64, template="[INST] {} [/INST]", append_eos=True)
    assert tokenizer.decode(templated[0]) == "<s>[INST] the quick brown fox [/INST]</s>"
    own_templated = tokenizer("the quick brown fox [/INST]", add_special_tokens=False)["input_ids"]
    assert len(templated[0]) - 1 - lead_t[0] == len(own_templated)


def test_contrastive_sources_lay_out_queries_positives_negatives(tokenizer, text_file, tmp_path):
    simcse = SimCSESource(
        TextLines([text_file]), tokenizer, max_seq_length=16, batch_size=4, append_eos=False, template=None, seed=0
    )
    batch = simcse.next_batch()
    assert batch.num_queries == 4 and batch.sequences[:4] == batch.sequences[4:] and max(batch.lengths) <= 16
    data = _write_jsonl(
        tmp_path / "nq.jsonl",
        [{"query": f"q {i}", "positive": f"p {i}", "negatives": [f"n {i}", f"m {i}"]} for i in range(6)],
    )
    supervised = SupervisedSource(
        [ContrastiveFile(data, "Find")],
        tokenizer,
        max_seq_length=16,
        batch_size=3,
        append_eos=False,
        template=None,
        seed=0,
    )
    batch = supervised.next_batch()
    texts = [tokenizer.decode(s[lead:]).strip() for s, lead in zip(batch.sequences, batch.instruction_lengths)]
    queries = [t.split()[1] for t in texts[:3]]
    assert [t.split()[0] for t in texts] == ["q"] * 3 + ["p"] * 3 + ["n", "m"] * 3
    assert [t.split()[1] for t in texts[3:6]] == queries and [t.split()[1] for t in texts[6::2]] == queries
    assert all(
        tokenizer.decode(s[:lead]).strip().endswith("Find;")
        for s, lead in zip(batch.sequences[:3], batch.instruction_lengths)
    )
