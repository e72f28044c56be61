"""Answer-only logits (grait.prompts.answer_logits) give exactly the full-logit answer loss."""

import pytest
import torch

from grait.models import load_base_model, pick_runtime
from grait.prompts import answer_logits, collate, encode, per_sample_answer_loss


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    model, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu", "float32"), reuse=False)
    prompts = [
        "Q: short?",
        "Q: a much longer question with many more words in it?",
        "Q: mid length one?",
    ]
    items = [
        encode(tok, p, t, max_length=128)
        for p, t in zip(prompts, ["A", "I don't know.", "Paris, France"])
    ]
    return model, collate(items, tok.pad_token_id)


def _full_loss(model, batch):
    return per_sample_answer_loss(
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
    )


def test_answer_only_logits_match_the_full_loss_and_are_narrower(model_and_batch):
    model, batch = model_and_batch
    logits, labels = answer_logits(model, batch)
    assert logits.shape[1] < batch.input_ids.shape[1]
    assert labels.shape[1] == logits.shape[1]
    with torch.no_grad():
        assert torch.allclose(
            per_sample_answer_loss(logits, labels), _full_loss(model, batch), atol=1e-5
        )


def test_models_without_logits_to_keep_fall_back_to_full_logits(model_and_batch):
    model, batch = model_and_batch

    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    logits, labels = answer_logits(NoKeep(model), batch)
    assert logits.shape[1] == batch.input_ids.shape[1]
    with torch.no_grad():
        assert torch.allclose(
            per_sample_answer_loss(logits, labels), _full_loss(model, batch), atol=1e-6
        )
