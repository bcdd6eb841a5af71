from collections import defaultdict

from pipelines.synth import SynthConfig, generate, synth


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth(SynthConfig(out=str(a), entities=12, seed=5))
    synth(SynthConfig(out=str(b), entities=12, seed=5))
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    synth(SynthConfig(out=str(b), entities=12, seed=6))
    assert (a / "corpus.jsonl").read_bytes() != (b / "corpus.jsonl").read_bytes()


def test_grades_follow_from_construction():
    docs, queries, qrels = generate(SynthConfig(out="unused", entities=30, seed=1))
    text = {d["_id"]: d["text"] for d in docs}
    title = {d["_id"]: d["title"] for d in docs}
    qtext = {q["_id"]: q["text"] for q in queries}
    by_q = defaultdict(dict)
    for q, d, g in qrels:
        by_q[q][d] = g
    for qid, grades in by_q.items():
        entity, _aspect_idx = qid.split("-q")
        assert max(grades.values()) == 3, "every query has an answer"
        for d, g in grades.items():
            if g >= 1:  # relevant or related passages are about the query's entity (or name it)
                assert d.startswith(entity + "-"), (qid, d, g)
            if g == 0 and d.endswith("-lookalike"):
                assert title[d] != title[f"{entity}-overview"].removeprefix("About ")
        # the answering passage names the entity the query asks about
        answer = next(d for d, g in grades.items() if g == 3 and "mixed" not in d)
        name = title[answer]
        assert name in text[answer] and name in qtext[qid]


def test_grade_mix_has_every_grade_and_enough_pairs():
    _docs, queries, qrels = generate(SynthConfig(out="unused"))
    assert len(queries) == 200 and len(qrels) > 4000
    counts = defaultdict(int)
    for *_, g in qrels:
        counts[g] += 1
    assert all(counts[g] > 100 for g in range(4))
    assert counts[0] > counts[3]  # irrelevant pairs dominate, as in TREC pools
