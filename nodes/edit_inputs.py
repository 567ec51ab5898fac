"""What an edit takes from its inputs, shared by the pack's own loops (``p2p_host.run_edit``,
``fatezero_host.run_fused``) and the GUIDER (``edit_guider``): the ``EditInputs`` built from an
inversion, and the checks that the inversion, the MODEL and the control belong together, made
before any UNet call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..vp2p import SettingsError
from ..vp2p.attention_store import check_store_matches
from ..vp2p.edit import EditInputs
from ..vp2p.fatezero import FateZeroEdit, check_store_covers
from ..vp2p.inversion_file import Inversion, check_fits
from ..vp2p.p2p import P2PEdit
from .comfy_host import get_state
from .model_facts import model_fingerprint


def edit_inputs(inversion: Inversion, controller_source: torch.Tensor, cfg: float, device: Any) -> EditInputs:
    """What the edit takes from an inversion, on ``device`` (the one place it is built); ``controller_source``:
    the controller's source prompt, the source's text where nothing was inverted (Start From Noise)."""
    return EditInputs(
        z_t=inversion.z_t.to(device), schedule=inversion.schedule, cond=inversion.source_text(controller_source).to(device),
        null_embeddings=None if inversion.null_embeddings is None else inversion.null_embeddings.to(device),
        negative=(inversion.negative if inversion.negative is not None else inversion.cond).to(device),
        cfg=inversion.source_cfg(cfg),
        source_path=None if inversion.source_path is None else inversion.source_path.to(device))


def check_consistency(model: Any, inversion: Inversion, edit: P2PEdit) -> None:
    """The inversion must come from this MODEL and the controller's source prompt."""
    if not isinstance(inversion, Inversion):
        raise SettingsError(f"inversion must come from 'Shared Null-Text Invert' or 'Load Inversion'; got {type(inversion).__name__}.")
    if inversion.generated:  # Start From Noise: no model was used yet, and the source prompt is the controller's
        return
    check_fits(inversion, model_fingerprint(model), inversion.latent_shape, "The inversion")
    cond = inversion.cond
    same = cond.shape[1:] == edit.source_cond.shape[1:] and torch.allclose(cond.float(), edit.source_cond.expand_as(cond).float(),
                                                                           atol=1e-3, rtol=1e-3)
    if not same:
        raise SettingsError(
            f"The controller's source prompt {edit.source.text!r} is not the prompt the video was inverted with. Use the "
            "same text (and CLIP) in the controller's source_prompt and the inverter's positive conditioning."
        )


def check_fusion(model: Any, inversion: Inversion, control: FateZeroEdit) -> None:
    """Everything a fused edit needs, checked before any UNet call."""
    if not isinstance(inversion, Inversion):
        raise SettingsError(f"inversion must come from 'Shared Null-Text Invert' or 'Load Inversion'; got {type(inversion).__name__}.")
    if inversion.generated:
        raise SettingsError("A FateZero control edits a real video through its stored attention; 'Start From Noise' has none. "
                            "Invert the video with store_attention on, or use a P2P Controller on generated videos.")
    check_consistency(model, inversion, control.edit)
    if inversion.attention is None:
        raise SettingsError(
            "This inversion has no attention store, which the FateZero control reads. Turn on store_attention in 'Shared "
            "Null-Text Invert' and queue again: the cached inversion is reused and only the store is recorded."
        )
    if get_state(model) is None:
        raise SettingsError("The MODEL has no pack attention patch to fuse the stored attention with; use the MODEL from "
                            "'Inflate to T2S' (or Tune on Video) that the video was inverted with.")
    check_store_matches(inversion.attention, inversion.cond)
    check_store_covers(control, inversion.attention, inversion.schedule)
