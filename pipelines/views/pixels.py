"""uint8 views to floats in [0, 1], the same bits on every device.

``x / 255.0`` is not one function: the CPU divides (IEEE division, correctly rounded), CUDA multiplies by the
reciprocal, one ulp off the quotient for 126 of the 256 values, so a store labeled on CPUs and a student on a GPU
would see other inputs. ``float_views`` gives each grey level ``v`` the correctly rounded float32 ``v / 255`` on
any device: a 256-entry table indexed by the grey levels, computed once on the CPU. On the CPU the division itself
gives the table's values (tested for all 256 under every instruction set) at a quarter of a gather's cost, so it
is used there; what CPU-labeled stores saw is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_TABLE = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0))  # IEEE division: exact rounding
_TABLES: dict[torch.device, torch.Tensor] = {}


def float_views(views: torch.Tensor) -> torch.Tensor:
    """uint8 views (any shape and memory format, any device) -> float32 ``v / 255``, correctly rounded, on their
    device."""
    if views.dtype != torch.uint8:
        raise TypeError(f"float_views takes uint8 views, got {views.dtype}")
    if views.device.type == "cpu":
        return views.float().div_(255.0)
    table = _TABLES.get(views.device)
    if table is None:
        table = _TABLES[views.device] = UNIT_TABLE.to(views.device)
    return table[views.int()]
