"""Video-P2P core: cross-attention control for video editing, in pure torch.

No ComfyUI import anywhere in this package; hosts (ComfyUI in ``nodes/``, diffusers in
``vp2p.diffusers_host``) are thin adapters around ``AttentionPatch``.
"""

from .control import ATTN1, ATTN2, RUN_STATE_KEY, TEMPORAL, AttentionCall, AttentionController, RunState, VideoOutputs
from .errors import LayoutError, RegistrationError, SettingsError, UnsupportedModelError, VP2PError
from .frame_attention import FrameMode
from .keys import LayerKey
from .layout import COND, UNCOND, BatchLayout, LayoutSpec
from .patch import AttentionPatch, T2SSettings, is_vp2p_patch
from .temporal import BlockShape, TemporalAttention, TemporalBank

__all__ = [
    "ATTN1", "ATTN2", "TEMPORAL", "RUN_STATE_KEY", "AttentionCall", "AttentionController", "RunState", "VideoOutputs",
    "VP2PError", "LayoutError", "RegistrationError", "SettingsError", "UnsupportedModelError",
    "FrameMode", "LayerKey", "COND", "UNCOND", "BatchLayout", "LayoutSpec",
    "AttentionPatch", "T2SSettings", "is_vp2p_patch", "BlockShape", "TemporalAttention", "TemporalBank",
]
__version__ = "0.1.0"
