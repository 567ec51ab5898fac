"""Shared fixtures: tiny random-weight models initialised as DESIGN §6 asks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import tiny_unet  # noqa: E402


@pytest.fixture(scope="session")
def unet():
    """A tiny diffusers UNet2DConditionModel with SD1.x's block structure (keys input 1,2 · middle 0 · output 3,4,5)."""
    return tiny_unet(seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
