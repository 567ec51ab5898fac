"""Host tests run against a real ComfyUI when one is found; otherwise they are skipped, loudly."""

from __future__ import annotations

import pytest

from tests.host.comfy_env import find_comfyui, import_comfy, load_pack, make_models

COMFY = find_comfyui()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/host/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.comfy)
            if COMFY is None:
                item.add_marker(pytest.mark.skip(reason="no ComfyUI found (set COMFYUI_PATH)"))


@pytest.fixture(scope="session")
def comfy_path():
    if COMFY is None:
        pytest.skip("no ComfyUI found (set COMFYUI_PATH)")
    import_comfy(COMFY)
    return COMFY


@pytest.fixture(scope="session")
def pack(comfy_path):
    return load_pack()


@pytest.fixture(scope="session")
def small_models(comfy_path):
    """2-level SD1.5-format UNet: (diffusers, ComfyUI) with the same weights."""
    return make_models(levels=2, seed=0)


@pytest.fixture(scope="session")
def full_sd15(comfy_path):
    """Full-shape SD1.5 UNet (16 transformer keys), random weights, in ComfyUI."""
    return make_models(levels=4, seed=1)[1]
