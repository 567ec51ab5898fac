"""Node ``VP2P_SelectFrames`` "Select Frames": a start, a stride and a cap over a clip's frames, and the
frame rate that plays the selection at the clip's real speed."""

from __future__ import annotations

import logging

from comfy_api.latest import io

log = logging.getLogger("VideoP2P")


class SelectFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_SelectFrames",
            display_name="Select Frames (start, stride, cap)",
            category="video_p2p/io",
            search_aliases=["frame stride", "frame load cap", "select every nth frame", "skip frames", "video frames"],
            description=(
                "Picks the frames a video edit uses: from `start`, every `stride`-th frame, at most `cap` of them, and gives "
                "the frame rate that plays them at the clip's real speed (connect it to Create Video). To decode less of a "
                "long file, put core's Video Slice before Get Video Components."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The clip's frames (e.g. Get Video Components' images)."),
                io.Int.Input("start", default=0, min=0, max=1 << 20, tooltip="The first frame used (0 = the clip's first)."),
                io.Int.Input("stride", default=1, min=1, max=1000,
                             tooltip="Take every stride-th frame: 1 = every frame, 2 = every other frame (more motion per "
                                     "frame at the same count and cost)."),
                io.Int.Input("cap", default=8, min=0, max=1 << 20,
                             tooltip="At most this many frames (8 is the Video-P2P paper's setting; each frame costs time and "
                                     "memory in every stage). 0: all frames to the end."),
                io.Float.Input("fps", default=8.0, min=0.001, max=1000.0, step=0.001, optional=True,
                               tooltip="The clip's frame rate (connect Get Video Components' fps); used for the fps output."),
            ],
            outputs=[
                io.Image.Output("images", tooltip="The selected frames, in order."),
                io.Float.Output("fps", tooltip="fps / stride: the rate that plays the selected frames at the real speed."),
                io.Int.Output("frames", tooltip="How many frames were selected."),
            ],
        )

    @classmethod
    def execute(cls, images, start: int, stride: int, cap: int, fps: float = 8.0) -> io.NodeOutput:
        from ..vp2p.frames import frame_indices, played_fps

        picked = frame_indices(int(images.shape[0]), int(start), int(stride), int(cap))
        if cap and len(picked) < cap:
            log.info("Select Frames: the clip gives %d frames from frame %d at stride %d (cap %d).", len(picked), start, stride, cap)
        return io.NodeOutput(images[picked], played_fps(float(fps), int(stride)), len(picked))
