import torch
import torch.nn.functional as F

from sparqle.models.pretrain import SpeechTextPretrainer, generation_mask, query_spread
from sparqle.models.qformer import SpeechQFormer


def test_generation_mask():
    m = generation_mask(2, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert m.shape == (2, 1, 5, 5)
    assert m[0, 0, :2, :2].all() and not m[0, 0, :2, 2:].any()  # queries see only queries
    assert m[0, 0, 3].tolist() == [True, True, True, True, False]  # text: queries + earlier text
    assert not m[1, 0, :, 4].any()  # padding is seen by no one


def test_itg_is_causal(tiny):
    qf = SpeechQFormer(32, num_queries=4, bert=tiny["bert"], dropout=0.0).eval()
    speech, mask = torch.randn(1, 12, 32), torch.ones(1, 12, dtype=torch.bool)
    ids_a = torch.tensor([[5, 10, 11, 12, 13]])
    ids_b = torch.tensor([[5, 10, 11, 40, 41]])
    text_mask = torch.ones_like(ids_a)
    out_a = qf(speech, mask, input_ids=ids_a, attention_mask=generation_mask(4, text_mask))
    out_b = qf(speech, mask, input_ids=ids_b, attention_mask=generation_mask(4, text_mask))
    torch.testing.assert_close(out_a[:, : 4 + 3], out_b[:, : 4 + 3])  # queries and first 3 tokens
    assert not torch.allclose(out_a[:, -1], out_b[:, -1])


def test_losses_finite_and_fall_when_overfitting(tiny):
    # Distinct features stand in for a real encoder's: a random tiny encoder maps every clip
    # to nearly the same vectors, which no contrastive loss can tell apart.
    torch.manual_seed(1)
    features, mask = torch.randn(6, 20, 32), torch.ones(6, 20, dtype=torch.bool)
    mask[3:, 15:] = False
    texts = [
        "The dog sleeps.",
        "A cat runs now.",
        "The green car.",
        "Hello there.",
        "The old man sings.",
        "A book.",
    ]
    qf = SpeechQFormer(32, num_queries=4, bert=tiny["bert"], dropout=0.0)
    heads = SpeechTextPretrainer(qf, tiny["bert"], embed_dim=16)
    assert heads.load_bert_lm_head(tiny["bert"])
    opt = torch.optim.AdamW([*qf.parameters(), *heads.parameters()], lr=1e-2)
    history = []
    for _ in range(60):
        out = heads(qf, features, mask, texts)
        assert all(torch.isfinite(out[k]) for k in ("itc", "itm", "itg"))
        history.append({k: out[k].item() for k in ("itc", "itm", "itg", "loss")})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"]
    # A random tiny BERT gives near-identical text features, so the contrastive loss starts on a
    # plateau at ln(batch) whose escape time is chaotic; it must not rise, and the sum must fall.
    assert min(h["itc"] for h in history) <= first["itc"] + 1e-3
    assert last["itg"] < 0.5 * first["itg"]


def test_contrastive_logits_in_float32_under_bf16_autocast(tiny):
    """At temperature 0.01 bf16 products would move logits by ~0.1: sims stay float32."""
    qf = SpeechQFormer(32, num_queries=4, bert=tiny["bert"], dropout=0.0)
    heads = SpeechTextPretrainer(qf, tiny["bert"], embed_dim=16)
    with torch.no_grad():
        heads.temp.fill_(0.01)
    torch.manual_seed(0)
    speech = F.normalize(torch.randn(3, 4, 16), dim=-1)
    text = F.normalize(torch.randn(3, 16), dim=-1)
    ref = heads.similarities(speech, text, speech, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads.similarities(speech, text, speech, text)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-6)
    # and the features the heads make are float32 too, whatever autocast did to the projections
    feats, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    seen = {}
    orig = heads.similarities
    heads.similarities = lambda *a: seen.setdefault("dtypes", [x.dtype for x in a]) and orig(*a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads(qf, feats, mask, ["the dog", "a cat"])
    assert seen["dtypes"] == [torch.float32] * 4


def test_dec_row_starts_like_a_new_bert_token(tiny):
    """LAVIS resizes BERT's embeddings: the new [DEC] row is N(0, 0.02), as BERT's rows are."""
    torch.manual_seed(0)
    qf = SpeechQFormer(32, num_queries=4, bert=tiny["bert"])
    rows = qf.embeddings.word_embeddings.weight
    dec = rows[qf.bert_vocab_size :]
    assert dec.shape[0] == 1
    assert dec.std().item() < 3 * qf.config.initializer_range
    assert dec.abs().max().item() < 8 * qf.config.initializer_range


def test_query_spread_sees_collapse_and_its_hinge_keeps_queries_apart(tiny):
    assert query_spread(torch.randn(2, 1, 8).expand(2, 4, 8)).max() < 0.02  # one vector, 4 times
    assert query_spread(torch.randn(2, 4, 8)).mean() > 0.5
    features, mask = torch.randn(4, 20, 32), torch.ones(4, 20, dtype=torch.bool)
    texts = ["The dog sleeps.", "A cat runs now.", "The green car.", "Hello there."]
    spread = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        qf = SpeechQFormer(32, num_queries=4, bert=tiny["bert"], dropout=0.0)
        with torch.no_grad():  # nearly collapsed from the start: one query token, jittered
            qf.query_tokens.copy_(qf.query_tokens[:, :1] + 1e-3 * torch.randn_like(qf.query_tokens))
        heads = SpeechTextPretrainer(
            qf, tiny["bert"], embed_dim=16, query_spread_weight=weight, query_spread_target=0.5
        )
        opt = torch.optim.AdamW([*qf.parameters(), *heads.parameters()], lr=3e-3)
        for _ in range(30):
            out = heads(qf, features, mask, texts)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        spread[weight] = heads(qf, features, mask, texts)["query_spread"].item()
    assert spread[1.0] >= 0.5 and spread[1.0] > 2 * spread[0.0], spread  # at its target
