"""What the pack needs to know about a ComfyUI MODEL and its inputs: the text embedding of a
CONDITIONING, the training schedule, the prediction kind, and a fingerprint of what the
MODEL computes (for caches and for refusing results made with another model)."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional

import comfy.model_management
import torch

from ..vp2p import SettingsError
from ..vp2p.fingerprint import fingerprint
from .comfy_host import foreign_parts, get_state, motion_modules

log = logging.getLogger("VideoP2P")

# Digest cache, not run state: per base model object, keyed by what decides its effective
# weights (the patcher's patches_uuid and object patches) and the temporal layers' digest.
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def conditioning_tensor(conditioning: list, frames: int, what: str = "positive", node: str = "This node") -> torch.Tensor:
    """The text embedding of a CONDITIONING: [1, T, D] or [F, T, D]."""
    if not conditioning:
        raise SettingsError(f"{node}: the {what} CONDITIONING is empty; connect a CLIP Text Encode.")
    if len(conditioning) > 1:
        log.warning("%s: the %s CONDITIONING has %d entries; only the first is used.", node, what, len(conditioning))
    cond = conditioning[0][0]
    if cond.dim() != 3 or cond.shape[0] not in (1, frames):
        raise SettingsError(
            f"{node}: the {what} CONDITIONING has a batch of {cond.shape[0]} but the video has {frames} frames; give one "
            "prompt (batch 1) or one per frame."
        )
    return cond


def conditioning_key(conditioning: Optional[list], name: str) -> Optional[tuple[list[tuple[str, torch.Tensor]], dict]]:
    """What a CONDITIONING contributes to a cache key: its tensors (text, pooled output, masks …) and plain
    values (strength, areas, timestep ranges …) of every entry; ``None`` when an entry holds an object
    whose effect cannot be keyed by content (a ControlNet, GLIGEN, hooks): such a result is not cached."""
    tensors: list[tuple[str, torch.Tensor]] = []
    values: dict[str, Any] = {}
    for i, entry in enumerate(conditioning or []):
        tensors.append((f"{name}.{i}", entry[0]))
        for k in sorted(entry[1]):
            v = entry[1][k]
            if isinstance(v, torch.Tensor):
                tensors.append((f"{name}.{i}.{k}", v))
            elif v is None or isinstance(v, (bool, int, float, str)) or (
                    isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v)):
                values[f"{name}.{i}.{k}"] = repr(v)
            else:
                return None
    return tensors, values


def alphas_cumprod(model: Any) -> torch.Tensor:
    """ᾱ of the model's discrete training schedule, from its sigmas (ᾱ = 1/(1+σ²))."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas**2)


def prediction_kind(model: Any, node: str = "This node") -> str:
    """"eps" or "v"; anything else is refused."""
    import comfy.model_base

    kind = getattr(model.model, "model_type", None)
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v"
    if kind in (comfy.model_base.ModelType.EPS, None):
        return "eps"
    raise SettingsError(f"{node} supports eps- and v-prediction models; this MODEL predicts {kind}.")


def model_fingerprint(model: Any) -> str:
    """Fingerprint of what a MODEL computes: its effective UNet weights (base + its patches,
    e.g. LoRAs and earlier tuning, as loaded for this MODEL), its temporal layers and T2S settings, a tuned
    motion module's deltas, and the names of what other extensions put on its patcher (``foreign_parts``:
    an inversion made with an AnimateDiff motion module does not fit the MODEL without it).

    The first call per (model, patches) loads the model and hashes every weight; later calls
    for the same patches are a dictionary look-up (ComfyUI renews ``patches_uuid`` whenever
    a patcher's weight patches change).
    """
    from .motion_tuning import motion_deltas_of

    state = get_state(model)
    bank = [(f"vp2p_temporal.{k}", v) for k, v in state.bank.state_dict().items()] if state and state.bank is not None else []
    bank += [(f"vp2p_motion.{k}", v) for k, v in sorted(motion_deltas_of(model).tensors.items())]
    settings = {"t2s": state.settings.describe() if state else None}
    foreign = foreign_parts(model)
    if foreign:  # e.g. an AnimateDiff motion module: results made with it are not results of the UNet alone
        settings.update(foreign=foreign, motion_modules=motion_modules(model))
    stamp = (str(model.patches_uuid), tuple(sorted((k, id(v)) for k, v in model.object_patches.items())),
             fingerprint(bank, settings))
    memo = _fingerprints.setdefault(model.model, {})
    if stamp not in memo:
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        memo[stamp] = fingerprint(list(model.model.diffusion_model.state_dict().items()) + bank, settings)
    return memo[stamp]
