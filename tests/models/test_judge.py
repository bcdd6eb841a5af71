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


def _tiny_config_model(kind: str, tokenizer_dir, out=None, sliding_window: int = 4):
    """A tiny Gemma 2 / Gemma 3 (sliding-window layers, soft-capping) sharing the tiny test tokenizer."""
    from transformers import (
        AutoTokenizer,
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
    )

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=sliding_window,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(**common, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
        )
    else:
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention"])
        )
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model.eval(), tok


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prefix_cache_is_shared_not_copied_per_row_and_scores_identically(kind, tiny, tiny_causal_lm):
    """Every row of a batch reads the one-row prefix cache through a broadcast view: the logits equal those of
    the prefix repeated per row (the former path) exactly, also with sliding-window layers shorter than the
    prefix (Gemma 3), and the plain path's within rounding; the prefix cache itself stays one row."""
    from models.judge import shared_prefix_cache

    model, tok = (tiny.model, tiny.tokenizer) if kind == "llama" else _tiny_config_model(kind, tiny_causal_lm)
    s = LabelTokenScorer(model, tok, UMBRELA, batch_size=5)
    suffixes = [e.ids for e in s.encoder.encode_many(QUERIES, TEXTS)]
    shared = s.grade_logits(suffixes, use_prefix_cache=True)
    prefix = s._prefix_kv()
    p = len(s.encoder.prefix_ids)
    assert p > 4  # longer than the sliding window
    assert all(layer.keys.shape[0] == 1 for layer in prefix.layers) and prefix.get_seq_length() == p

    import copy

    from models.judge import pad_left

    repeated = copy.deepcopy(prefix)
    repeated.batch_repeat_interleave(len(suffixes))
    ids, mask = pad_left(suffixes, s.pad_id)
    b = len(suffixes)
    attention = torch.cat([torch.ones((b, p), dtype=mask.dtype), mask], dim=1)
    with torch.inference_mode():
        old, _ = s.head(input_ids=ids, attention_mask=attention, position_ids=(p + mask.cumsum(1) - 1).clamp(min=p),
                        past_key_values=repeated, use_cache=True)  # fmt: skip
    assert torch.equal(shared, old)
    if kind == "llama":
        torch.testing.assert_close(
            shared, s.grade_logits(suffixes, use_prefix_cache=False), atol=1e-5, rtol=1e-5
        )
    else:  # a sliding window counts the pads between prefix and pair (both cached paths): compare unpadded rows
        alone = torch.cat([s.grade_logits([x], use_prefix_cache=True) for x in suffixes])
        torch.testing.assert_close(alone, torch.cat([s.grade_logits([x], use_prefix_cache=False) for x in suffixes]),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # the view keeps no per-row copy in the cache it hands the model
    view = shared_prefix_cache(prefix, b)
    assert all(v.keys is layer.keys for v, layer in zip(view.layers, prefix.layers, strict=True))


def test_softcapping_models_load_with_eager_attention(tiny_causal_lm, tmp_path):
    """Gemma 2 soft-caps its attention scores, which SDPA cannot: it loads with eager attention (and the
    prefix-cached scores equal the plain ones); a model without soft-capping keeps transformers' default."""
    from models.loading import attention_implementation

    _tiny_config_model("gemma2", tiny_causal_lm, tmp_path / "gemma2", sliding_window=512)
    lm = load_causal_lm(str(tmp_path / "gemma2"), dtype="fp32", device="cpu")
    assert lm.model.config._attn_implementation == "eager"
    s = LabelTokenScorer(lm.model, lm.tokenizer, UMBRELA, batch_size=3)
    np.testing.assert_allclose(s.score(QUERIES, TEXTS, use_prefix_cache=True).probs,
                               s.score(QUERIES, TEXTS, use_prefix_cache=False).probs, atol=1e-5)  # fmt: skip
    llama = load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")
    assert attention_implementation(llama.model.config) is None
    assert llama.model.config._attn_implementation != "eager"


def test_parameter_count_reads_the_config_only(tiny):
    from models.loading import parameter_count

    assert parameter_count(tiny.path) == sum(p.numel() for p in tiny.model.parameters())


_CONVERT_SCRIPT = """
import os, sys, time
from pathlib import Path
from models.loading import cached_model_dir
go, log = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
def build(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # a conversion takes a while: the other process arrives while it runs
    (tmp / "weights").write_text(f"built by {os.getpid()}")
print(cached_model_dir("stand-in", build))
"""


def test_two_processes_converting_at_once_convert_once(tmp_path):
    """Two actors starting on one node both find no converted model: the file lock lets one build it; the
    other waits and uses it (without the lock both would build into the same place)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    go, log = tmp_path / "go", tmp_path / "builds.log"
    env = dict(os.environ, AUGREL_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("AUGREL_MODEL_CACHE", None)
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT_SCRIPT, str(go), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(log.read_text().split()) == 1
    dirs = {o.strip() for o, _ in outs}
    assert dirs == {str(tmp_path / "home" / "models" / "stand-in")}
    assert (tmp_path / "home" / "models" / "stand-in" / "weights").read_text().startswith("built by")
    assert not list((tmp_path / "home" / "models").glob("*.tmp-*"))


def test_shared_model_cache_path_or_object_store_uri(tmp_path, monkeypatch):
    """AUGREL_MODEL_CACHE: a path every node mounts is the cache itself; with a URI each node keeps a local
    copy, fetching a finished upload instead of converting again."""
    from models.loading import cached_model_dir, model_cache_dir

    builds = []

    def build(tmp):
        builds.append(tmp)
        (tmp / "weights").write_text("w")

    monkeypatch.setenv("AUGREL_MODEL_CACHE", str(tmp_path / "pvc"))
    monkeypatch.setenv("AUGREL_HOME", str(tmp_path / "node-a"))
    assert cached_model_dir("m", build) == tmp_path / "pvc" / "m" and model_cache_dir() == tmp_path / "pvc"
    monkeypatch.setenv("AUGREL_HOME", str(tmp_path / "node-b"))
    assert cached_model_dir("m", build) == tmp_path / "pvc" / "m" and len(builds) == 1

    builds.clear()
    monkeypatch.setenv("AUGREL_MODEL_CACHE", (tmp_path / "bucket").as_uri())
    monkeypatch.setenv("AUGREL_HOME", str(tmp_path / "node-a"))
    a = cached_model_dir("m", build)
    assert a == tmp_path / "node-a" / "models" / "m" and len(builds) == 1
    assert (tmp_path / "bucket" / "m" / "weights").exists() and (
        tmp_path / "bucket" / "m" / "_AUGREL_COMPLETE"
    ).exists()
    monkeypatch.setenv("AUGREL_HOME", str(tmp_path / "node-b"))
    b = cached_model_dir("m", build)
    assert b == tmp_path / "node-b" / "models" / "m" and len(builds) == 1  # fetched, not built again
    assert (b / "weights").read_text() == "w" and not (b / "_AUGREL_COMPLETE").exists()


@pytest.mark.slow
def test_real_gguf_conversion_in_two_processes_at_once(tmp_path):
    """The packaged Gemma GGUF, converted by two processes starting together into one fresh home: one converts
    (one 'converting' line), both load the same cache."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = "from models.loading import resolve_model_path; print(resolve_model_path('gemma3-270m'))"
    env = dict(os.environ, AUGREL_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("AUGREL_MODEL_CACHE", None)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "home" / "models" / "gemma-3-270m-q4_k_m")}
    assert sum(e.count("converting ") for _, e in outs) == 1
    lm = load_causal_lm(str(tmp_path / "home" / "models" / "gemma-3-270m-q4_k_m"), device="cpu")
    assert lm.model.config.model_type == "gemma3_text"


@pytest.mark.gpu
def test_prefix_cache_on_a_gpu_at_batch_256_scores_like_the_plain_path_in_less_memory(tiny_causal_lm):
    """At batch 256 the broadcast prefix gives the plain path's grades, and its peak memory stays below the
    per-row copy's (the former path: the prefix repeated for each row)."""
    lm = load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cuda")
    s = LabelTokenScorer(lm.model, lm.tokenizer, UMBRELA, batch_size=256)
    qs, ts = QUERIES * 52, TEXTS * 52
    cached = s.score(qs, ts, use_prefix_cache=True)
    np.testing.assert_allclose(cached.probs, s.score(qs, ts, use_prefix_cache=False).probs, atol=1e-4)

    def peak(cache_for_batch) -> int:
        import models.judge as judge

        real = judge.shared_prefix_cache
        judge.shared_prefix_cache = cache_for_batch
        try:
            torch.cuda.reset_peak_memory_stats()
            s.score(qs, ts, use_prefix_cache=True)
            return torch.cuda.max_memory_allocated()
        finally:
            judge.shared_prefix_cache = real

    def repeated(prefix, b):
        import copy

        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(b)
        return cache

    from models.judge import shared_prefix_cache

    assert peak(shared_prefix_cache) < peak(repeated)
