import torch
from transformers import AutoModelForMaskedLM

from sparqle.models.qformer import SpeechQFormer


def test_bert_init_copies_what_it_claims(tiny):
    qf = SpeechQFormer(encoder_dim=32, num_queries=4, bert=tiny["bert"])
    bert = AutoModelForMaskedLM.from_pretrained(tiny["bert"]).bert
    layer0, src0 = qf.qformer.encoder.layer[0], bert.encoder.layer[0]
    torch.testing.assert_close(
        layer0.attention.attention.query.weight, src0.attention.self.query.weight
    )
    torch.testing.assert_close(layer0.output.dense.weight, src0.output.dense.weight)
    # the query FFN starts as a copy of the text FFN
    torch.testing.assert_close(
        layer0.intermediate_query.dense.weight, src0.intermediate.dense.weight
    )
    torch.testing.assert_close(layer0.output_query.LayerNorm.bias, src0.output.LayerNorm.bias)
    torch.testing.assert_close(qf.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)
    n = bert.embeddings.word_embeddings.weight.shape[0]
    torch.testing.assert_close(
        qf.embeddings.word_embeddings.weight[:n], bert.embeddings.word_embeddings.weight
    )
    assert qf.embeddings.word_embeddings.weight.shape[0] == n + 1  # a slot for [DEC]
    # cross-attention is new: every 2nd layer has it, none of it is copied
    assert layer0.has_cross_attention and not qf.qformer.encoder.layer[1].has_cross_attention
    assert not any("crossattention" in name for name in qf.copied_from_bert)
    assert len(qf.copied_from_bert) == len(set(qf.copied_from_bert))


def test_speech_padding_is_invisible_and_queries_have_fixed_count(tiny):
    qf = SpeechQFormer(encoder_dim=32, num_queries=4, bert=tiny["bert"], dropout=0.0).eval()
    speech = torch.randn(1, 10, 32)
    padded = torch.cat([speech, torch.randn(1, 5, 32) * 100], 1)
    mask = torch.tensor([[True] * 10 + [False] * 5])
    out = qf(padded, mask)
    assert out.shape == (1, 4, qf.hidden_size)
    torch.testing.assert_close(
        out, qf(speech, torch.ones(1, 10, dtype=torch.bool)), atol=1e-5, rtol=1e-5
    )
