import os

import numpy as np
import pytest
import torch

from models.judge import LabelTokenScorer, PairEncoder, length_buckets, pad_left, scores_from_logits
from models.loading import cpu_bf16_unit, cpu_description, cpu_supports_bf16, load_causal_lm, resolve_dtype
from models.prompts import BASIC, UMBRELA, FewShotExample, PromptTemplate, grade_token_ids

QUERIES = ["what is the town", "who is the ceo", "where does the species live", "what river", "how"]
TEXTS = ["the town was founded in 1200 .", "the ceo of the company", "", "the river of the town . " * 40, "a"]


@pytest.fixture(scope="module")
def tiny(tiny_causal_lm):
    return load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")


def test_probs_sum_to_one_label_is_argmax_score_is_expectation(tiny):
    s = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=2)
    r = s.score(QUERIES, TEXTS)
    assert r.probs.shape == (5, 4) and r.probs.dtype == np.float32
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(r.label, r.probs.argmax(axis=1))
    np.testing.assert_allclose(r.score, r.probs @ np.arange(4), atol=1e-6)


def test_cutpoints_give_the_label_from_the_expected_grade(tiny, tmp_path):
    from eval.agreement import grades_from_cutpoints
    from models.judge_card import JudgeCard, load_judge

    plain = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=2).score(QUERIES, TEXTS)
    cut = np.quantile(plain.score, [0.25, 0.5, 0.75]).tolist()
    r = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=2, cutpoints=cut).score(
        QUERIES, TEXTS
    )
    np.testing.assert_array_equal(r.label, grades_from_cutpoints(plain.score, cut, [0, 1, 2, 3]))
    np.testing.assert_allclose(r.probs, plain.probs, atol=1e-6)
    assert len(set(r.label.tolist())) > 1
    with pytest.raises(ValueError, match="cutpoints: need 3"):
        LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, cutpoints=[0.5, 1.5])
    # a judge directory whose card carries cut-points grades with them; its llm_scorer keeps the argmax
    JudgeCard(base_model=str(tiny.name), prompt_template=UMBRELA.name, prompt_version=UMBRELA.version,
              adapter=None, max_doc_tokens=UMBRELA.max_doc_tokens, max_query_tokens=UMBRELA.max_query_tokens,
              cutpoints=cut).save(tmp_path)  # fmt: skip
    judge = load_judge(str(tmp_path), dtype="fp32", device="cpu")
    np.testing.assert_array_equal(judge.scorer(2).score(QUERIES, TEXTS).label, r.label)
    np.testing.assert_array_equal(judge.llm_scorer(2).score(QUERIES, TEXTS).label, plain.label)


def test_prefix_cache_path_equals_plain_path(tiny):
    s = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=3)
    cached = s.score(QUERIES, TEXTS, use_prefix_cache=True)
    plain = s.score(QUERIES, TEXTS, use_prefix_cache=False)
    np.testing.assert_allclose(cached.probs, plain.probs, atol=1e-5)


def test_batching_and_bucketing_keep_input_order(tiny):
    s = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=4)
    together = s.score(QUERIES, TEXTS)
    alone = [s.score([q], [t]).probs[0] for q, t in zip(QUERIES, TEXTS, strict=True)]
    np.testing.assert_allclose(together.probs, np.stack(alone), atol=1e-5)


def test_scores_match_a_plain_full_vocab_forward(tiny):
    """The one-pass grade distribution equals softmax over the grade tokens of the full next-token logits."""
    s = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA)
    enc = s.encoder.encode(QUERIES[0], TEXTS[0])
    ids = torch.tensor([s.encoder.prefix_ids + enc.ids])
    with torch.no_grad():
        full = tiny.model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(full[s.encoder.grade_ids], dim=-1).numpy()
    np.testing.assert_allclose(s.score(QUERIES[:1], TEXTS[:1]).probs[0], expected, atol=1e-5)


def test_truncation_is_recorded_and_empty_passage_is_judged(tiny):
    s = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA.with_limits(max_doc_tokens=20))
    r = s.score(QUERIES, TEXTS)
    assert r.truncated.tolist() == [False, False, False, True, False]
    assert np.isfinite(r.probs[2]).all()  # the empty passage
    assert r.n_tokens[3] <= len(s.encoder.prefix_ids) + 20 + 30


def test_prompt_version_changes_with_any_prompt_input():
    assert UMBRELA.version != BASIC.version
    assert UMBRELA.version != UMBRELA.with_limits(max_doc_tokens=100).version
    assert UMBRELA.version.startswith("umbrela-v1@")
    shot = PromptTemplate(**{**UMBRELA.__dict__, "examples": (FewShotExample("q", "d", 2),)})
    assert shot.version != UMBRELA.version and "Score: 2" in shot.prefix_text()
    assert PromptTemplate(**{**UMBRELA.__dict__, "max_title_tokens": 10}).version != UMBRELA.version


def test_a_cut_field_keeps_its_line_break():
    """Each character a token (the tiny test tokenizer has no newline token): a title cut to 10 tokens is
    9 characters and its line break, so the URL still starts a line of its own."""

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    tok = CharTokenizer()
    e = PairEncoder(
        tok, PromptTemplate(**{**UMBRELA.__dict__, "max_title_tokens": 10, "max_query_tokens": 8})
    )
    enc = e.encode("a long query", "body", title="a very long title", url="http://x.org")
    assert tok.decode(enc.ids).startswith("Query: \nTitle: a \nURL: http://x.org\nPassage: body")


def test_multi_token_grade_fails_clearly(tiny):
    with pytest.raises(ValueError, match="not a single token"):
        grade_token_ids(tiny.tokenizer, UMBRELA, [0, 1, 10])


def test_helpers():
    ids, mask = pad_left([[1, 2], [3]], 0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    batches = list(length_buckets([5, 50, 7, 49], batch_size=2))
    assert [sorted(b.tolist()) for b in batches] == [[1, 3], [0, 2]]
    assert [len(b) for b in length_buckets([100] * 4, batch_size=4, max_tokens=200)] == [2, 2]
    label, _, score = scores_from_logits(torch.tensor([[0.0, 0.0, 10.0, 0.0]]), (0, 1, 2, 3))
    assert label.tolist() == [2] and score[0] == pytest.approx(2.0, abs=1e-3)


def test_dtype_resolution():
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_dtype("int3")


def test_cpu_description_names_the_bf16_unit_auto_dtype_relies_on():
    desc = cpu_description()
    assert f"{os.cpu_count()} cores" in desc
    native = "AMX-BF16" in desc or "AVX512-BF16" in desc
    assert native == cpu_supports_bf16()
    assert (resolve_dtype("auto", "cpu") == torch.bfloat16) == native
    assert cpu_bf16_unit({"flags": "avx2 avx512_bf16 amx_bf16 amx_tile"}) == "AMX-BF16"
    assert cpu_bf16_unit({"flags": "avx2 avx512f avx512_bf16"}) == "AVX512-BF16"
    assert cpu_bf16_unit({"flags": "avx2 avx512f"}) is None and cpu_bf16_unit({}) is None


@pytest.mark.slow
def test_gemma_default_loads_offline_and_scores():
    lm = load_causal_lm("gemma3-270m")
    s = LabelTokenScorer(lm.model, lm.tokenizer, UMBRELA, batch_size=4)
    cached = s.score(QUERIES, TEXTS, use_prefix_cache=True)
    plain = s.score(QUERIES, TEXTS, use_prefix_cache=False)
    np.testing.assert_allclose(cached.probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(cached.probs - plain.probs).max() < 0.05  # bf16 rounding only


def test_compiled_decoder_scores_like_eager(tiny):
    eager = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=2).score(QUERIES, TEXTS)
    compiled = LabelTokenScorer(tiny.model, tiny.tokenizer, UMBRELA, batch_size=2, compile=True)
    np.testing.assert_allclose(compiled.score(QUERIES, TEXTS).probs, eager.probs, atol=1e-4)
