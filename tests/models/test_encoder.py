import numpy as np
import pytest
import torch

from models.encoder import CARD_FILE, BiEncoder, RetrieverCard

TEXTS = ["river town company", "species", "town town river species company"]


def _hidden(path, texts, max_length=512):
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state, enc["attention_mask"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_matches_the_hidden_states_by_hand(tiny_encoder, pooling):
    hidden, mask = _hidden(str(tiny_encoder), TEXTS)
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        want = (hidden * m).sum(1) / m.sum(1)
    else:
        want = hidden[:, 0]
    enc = BiEncoder(str(tiny_encoder), pooling=pooling, normalize=False)
    assert np.allclose(enc.encode_passages(TEXTS), want.numpy(), atol=1e-5)
    unit = BiEncoder(
        str(tiny_encoder), pooling=pooling
    )  # a plain Hugging Face encoder: normalised by default
    assert unit.normalize and unit.pooling == pooling
    assert np.allclose(
        unit.encode_passages(TEXTS), torch.nn.functional.normalize(want, dim=-1).numpy(), atol=1e-5
    )


def test_prefixes_and_max_lengths_apply_to_their_kind_only(tiny_encoder):
    plain = BiEncoder(str(tiny_encoder))
    enc = BiEncoder(str(tiny_encoder), query_prefix="river ", max_query_length=2)
    long_text = "species town company river species town company"
    assert np.allclose(enc.encode_passages([long_text]), plain.encode_passages([long_text]), atol=1e-6)
    assert np.allclose(enc.encode_queries(["species"]), plain.encode_passages(["river species"]), atol=1e-6)
    # cut at 2 tokens (the tiny tokenizer adds no [CLS]): "river species", whatever follows
    assert np.allclose(
        enc.encode_queries(["species town"]), enc.encode_queries(["species company"]), atol=1e-6
    )
    assert not np.allclose(enc.encode_passages(["species town"]), enc.encode_passages(["species company"]))


def test_directory_round_trip_through_sentence_transformers(tiny_encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = BiEncoder(str(tiny_encoder), pooling="cls", query_prefix="river ", max_query_length=8)
    card = enc.describe(base_model="tiny", loss="SumMargLHLoss", temperature=0.05, metrics={"ndcg10": 0.5})
    enc.save(tmp_path / "ret", card)
    assert (tmp_path / "ret" / CARD_FILE).is_file() and (tmp_path / "ret" / "modules.json").is_file()
    back = BiEncoder(str(tmp_path / "ret"))
    assert (back.pooling, back.normalize, back.query_prefix, back.max_query_length) == (
        "cls",
        True,
        "river ",
        8,
    )
    assert back.card.loss == "SumMargLHLoss" and back.card.metrics == {"ndcg10": 0.5}
    assert np.allclose(back.encode_queries(TEXTS), enc.encode_queries(TEXTS), atol=1e-6)
    assert np.allclose(back.encode_passages(TEXTS), enc.encode_passages(TEXTS), atol=1e-6)
    # anyone's SentenceTransformer loads it, the prefix as its query prompt
    st = SentenceTransformer(str(tmp_path / "ret"), device="cpu")
    assert np.allclose(st.encode_query(TEXTS[:1]), enc.encode_queries(TEXTS[:1]), atol=1e-5)
    assert RetrieverCard.load(tmp_path / "ret").dim == enc.dim == 16


def test_embed_has_gradients_and_equals_inference(tiny_encoder):
    enc = BiEncoder(str(tiny_encoder))
    out = enc.embed(TEXTS, "passage")
    assert out.requires_grad and out.shape == (3, 16)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.module.parameters())
    assert np.allclose(out.detach().numpy(), enc.encode_passages(TEXTS), atol=1e-5)


def test_missing_text_encodes_as_empty_and_no_text_gives_an_empty_matrix(tiny_encoder):
    enc = BiEncoder(str(tiny_encoder))
    assert np.allclose(enc.encode_passages([None, "species"]), enc.encode_passages(["", "species"]))
    assert enc.encode_queries([]).shape == (0, 16)


def test_unknown_pooling_is_refused(tiny_encoder):
    with pytest.raises(ValueError, match="pooling"):
        BiEncoder(str(tiny_encoder), pooling="max")


@pytest.mark.slow
def test_packaged_minilm_keeps_its_own_mean_pooling_and_normalisation():
    enc = BiEncoder()
    assert (enc.pooling, enc.normalize, enc.dim, enc.max_passage_length) == ("mean", True, 384, 256)
    v = enc.encode_passages(["The capital of France is Paris.", "Bananas are yellow."])
    q = enc.encode_queries(["capital of france"])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert (q @ v.T)[0, 0] > (q @ v.T)[0, 1] + 0.2
