"""The testbed's knowing model is a function of its recipe, as its cache key claims."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.quality import testbed
from grait.testing import make_tiny_model


def test_the_same_recipe_teaches_the_same_model_whatever_the_process_rng(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "tiny")
    facts = testbed.make_facts(12, 6)
    settings = testbed.TeachSettings(epochs=1.0, batch_size=8, r=4)
    taught = []
    for i in (1, 2):
        torch.manual_seed(i)  # whatever ran before in the process must not matter
        path, _ = testbed.knowing_model(
            str(base), facts, tmp_path / f"cache{i}", settings, log=lambda _: None
        )
        taught.append(load_file(path / "model.safetensors"))
    untaught = load_file(base / "model.safetensors")
    assert taught[0].keys() == taught[1].keys() == untaught.keys()
    assert [k for k in taught[0] if not torch.equal(taught[0][k], taught[1][k])] == []
    assert any(not torch.equal(taught[0][k], untaught[k]) for k in untaught)
