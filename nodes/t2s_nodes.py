"""Node ``VP2P_InflateT2S`` — "Inflate to T2S"."""

from __future__ import annotations

from comfy_api.latest import io

from ..vp2p import FrameMode, T2SSettings
from ..vp2p.video_norm import NormScope
from .comfy_host import inflate

FRAME_MODE_HELP = (
    "Which frames each frame's self-attention looks at. first_frame: frame 0 (Video-P2P). "
    "sparse_causal: frame 0 and the previous frame (Tune-A-Video; shape edits). "
    "middle_frame: the middle frame (FateZero; style/attribute edits without tuning). "
    "none: every frame on its own (the image model)."
)


class InflateT2S(io.ComfyNode):
    """Turn an SD image model into a text-to-set model: frames of a latent batch become one video."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_InflateT2S",
            display_name="Inflate to T2S",
            category="video_p2p/1 model",
            search_aliases=["t2s", "text-to-set", "inflate", "video p2p", "video edit", "tune-a-video"],
            description=(
                "Inflates an SD1.x/SD2.x/SDXL MODEL into a text-to-set (T2S) model: the latent batch is one video, "
                "self-attention becomes frame attention and (optionally) temporal attention layers are added. "
                "The input MODEL is not changed. The output works with stock samplers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x/SDXL MODEL (from a checkpoint loader, LoRA, IPAdapter …). It is cloned, never modified."),
                io.Combo.Input("frame_attention", options=[m.value for m in FrameMode], default=FrameMode.FIRST_FRAME.value,
                               tooltip=FRAME_MODE_HELP),
                io.Boolean.Input("temporal_attention", default=True,
                                 tooltip="Add temporal attention layers (attention over frames at every position), as in "
                                         "Tune-A-Video/Video-P2P. They start as an exact identity and only act after Tune on Video. "
                                         "With an AnimateDiff motion module on the MODEL they are left out unless "
                                         "temporal_with_motion_module is on (the motion module is the temporal layer)."),
                io.Int.Input("frame_attention_min_channels", default=0, min=0, max=16384, step=1, optional=True,
                             tooltip="Transformer blocks narrower than this many channels keep plain per-frame self-attention. "
                                     "0: frame attention in every block. FateZero uses 640 (SD1.x: its 320-channel blocks at "
                                     "full latent resolution stay per frame; 1280 in a few of its configs)."),
                io.Combo.Input("group_norm", options=[m.value for m in NormScope], default=NormScope.VIDEO.value, optional=True,
                               tooltip="video: the ResNet blocks' GroupNorms take their statistics over all frames of the video "
                                       "together, as the 3-D UNet of Tune-A-Video, Video-P2P and FateZero does (what their "
                                       "results were made with). frame: each frame on its own, as the image model."),
                io.Int.Input("frames_per_chunk", default=0, min=0, max=4096, step=1, optional=True,
                             tooltip="Long videos: run the UNet on this many frames at a time (every stage of the pack and "
                                     "stock samplers). 0: all frames in one call. Frame attention stays exact (the anchor "
                                     "frame's keys/values are shared by every chunk); the temporal layers (once tuned) attend "
                                     "within a chunk, and group_norm=video pools a chunk's frames, which changes results "
                                     "slightly. Memory then grows with the chunk, not the clip. 8–16 suits 512² on 12–24 GB."),
                io.Int.Input("chunk_overlap", default=0, min=0, max=4095, step=1, optional=True,
                             tooltip="Frames consecutive chunks share (with frames_per_chunk): they are computed in both chunks "
                                     "and blended with a linear ramp, as AnimateDiff's context windows do, which smooths what "
                                     "tuned temporal layers see at chunk borders; costs overlap/(chunk − overlap) more UNet "
                                     "work. Must be smaller than frames_per_chunk. 0: chunks side by side."),
                io.Boolean.Input("temporal_with_motion_module", default=False, optional=True,
                                 tooltip="Only when the MODEL carries an AnimateDiff motion module (AnimateDiff-Evolved nodes before "
                                         "this one): the motion module already is a temporal layer, so the pack's own temporal "
                                         "attention layers are left out (off). On: add them as well (temporal_attention on)."),
            ],
            outputs=[io.Model.Output(tooltip="The inflated MODEL: a latent batch of F frames is sampled as one video.")],
        )

    @classmethod
    def validate_inputs(cls, frames_per_chunk: "int | None" = None, chunk_overlap: "int | None" = None) -> "bool | str":
        """Before the run: no negative counts; an overlap needs chunks longer than it. A linked input (None) skips its
        checks (naming the inputs here takes them out of ComfyUI's own min/max check)."""
        for name, value in (("frames_per_chunk", frames_per_chunk), ("chunk_overlap", chunk_overlap)):
            if value is not None and value < 0:
                return f"{name}={value} must be ≥ 0 (frames_per_chunk 0: every frame in one UNet call; chunk_overlap 0: none)."
        if frames_per_chunk is None or chunk_overlap is None or not chunk_overlap:
            return True
        if chunk_overlap >= frames_per_chunk:
            if not frames_per_chunk:
                return (f"chunk_overlap={chunk_overlap} needs frames_per_chunk: the frames consecutive chunks share only exist when "
                        "the video runs in chunks. Set frames_per_chunk (e.g. 8) or chunk_overlap 0.")
            return (f"chunk_overlap={chunk_overlap} must be smaller than frames_per_chunk={frames_per_chunk} (the frames two chunks "
                    f"share; e.g. {max(1, frames_per_chunk // 4)}).")
        return True

    @classmethod
    def execute(cls, model, frame_attention: str, temporal_attention: bool, frame_attention_min_channels: int = 0,
                group_norm: str = NormScope.VIDEO.value, frames_per_chunk: int = 0, chunk_overlap: int = 0,
                temporal_with_motion_module: bool = False) -> io.NodeOutput:
        settings = T2SSettings(FrameMode.parse(frame_attention), bool(temporal_attention), NormScope.parse(group_norm),
                               int(frame_attention_min_channels), int(frames_per_chunk), int(chunk_overlap))
        return io.NodeOutput(inflate(model, settings, temporal_with_motion_module=bool(temporal_with_motion_module)))
