"""Host tests run against a real ComfyUI when one is found; otherwise they are skipped, loudly.

In CI (``CI`` set) a missing ComfyUI fails every host test instead, unless ``VP2P_SKIP_COMFY=1`` skips
them on purpose (``tests/group_summary.py`` has the rule).
"""

from __future__ import annotations

import pytest

from tests.group_summary import SKIP_COMFY_ENV, in_ci, skipped_on_purpose
from tests.host.comfy_env import find_comfyui, import_comfy, load_pack, make_models, make_narrow_sd15

COMFY = find_comfyui()
NO_COMFY = "no ComfyUI found (set COMFYUI_PATH)"


def _why_not_run():
    """None when the host tests should run; else (skip?, reason)."""
    if skipped_on_purpose(SKIP_COMFY_ENV):
        return True, f"skipped on purpose ({SKIP_COMFY_ENV}=1)"
    if COMFY is None:
        if in_ci():
            return False, f"{NO_COMFY}; in CI the ComfyUI host tests must run (set {SKIP_COMFY_ENV}=1 to skip them on purpose)"
        return True, NO_COMFY
    return None


# The slowest host test files (measured on 2 CPU cores: the example workflows in a server, the null-text
# inversions), run first: scripts/test.sh spreads whole files over pytest-xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder), so a slow file started last would leave one worker alone at the end.
SLOW_FIRST = ("test_workflows.py", "test_comfy_invert.py", "test_comfy_fatezero.py")


def _slow_first(item) -> int:
    name = item.path.name
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slow_first)  # stable: the order within and among the other files is kept
    why = _why_not_run()
    for item in items:
        if "tests/host/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.comfy)
            if why is not None and why[0]:
                item.add_marker(pytest.mark.skip(reason=why[1]))


@pytest.fixture(autouse=True)
def _comfy_required():
    """Fails (CI) the host tests that the collection hook did not skip when ComfyUI is missing."""
    why = _why_not_run()
    if why is not None and not why[0]:
        pytest.fail(why[1], pytrace=False)


@pytest.fixture(scope="session")
def comfy_path():
    if COMFY is None:
        pytest.skip(NO_COMFY)
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
    """SD1.5's full UNet layout in ComfyUI (its own UNet class and SD15 config: 4 levels, 16 transformer keys, 22
    ResBlocks), random weights, 32 channels instead of 320: the tests that use it check which layers fire and which
    norms are found, which the layout decides, not the widths. (At 320 channels, with the diffusers twin it was built
    from, the file holding it peaked at 10.7 GB.)"""
    return make_narrow_sd15(seed=1)
