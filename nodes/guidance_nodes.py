"""Nodes ``VP2P_BoxTrajectory`` "Box Trajectory Masks" and ``VP2P_CrossAttentionGuidance``
"Cross-Attention Guidance"."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vp2p.masks import Easing, MaskShape

log = logging.getLogger("VideoP2P")

BOX_HELP = "normalised ({}): 0 = left/top edge, 1 = right/bottom edge"


class BoxTrajectory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def box(prefix: str, x: float, y: float, w: float, h: float) -> list:
            return [io.Float.Input(f"{prefix}_{n}", default=v, min=0.0, max=1.0, step=0.01,
                                   tooltip=f"{prefix} box {label} " + BOX_HELP.format(n))
                    for n, v, label in (("x", x, "left"), ("y", y, "top"), ("w", w, "width"), ("h", h, "height"))]

        return io.Schema(
            node_id="VP2P_BoxTrajectory",
            display_name="Box Trajectory Masks",
            category="video_p2p/guidance",
            search_aliases=["box trajectory", "moving mask", "cross-attention guidance"],
            description="Per-frame masks of a box (or ellipse) moving and resizing from a start box on the first frame to an "
                        "end box on the last: where an object should be, for Cross-Attention Guidance or any node taking MASK.",
            inputs=[
                io.Int.Input("width", default=512, min=8, max=8192, step=8, tooltip="Frame width in pixels."),
                io.Int.Input("height", default=512, min=8, max=8192, step=8, tooltip="Frame height in pixels."),
                io.Int.Input("frames", default=8, min=1, max=4096, tooltip="Number of frames (the video's batch size)."),
                *box("start", 0.1, 0.3, 0.3, 0.3),
                *box("end", 0.6, 0.3, 0.3, 0.3),
                io.Combo.Input("shape", options=[s.value for s in MaskShape], default=MaskShape.BOX.value,
                               tooltip="box or ellipse inscribed in the box."),
                io.Combo.Input("easing", options=[e.value for e in Easing], default=Easing.LINEAR.value,
                               tooltip="How the box moves between start and end over the frames."),
            ],
            outputs=[io.Mask.Output(tooltip="MASK [frames, height, width]: 1 inside the box.")],
        )

    @classmethod
    def execute(cls, width: int, height: int, frames: int, start_x: float, start_y: float, start_w: float, start_h: float,
                end_x: float, end_y: float, end_w: float, end_h: float, shape: str, easing: str) -> io.NodeOutput:
        from ..vp2p.masks import box_trajectory

        return io.NodeOutput(box_trajectory(width, height, frames, (start_x, start_y, start_w, start_h),
                                            (end_x, end_y, end_w, end_h), MaskShape.parse(shape), Easing.parse(easing)))


class CrossAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .guidance_host import LAYER_CHOICES

        return io.Schema(
            node_id="VP2P_CrossAttentionGuidance",
            display_name="Cross-Attention Guidance",
            category="video_p2p/guidance",
            search_aliases=["cross-attention guidance", "layout guidance", "move object", "video generation"],
            description=(
                "A GUIDER for SamplerCustomAdvanced that moves and resizes an object: at guided steps the latent is pulled "
                "so that the word's cross-attention takes the shape of the target masks (backward guidance, Motamed et al.). "
                "Exact for Euler and DDIM; other samplers get the same correction folded into that step's prediction."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x/SDXL MODEL (inflated T2S, or with temporal modules from other packs)."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning (CLIP Text Encode of `prompt`)."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompt (to find the word's tokens)."),
                io.String.Input("prompt", default="a red ball on a table",
                                tooltip="The text of the positive prompt (checked against it). Type it once: link one String "
                                        "(Multiline) node here and to the CLIP Text Encode of `positive`; a linked value "
                                        "replaces the typed one."),
                io.String.Input("word", default="ball", tooltip="The word whose object is moved (a word of the prompt)."),
                io.Mask.Input("target_masks", tooltip="Where the object should be: one mask per frame, or one for all frames "
                                                      "(e.g. Box Trajectory Masks)."),
                io.Float.Input("strength", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="η, the step size of the guidance (15–25 in the study). 0 = plain sampling, exactly."),
                io.Combo.Input("schedule", options=["study", "every_step"], default="study", optional=True,
                               tooltip="study: every step for the first quarter of the steps, then every other step. "
                                       "every_step: all steps (slower, stronger)."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default="16x16_8x8_middle", optional=True,
                               tooltip="Which cross-attention maps the energy uses, by their size at SD1.x's 512² (latent/4 "
                                       "and latent/8; SD1.x has latent/8 maps in the middle block only). On SDXL at 1024² the "
                                       "same levels are its coarsest, 32² (latent/4), and the middle block. The study found the "
                                       "middle block essential."),
            ],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, prompt: "str | None" = None, word: "str | None" = None) -> "bool | str":
        """Before the run: ``word`` names words of ``prompt`` (its plain words: '(ball:1.2)' is 'ball')."""
        from ..vp2p import SettingsError
        from ..vp2p.prompt_align import check_words_present, prompt_words, split_words
        from .prompt_host import parse_weights, validation_message

        def check() -> None:
            if word is None:
                return
            if not split_words(word):
                raise SettingsError("word is empty: name the word of the prompt whose object is moved (e.g. 'ball').")
            if prompt is not None:
                check_words_present([w for w, _ in prompt_words(prompt, parse_weights)], split_words(word), "word", "positive", prompt)

        return validation_message(check)

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, clip, prompt: str, word: str, target_masks, strength: float,
                schedule: str = "study", layers: str = "16x16_8x8_middle") -> io.NodeOutput:
        from ..vp2p import SettingsError
        from ..vp2p.prompt_align import split_words, word_positions
        from .guidance_host import CrossAttentionGuider, guided_model
        from .prompt_host import encode_prompt, tokenized_prompt

        tokens = tokenized_prompt(clip, prompt)
        positions = tuple(word_positions(tokens, split_words(word), "word", "positive"))
        if not positive:
            raise SettingsError("The positive CONDITIONING is empty; connect a CLIP Text Encode of the prompt.")
        cond = positive[0][0]
        ref = encode_prompt(clip, prompt)
        if cond.shape[1:] != ref.shape[1:] or not bool((cond[:1].float().cpu() - ref).abs().max() < 1e-3):
            raise SettingsError(f"`prompt` ({prompt!r}) is not the text of the positive conditioning. Type the same text in "
                                "both (the word's tokens are found in `prompt`).")
        masks = target_masks if target_masks.dim() == 3 else target_masks.reshape(-1, *target_masks.shape[-2:])
        if float(masks.max()) <= 0:
            raise SettingsError("target_masks is empty (all zero): draw where the object should be, e.g. with Box Trajectory Masks.")
        guider = CrossAttentionGuider(guided_model(model), cond, positions, masks, strength, layers, schedule)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
