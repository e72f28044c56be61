"""Selection + weighting on synthetic float16 feature memmaps (10k / 100k candidates, d=8192).

The matrices have the pipeline's layout: `idk_pre` (candidates), `idk_raw` (every training row:
candidates first, then the known rows) and `van_raw` (known rows). They are written once
under a scratch folder (never the repository) and reused by later runs. Selection runs in a
fresh subprocess so its peak memory is its own: VmHWM counts the memmap's file pages it has
touched (page cache, reclaimable), so the anonymous peak (RssAnon, sampled) is reported too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _fill(path: Path, rows: int, dim: int, rng: np.random.Generator, shared: np.ndarray) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        block = (
            rng.standard_normal((n, dim), dtype=np.float32) + shared
        )  # a shared direction, like real features
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + n] = block.astype(np.float16)
    out.flush()
    del out


def make_matrices(folder: Path, n_cand: int, n_ik: int, dim: int, seed: int = 0) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.npy" for name in ("idk_pre", "idk_raw", "van_raw")}
    done = folder / "complete.json"
    spec = {"n_cand": n_cand, "n_ik": n_ik, "dim": dim, "seed": seed}
    if done.exists() and json.loads(done.read_text()) == spec:
        return paths
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim).astype(np.float32) * 0.5
    _fill(paths["idk_pre"], n_cand, dim, rng, shared)
    _fill(paths["idk_raw"], n_cand + n_ik, dim, rng, shared)
    _fill(paths["van_raw"], n_ik, dim, rng, shared)
    done.write_text(json.dumps(spec))
    return paths


def _peak_anon() -> tuple[threading.Event, dict[str, int]]:
    stop, peak = threading.Event(), {"kb": 0}

    def sample() -> None:
        while not stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak["kb"] = max(peak["kb"], int(line.split()[1]))
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return stop, peak


def run_selection(
    folder: str, n_cand: int, n_ik: int, budget: int, block_rows: int
) -> dict[str, Any]:
    """Body of the subprocess: open the memmaps, select, weight; report time and memory."""
    from grait.selection import RowView, select_idk_samples
    from grait.weighting import adaptive_weights

    stop, peak = _peak_anon()
    base_anon = peak["kb"]
    root = Path(folder)
    idk_pre = np.load(root / "idk_pre.npy", mmap_mode="r")
    idk_raw = np.load(root / "idk_raw.npy", mmap_mode="r")
    van_raw = np.load(root / "van_raw.npy", mmap_mode="r")
    cand_rows = list(range(n_cand))
    started = time.perf_counter()
    result = select_idk_samples(
        RowView(idk_pre),
        RowView(idk_raw, cand_rows),
        RowView(idk_raw, list(range(n_cand, n_cand + n_ik))),
        RowView(van_raw),
        budget,
        block_rows=block_rows,
    )
    picked = result.selected
    weights = adaptive_weights(result.i_idk[picked], result.i_ik[picked])
    seconds = time.perf_counter() - started
    stop.set()
    time.sleep(0.05)
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return {
        "seconds": seconds,
        "peak_rss_mb": hwm / 1024,
        "peak_anon_mb": peak["kb"] / 1024,
        "selected": len(picked),
        "mean_weight": float(np.mean(weights)) if len(weights) else None,
        "_base_anon_mb": base_anon / 1024,
    }


def bench_selection(
    scratch: Path, n_cand: int, dim: int, *, block_rows: int, log: Any
) -> dict[str, Any]:
    n_ik = n_cand // 4
    budget = max(1, n_ik // 4)
    folder = scratch / f"sel-{n_cand}x{dim}"
    t = time.perf_counter()
    make_matrices(folder, n_cand, n_ik, dim)
    gen_seconds = time.perf_counter() - t
    log(f"selection {n_cand}: matrices ready ({gen_seconds:.0f}s); selecting")
    code = (
        "import json,sys; from bench.speed.selection import run_selection; "
        f"print(json.dumps(run_selection({str(folder)!r}, {n_cand}, {n_ik}, {budget}, {block_rows})))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    size_gb = sum(p.stat().st_size for p in folder.glob("*.npy")) / 1e9
    return {
        "candidates": n_cand,
        "known_rows": n_ik,
        "dim": dim,
        "budget": budget,
        "on_disk_gb": size_gb,
        "float32_in_ram_gb": size_gb * 2,
        "generate_seconds": gen_seconds,
        **{k: v for k, v in res.items() if not k.startswith("_")},
    }
