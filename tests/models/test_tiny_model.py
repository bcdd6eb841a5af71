import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_like_a_hub_checkpoint(tiny_causal_lm):
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    for grade in "0123":
        assert len(tok(grade, add_special_tokens=False)["input_ids"]) == 1
    batch = tok(["query: what is the town ? grade :"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
