"""OpenAI's hyperparameter read-back: `n_epochs: auto` turns into the number training chose."""

from __future__ import annotations

from app.openai_compat.schemas import DEFAULT_LEARNING_RATE, openai_knobs


def test_auto_epochs_read_back_as_the_chosen_number_once_training_ran() -> None:
    hyper = {
        "training": {"epochs": "auto", "batch_size": 16, "learning_rate": DEFAULT_LEARNING_RATE}
    }

    before = openai_knobs(hyper, None)
    after = openai_knobs(hyper, {"epochs": 12.0, "optimizer_steps": 48, "trained_tokens": 900})

    assert before["n_epochs"] == "auto"
    assert after["n_epochs"] == 12 and isinstance(after["n_epochs"], int)
    assert after["batch_size"] == 16 and after["learning_rate_multiplier"] == 1


def test_a_fixed_epoch_count_is_read_back_as_given() -> None:
    hyper = {
        "training": {"epochs": 2.5, "batch_size": 8, "learning_rate": 2 * DEFAULT_LEARNING_RATE}
    }

    knobs = openai_knobs(hyper, {"epochs": 2.5})

    assert knobs["n_epochs"] == 2.5 and knobs["learning_rate_multiplier"] == 2
