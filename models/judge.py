"""The relevance judge: label-token scoring with a causal LM (no Ray here).

``LabelTokenScorer`` grades (query, passage) pairs in ONE forward pass each: it reads the next-token
distribution at the answer position, restricted to the grade tokens ("0".."3"), and returns

- ``probs``: the distribution over grades (softmax over the grade tokens' logits; sums to 1),
- ``label``: its argmax, or, given ``cutpoints`` (tuned for kappa on validation, as ``judge finetune`` stores them
  in the judge card), the grade whose interval holds the expected grade,
- ``score``: the expected grade, sum_g g * p(g) (a finer signal than the label: Zhuang et al., NAACL 2024).

No ``generate`` and no text parsing. Speed comes from doing only the work the answer needs:

- only the last position, and only the G grade rows of the LM head, are computed (``GradeHead``): Gemma's
  head is 262k x 640, as large as the rest of the model, and through ``logits_to_keep=1`` transformers
  still expanded the whole head per batch row (a 1.3 G-element copy per forward, seen in a profile);
- batches are bucketed by length, so little compute is spent on padding;
- the instruction prefix (rubric, few-shot examples) is identical for every pair: its KV cache is computed
  once and shared by every batch and every row of a batch (``prefix_cache=True``): each layer reads it as a
  broadcast view, and no copy per row is kept (``shared_prefix_cache``);
- bf16 where the hardware computes it natively (``models.loading.resolve_dtype``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.prompts import PromptTemplate, fence_text, grade_token_ids

DEFAULT_GRADES = (0, 1, 2, 3)


@dataclass
class Scores:
    """Scores for n pairs, in input order."""

    label: np.ndarray  # (n,) int8, argmax grade (or cut-points on score)
    probs: np.ndarray  # (n, G) float32, one probability per grade
    score: np.ndarray  # (n,) float32, expected grade
    truncated: np.ndarray  # (n,) bool, the passage was cut to max_doc_tokens
    n_tokens: np.ndarray  # (n,) int32, prompt length in tokens (prefix included)
    #: set by ``models.injection.InjectionGuard``: an instruction-like span was found in the passage, and its kinds
    injection: np.ndarray | None = None  # (n,) bool
    injection_kind: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.label)

    def confidence(self, grades: Sequence[int]) -> np.ndarray:
        """(n,) the judge's probability of its own label (``label_confidence``)."""
        return label_confidence(self.probs, self.label, grades)


def label_confidence(probs: np.ndarray, label: np.ndarray, grades: Sequence[int]) -> np.ndarray:
    """The probability the judge gives to the label it wrote: ``probs[i, grades.index(label[i])]``.

    Why this measure: a stacked judge's probabilities come from a multinomial logistic regression fit on human
    grades in their natural mix, so ``p(label)`` estimates the chance that an assessor would write the same
    grade, which is what review routing needs (the pairs most likely to be wrong). Max probability would
    disagree with a cut-point label (the label is cut from the expected grade, not the argmax); a margin has no
    such reading. For an LLM judge without a stack the probabilities are the grade tokens' softmax: with cut-point
    labels a whole grade band can get a low p(label) (cut-points move labels away from the argmax), so the measure
    orders pairs within a grade, not across grades; route reviews with a stacked judge.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if not len(probs):
        return np.zeros(0, np.float32)
    col = {g: i for i, g in enumerate(grades)}
    idx = np.array([col[int(v)] for v in np.asarray(label)], dtype=np.int64)
    return probs[np.arange(len(idx)), idx].astype(np.float32)


@dataclass
class EncodedPair:
    ids: list[int]  # the pair's suffix tokens (the shared prefix is not repeated here)
    truncated: bool


class GradeHead:
    """Grade-token logits from the decoder's last hidden state, using only the grade rows of the LM head.

    Exactly the model's own next-token logits at those tokens: the same weight rows (and bias), and the final
    logit soft-capping some models apply (Gemma 2: tanh(x / c) * c). Works for plain, PEFT-wrapped and
    DeepSpeed-wrapped causal LMs (``decoder`` and ``head`` resolve through the wrappers).
    """

    def __init__(self, model, grade_ids: Sequence[int]):
        self.model = model
        self.decoder = model.get_decoder()
        head = model.get_output_embeddings()
        index = torch.tensor(list(grade_ids), device=head.weight.device)
        self._head = head
        self._index = index
        self._cached: tuple[torch.Tensor, torch.Tensor | None] | None = None
        config = getattr(model, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grade rows of the head (and bias), fp32. Cached while the head is frozen (LoRA leaves it so)."""
        weight, bias = self._head.weight, self._head.bias
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if frozen and self._cached is not None:
            return self._cached
        if hasattr(weight, "ds_id"):
            # ZeRO-3 partitions parameters and gathers them only inside their module's forward, which this
            # bypasses: gather the head for the read.
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None]):
                rows = self._select(weight, bias)
        else:
            rows = self._select(weight, bias)
        if frozen:
            self._cached = rows
        return rows

    def _select(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = self._index.to(weight.device)
        w = weight.index_select(0, index).float()
        return w, (bias.index_select(0, index).float() if bias is not None else None)

    def __call__(self, **decoder_inputs) -> tuple[torch.Tensor, object]:
        """Run the decoder on ``decoder_inputs``; return ((b, G) float32 logits at the last position, its cache)."""
        if "past_key_values" in decoder_inputs:
            decoder_inputs[cache_keyword(self.decoder)] = decoder_inputs.pop("past_key_values")
        out = self.decoder(**decoder_inputs)
        last = out.last_hidden_state[:, -1, :].float()
        w, b = self.weights()
        logits = last @ w.T
        if b is not None:
            logits = logits + b
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits, output_cache(out)


def _broadcast_prefix_update(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """A prefix layer's ``update`` for a batch: the prefix (one row) broadcast to the batch, then the new
    keys/values; nothing is stored. The (b, p + s) tensors live only while their layer computes attention,
    instead of b copies of the prefix in every layer for the whole forward (256 rows x a 500-token rubric x 42
    layers of a 9B model: ~44 GB)."""
    b = key_states.shape[0]
    keys = layer.keys.expand(b, *layer.keys.shape[1:])
    values = layer.values.expand(b, *layer.values.shape[1:])
    return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def cache_keyword(model) -> str:
    """The keyword a decoder takes its KV cache by: ``cache`` from transformers 5.2x (``past_key_values`` is
    deprecated there, with a warning on every call), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """A decoder output's KV cache, by its new name (``cache``) or its old one."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def shared_prefix_cache(prefix_cache, batch: int):
    """A cache that lets ``batch`` rows attend to ``prefix_cache`` (computed for one row) without copying it.

    Mask sizes, sliding windows and sequence length are the prefix layers' own (a shallow copy of each layer
    shares its tensors); only ``update`` differs (``_broadcast_prefix_update``), so the prefix cache is never
    modified and serves every batch. A cache without per-layer objects (older transformers) is repeated per
    row instead.
    """
    layers = getattr(prefix_cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "__dict__") for layer in layers):
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(batch)
        return cache
    shared = copy.copy(prefix_cache)
    shared.layers = []
    for layer in layers:
        view = copy.copy(layer)
        view.update = functools.partial(_broadcast_prefix_update, view)
        shared.layers.append(view)
    return shared


def scores_from_logits(
    logits: torch.Tensor, grades: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, probs, score) from grade-token logits of shape (n, G)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values = torch.tensor(list(grades), dtype=torch.float32)
    score = probs @ values
    label = values[probs.argmax(dim=-1)]
    return label.numpy().astype(np.int8), probs.numpy().astype(np.float32), score.numpy().astype(np.float32)


class PairEncoder:
    """Turns pairs into token ids the same way for scoring and for fine-tuning.

    The suffix is assembled from separately tokenized pieces (query line, title, URL, body, answer cue) so the
    passage can be cut by tokens without re-tokenizing, and so training and inference see identical ids.
    """

    def __init__(self, tokenizer, template: PromptTemplate, grades: Sequence[int] = DEFAULT_GRADES):
        self.tokenizer = tokenizer
        self.template = template
        self.grades = tuple(grades)
        self.grade_ids = grade_token_ids(tokenizer, template, self.grades)
        self.prefix_ids: list[int] = tokenizer(template.prefix_text(), add_special_tokens=True)["input_ids"]
        self._body = self._tok(template.body_field)
        self._cue = self._tok(template.answer_cue)
        self._newline = self._tok("\n")

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _field(self, text: str, limit: int) -> list[int]:
        """A one-line field cut to ``limit`` tokens; a cut field keeps its line break, so the next field still
        starts on a line of its own."""
        ids = self._tok(text)
        return ids if len(ids) <= limit else ids[: limit - 1] + self._newline

    def encode(self, query: str, text: str, title: str | None = None, url: str | None = None) -> EncodedPair:
        t = self.template
        ids = self._field(t.query_field.format(query=query), t.max_query_tokens)
        if title:
            ids += self._field(t.title_field.format(title=title), t.max_title_tokens)
        if url:
            ids += self._field(t.url_field.format(url=url), t.max_url_tokens)
        body = self._tok(fence_text(t, text or ""))
        truncated = len(body) > t.max_doc_tokens
        ids += self._body + body[: t.max_doc_tokens] + self._cue
        return EncodedPair(ids, truncated)

    def encode_many(self, queries, texts, titles=None, urls=None) -> list[EncodedPair]:
        n = len(queries)
        titles = titles if titles is not None else [None] * n
        urls = urls if urls is not None else [None] * n
        return [self.encode(q, d, ti, u) for q, d, ti, u in zip(queries, texts, titles, urls, strict=True)]


def length_buckets(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> Iterator[np.ndarray]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early and once)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    i = 0
    while i < len(order):
        size = batch_size
        if max_tokens:
            size = max(1, min(batch_size, max_tokens // max(1, int(lengths[order[i]]))))
        yield order[i : i + size]
        i += size


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so every sequence ends at the last column: the answer position is always index -1."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


class LabelTokenScorer:
    """Grades pairs with a causal LM by the next-token distribution over the grade tokens.

    Args:
        model: a Hugging Face causal LM (adapters merged: an unmerged LoRA on every linear layer is several
            times slower at inference).
        tokenizer: its tokenizer; every grade must be a single token after the template's answer cue.
        template: the prompt (see ``models.prompts``).
        grades: the grade values, in the order of ``probs``' columns.
        batch_size: pairs per forward pass.
        max_batch_tokens: optional cap on batch_size x longest sequence, prefix included (memory bound for long
            passages).
        prefix_cache: reuse the shared instruction prefix's KV cache across pairs (identical results, less
            compute; needs a model whose ``past_key_values`` is a transformers ``Cache``, as every decoder in
            transformers >= 4.56 returns; turn it off for a model that does not).
        cutpoints: G-1 increasing thresholds on the expected grade; when given, ``label`` comes from them
            instead of the argmax (a judge trained on the natural grade mix has an argmax of 0 for most pairs).
        compile: run the decoder through ``torch.compile(dynamic=True)``: fuses the elementwise work (norms,
            GELU gating, rotary, dtype casts: about 45% of a bf16 CPU profile) at the cost of a one-off
            compilation (about two minutes on 2 cores); worth it for long annotation jobs, not for a few pairs.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: PromptTemplate,
        grades: Sequence[int] = DEFAULT_GRADES,
        batch_size: int = 16,
        max_batch_tokens: int | None = None,
        prefix_cache: bool = True,
        compile: bool = False,
        cutpoints: Sequence[float] | None = None,
    ):
        if cutpoints is not None and (
            len(cutpoints) != len(grades) - 1 or any(np.diff(np.asarray(cutpoints, dtype=float)) < 0)
        ):
            raise ValueError(
                f"cutpoints: need {len(grades) - 1} non-decreasing values, got {list(cutpoints)}"
            )
        self.cutpoints = None if cutpoints is None else [float(c) for c in cutpoints]
        self.model = model
        self.encoder = PairEncoder(tokenizer, template, grades)
        self.grades = tuple(grades)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.device = next(model.parameters()).device
        self.head = GradeHead(model, self.encoder.grade_ids)
        if compile:
            self.head.decoder = torch.compile(self.head.decoder, dynamic=True)
        self._cache = None

    @property
    def prompt_version(self) -> str:
        return self.encoder.template.version

    @torch.inference_mode()
    def _prefix_kv(self):
        if self._cache is None:
            ids = torch.tensor([self.encoder.prefix_ids], device=self.device)
            self._cache = output_cache(self.head.decoder(input_ids=ids, use_cache=True))
        return self._cache

    @torch.inference_mode()
    def grade_logits(
        self, suffixes: Sequence[Sequence[int]], use_prefix_cache: bool | None = None
    ) -> torch.Tensor:
        """Grade-token logits (b, G) for one batch of encoded suffixes."""
        use_cache = self.prefix_cache if use_prefix_cache is None else use_prefix_cache
        prefix = self.encoder.prefix_ids
        if use_cache:
            ids, mask = pad_left(suffixes, self.pad_id)
            b, p = len(suffixes), len(prefix)
            cache = shared_prefix_cache(self._prefix_kv(), b)
            # Pads sit between the prefix and the pair: masked out, and positions continue from the prefix.
            attention = torch.cat([torch.ones((b, p), dtype=mask.dtype), mask], dim=1)
            positions = (p + mask.cumsum(dim=1) - 1).clamp(min=p)
            logits, _ = self.head(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
            )
        else:
            ids, mask = pad_left([prefix + list(s) for s in suffixes], self.pad_id)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits, _ = self.head(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=False,
            )
        return logits.cpu()

    def score_encoded(self, encoded: Sequence[EncodedPair], use_prefix_cache: bool | None = None) -> Scores:
        n = len(encoded)
        logits = torch.empty((n, len(self.grades)), dtype=torch.float32)
        lengths = [len(e.ids) for e in encoded]
        prefix_len = len(self.encoder.prefix_ids)
        # the prefix counts toward the token cap: the plain path runs it per row, the cached path attends to it
        for idx in length_buckets([prefix_len + x for x in lengths], self.batch_size, self.max_batch_tokens):
            logits[torch.as_tensor(idx)] = self.grade_logits([encoded[i].ids for i in idx], use_prefix_cache)
        label, probs, score = scores_from_logits(logits, self.grades)
        if self.cutpoints is not None:
            from eval.agreement import grades_from_cutpoints

            label = grades_from_cutpoints(score, self.cutpoints, self.grades).astype(np.int8)
        return Scores(
            label=label,
            probs=probs,
            score=score,
            truncated=np.array([e.truncated for e in encoded], dtype=bool),
            n_tokens=np.array([prefix_len + x for x in lengths], dtype=np.int32),
        )

    def encoded_without_scores(self, encoded: Sequence[EncodedPair]) -> Scores:
        """``Scores`` with the prompt facts (truncation, token counts) and no forward pass: zero probabilities,
        for a caller that grades from other signals (a stacked judge whose selection left the LLM out)."""
        n, g, prefix_len = len(encoded), len(self.grades), len(self.encoder.prefix_ids)
        return Scores(np.zeros(n, np.int8), np.zeros((n, g), np.float32), np.zeros(n, np.float32),
                      np.array([e.truncated for e in encoded], dtype=bool),
                      np.array([prefix_len + len(e.ids) for e in encoded], dtype=np.int32))  # fmt: skip

    def score(self, queries, texts, titles=None, urls=None, use_prefix_cache: bool | None = None) -> Scores:
        """Score pairs given as parallel sequences of strings (titles / urls may be None)."""
        if len(queries) != len(texts):
            raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
        if not len(queries):
            g = len(self.grades)
            return Scores(np.zeros(0, np.int8), np.zeros((0, g), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, bool), np.zeros(0, np.int32))  # fmt: skip
        return self.score_encoded(self.encoder.encode_many(queries, texts, titles, urls), use_prefix_cache)
