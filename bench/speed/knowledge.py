"""Knowledge query throughput: cloze scoring batched vs one question at a time vs batch 1."""

from __future__ import annotations

import time
from typing import Any

from grait.data import load_records, take
from grait.knowledge import score_options_cloze
from grait.models import load_base_model, pick_runtime


def bench_knowledge(
    base_model: str, data_path: str, *, n: int, batch_size: int, log: Any
) -> dict[str, Any]:
    model, tok = load_base_model(base_model, pick_runtime())
    recs = take(load_records(data_path), seed=1, shuffle=True, offset=0, limit=n)
    score_options_cloze(model, tok, recs[:2], batch_size=batch_size)  # warm-up
    times = {"batched": 0.0, "per_question": 0.0, "batch_1": 0.0}
    # Interleaved in chunks so machine load hits each mode alike.
    chunk = max(1, batch_size // 4)
    for start in range(0, len(recs), chunk):
        part = recs[start : start + chunk]
        t = time.perf_counter()
        score_options_cloze(model, tok, part, batch_size=batch_size)
        times["batched"] += time.perf_counter() - t
        t = time.perf_counter()
        for r in part:
            score_options_cloze(model, tok, [r], batch_size=len(r.options))
        times["per_question"] += time.perf_counter() - t
        t = time.perf_counter()
        score_options_cloze(model, tok, part, batch_size=1)
        times["batch_1"] += time.perf_counter() - t
    log(f"knowledge: {len(recs)} questions")
    return {
        "questions": len(recs),
        "batch_size": batch_size,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "q_per_s": {k: len(recs) / v for k, v in times.items()},
        "batched_speedup_vs_per_question": times["per_question"] / times["batched"],
        "batched_speedup_vs_batch_1": times["batch_1"] / times["batched"],
    }
