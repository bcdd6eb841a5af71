"""Builders for tiny real models (random weights, a few hundred parameters' worth of vocab)."""

from __future__ import annotations

from pathlib import Path

#: Words the tiny tokenizer knows; anything else maps to [UNK]. The grade digits are single tokens.
TINY_VOCAB = [
    "<pad>",
    "<bos>",
    "<eos>",
    "[UNK]",
    "0",
    "1",
    "2",
    "3",
    ":",
    ".",
    ",",
    "?",
    "\n",
    *[
        "query",
        "passage",
        "document",
        "title",
        "relevance",
        "grade",
        "score",
        "the",
        "a",
        "of",
        "is",
        "in",
        "to",
        "and",
        "what",
        "when",
        "where",
        "who",
        "how",
        "was",
        "founded",
        "river",
        "population",
        "town",
        "company",
        "species",
        "lives",
        "eats",
        "ceo",
        "make",
    ],
]


def build_tiny_causal_lm(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def build_tiny_encoder(out: Path, seed: int = 0) -> Path:
    """A tiny random BERT sentence encoder (16-d) with a word-level tokenizer, saved like a hub checkpoint:
    what `models.encoder.BiEncoder` loads in place of MiniLM where a test needs speed, not meaning."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *TINY_VOCAB[4:]]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=512, pad_token_id=0)  # fmt: skip
    BertModel(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def kill_a_map_worker_once(out, parts: int, worker, timeout_s: float = 180) -> int | None:
    """SIGKILL one Ray Data map worker of this process's session once ``out`` holds ``parts`` partitions, while
    ``worker`` (the thread running the job) is alive. Returns how many partitions were done when it was killed,
    or None if the job ended (or the time ran out) first. Ray names a worker process after the actor it hosts."""
    import signal
    import time

    import psutil

    deadline = time.time() + timeout_s
    while worker.is_alive() and time.time() < deadline:
        done = len(list(out.glob("part-*.parquet")))
        if done >= parts:
            actors = [
                p for p in psutil.Process().children(recursive=True) if "MapWorker" in " ".join(p.cmdline())
            ]
            if actors:
                actors[0].send_signal(signal.SIGKILL)
                return done
        time.sleep(0.05)
    return None
