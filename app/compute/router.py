"""GET /v1/compute_classes: the hardware classes jobs can be planned on, and this deployment's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import REQUIRE_KEY, SettingsDep
from app.errors import ERROR_RESPONSES
from grait.planning import compute_classes, load_compute_class

router = APIRouter(
    prefix="/v1/compute_classes",
    tags=["compute"],
    responses=ERROR_RESPONSES,
    dependencies=[REQUIRE_KEY],
)


@router.get("")
def list_compute_classes(settings: SettingsDep) -> dict[str, Any]:
    """Each class's limits and whether its efficiencies were measured (`calibration`);
    `offered`: this deployment has workers for it (a job may name it); `deployed`: the class
    of a job that names none (GRAIT_COMPUTE_CLASS)."""
    data = []
    for name in compute_classes():
        cls = load_compute_class(name)
        data.append(
            {
                "id": name,
                "object": "compute_class",
                "device": cls.device,
                "description": cls.description,
                "memory_bytes": round(cls.memory_bytes),
                "bandwidth_bytes_per_second": cls.bandwidth,
                "peak_flops": cls.peak_flops,
                "calibration": cls.calibration,
                "offered": name in settings.offered_classes,
                "deployed": name == settings.compute_class,
            }
        )
    return {"object": "list", "data": data, "has_more": False}
