import torch

from sparqle.models.pretrain import SpeechTextPretrainer, generation_mask
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
