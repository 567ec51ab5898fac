"""Where the pack keeps files inside ComfyUI: ``models/vp2p/`` (registered with
``folder_paths`` as ``vp2p``: named tuned models users save, share and load),
``models/vp2p/cache/`` (content-addressed results: tuned models, inversions, attention stores
on disk; safe to delete, size-limited by ``cache_admin``) and ``output/vp2p_inversions/``
(inversions users save: results, not caches)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import folder_paths

from ..vp2p import SettingsError

log = logging.getLogger("VideoP2P")

FOLDER = "vp2p"


def register_folders() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})


def models_dir() -> Path:
    register_folders()
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def cache_dir() -> Path:
    """``models/vp2p/cache``: every cache of the pack (``tune_*``, ``inversion_*``, ``attention_*``)."""
    return models_dir() / "cache"


def tuned_names() -> list[str]:
    register_folders()
    return [n for n in folder_paths.get_filename_list(FOLDER) if not n.replace("\\", "/").startswith("cache/")]


def named_path(name: str) -> Path:
    """``models/vp2p/<name>.safetensors`` for a user-given save name (sub-folders allowed)."""
    clean = name.strip().replace("\\", "/")
    if clean.endswith(".safetensors"):
        clean = clean[: -len(".safetensors")]
    if not clean or clean.startswith("/") or ".." in clean.split("/") or not re.fullmatch(r"[\w\-. /]+", clean):
        raise SettingsError(
            f"save_name {name!r} is not a usable file name. Use letters, digits, '-', '_', '.', and '/' for sub-folders."
        )
    return models_dir() / f"{clean}.safetensors"


def resolve(name: str) -> Path:
    register_folders()
    full = folder_paths.get_full_path(FOLDER, name)
    if full is None:
        raise SettingsError(f"No tuned model named {name!r} in {models_dir()}. Tune on Video with a save_name writes one there.")
    return Path(full)


def folder_of(folder_name: str, full_path: Path) -> Path:
    """The folder of ``folder_paths``' ``folder_name`` that ``full_path`` (as ``get_full_path`` gave it, links not
    followed) lies in: loaders refuse a file that is a link out of it (``vp2p.safetensors_io.check_inside``)."""
    for folder in folder_paths.get_folder_paths(folder_name):
        if os.path.commonpath([os.path.abspath(full_path), os.path.abspath(folder)]) == os.path.abspath(folder):
            return Path(folder)
    return Path(full_path).parent


INVERSIONS = "vp2p_inversions"


def inversions_dir() -> Path:
    """``output/vp2p_inversions``: inversions users save and load (an inversion is a result of
    the user's video, not a model), registered with ``folder_paths`` for the loader's list."""
    default = os.path.join(folder_paths.get_output_directory(), INVERSIONS)
    if INVERSIONS not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[INVERSIONS] = ([default], {".safetensors"})
    return Path(folder_paths.get_folder_paths(INVERSIONS)[0])


def legacy_inversion_cache_dir() -> Path:
    """``output/vp2p_inversions/cache``, where earlier versions cached inversions: only cleared now
    (the inversion cache is ``cache_dir()``)."""
    return inversions_dir() / "cache"


def inversion_names() -> list[str]:
    inversions_dir()
    return [n for n in folder_paths.get_filename_list(INVERSIONS) if not n.replace("\\", "/").startswith("cache/")]


def inversion_path(name: str) -> Path:
    """Where ``name`` is saved: ``output/vp2p_inversions/<name>.safetensors`` (validated)."""
    return inversions_dir() / named_path(name).relative_to(models_dir())


def resolve_inversion(name: str) -> Path:
    inversions_dir()
    full = folder_paths.get_full_path(INVERSIONS, name)
    if full is None:
        raise SettingsError(f"No inversion named {name!r} in {inversions_dir()}. 'Save Inversion' writes one there.")
    return Path(full)
