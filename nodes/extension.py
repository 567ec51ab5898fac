"""The pack's ComfyExtension: the list of nodes ComfyUI registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .frame_nodes import SelectFrames
from .guidance_nodes import BoxTrajectory, CrossAttentionGuidance
from .invert_nodes import LoadInversion, NoiseInversion, NullTextInvert, SaveInversion
from .p2p_nodes import AttentionMaps, DecoupledSampler, FateZeroController, P2PController, VideoP2PGuiderNode
from .t2s_nodes import InflateT2S
from .tune_nodes import LoadTunedT2S, TuneOnVideo


class VideoP2PExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .cache_admin import register_cache_routes
        from .routes import register_routes
        from .storage import register_folders

        register_folders()
        register_routes()
        register_cache_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [InflateT2S, TuneOnVideo, LoadTunedT2S, NullTextInvert, SaveInversion, LoadInversion,
                P2PController, DecoupledSampler, AttentionMaps, BoxTrajectory, CrossAttentionGuidance,
                NoiseInversion, FateZeroController, VideoP2PGuiderNode, SelectFrames]
