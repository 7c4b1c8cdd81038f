"""Loading under a memory plan: a local checkpoint whose plan keeps something off the card is read into
host memory first (the plan has checked the room), so the card never holds more than the plan puts
there; apply.py then moves what stays resident. Presets and resident plans load as usual."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import PRESETS

if TYPE_CHECKING:
    from ..model.components import Components
    from .plan import MemoryPlan


def load_planned(
    model: str | Path, plan: MemoryPlan | None, *, dtype: torch.dtype, device: str | torch.device
) -> Components:
    """Components of `model` for `plan`: a checkpoint under a plan that is not all resident, on the
    host (apply_plan places it); otherwise on `device`, as model.load.load_components does. The
    synthetic presets are built on their device (the `full` preset needs a card that holds it)."""
    from ..model.load import load_components

    if plan is None or plan.resident or str(model) in PRESETS:
        return load_components(model, dtype=dtype, device=device)
    from ..model.checkpoints import load_local

    return load_local(Path(str(model)), dtype=dtype, device=torch.device("cpu"), check_room=False)
