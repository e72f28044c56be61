import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from grait.models import load_tokenizer
from grait.prompts import collate, encode, per_sample_answer_loss
from grait.training import WeightedCollator, WeightedExample, WeightedLossTrainer


def test_weighted_loss_is_the_weighted_mean_of_per_sample_answer_losses(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).eval()
    items = [
        WeightedExample(
            encode(
                tok,
                "Question: a long prompt about rivers and seas?",
                "I don't know.",
                max_length=64,
            ),
            0.5,
        ),
        WeightedExample(encode(tok, "Question: short?", "B. Paris", max_length=64), 2.0),
    ]
    trainer = WeightedLossTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        data_collator=WeightedCollator(tok.pad_token_id),
    )
    with torch.no_grad():
        got = trainer.compute_loss(model, WeightedCollator(tok.pad_token_id)(items))
        batch = collate([it.encoded for it in items], tok.pad_token_id)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_sample = per_sample_answer_loss(full, batch.labels)
    expected = (0.5 * per_sample[0] + 2.0 * per_sample[1]) / 2
    assert torch.allclose(got, expected, atol=1e-5)
