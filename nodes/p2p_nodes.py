"""Nodes ``VP2P_P2PController`` "P2P Controller" and ``VP2P_DecoupledSampler`` "Decoupled Sampler"."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vp2p.edit import Guidance
from ..vp2p.fatezero import BlendLatent
from ..vp2p.p2p import SelfReplace
from ..vp2p.prompt_align import EditKind
from .invert_nodes import Inversion

log = logging.getLogger("VideoP2P")

Control = io.Custom("VP2P_CONTROL")

EDIT_HELP = (
    "replace: swap words one for one ('a cat' → 'a tiger'; same number of words, a word may become several tokens). "
    "refine: add or change words ('a cat' → 'a fluffy cat'); aligned tokens keep the source's attention, new ones use "
    "their own. auto: replace when the prompts have the same number of words, else refine."
)
SOURCE_PROMPT_HELP = (
    "Exactly the prompt the video was inverted with (checked when sampling). Type it once: link one String (Multiline) node "
    "here and to the text of the CLIP Text Encode feeding the inverter's positive; a linked value replaces the typed one. "
    "Emphasis '(word:1.2)' and embeddings work as in CLIP Text Encode; blend and reweight words name the plain words."
)
GUIDANCE_HELP = (
    "decoupled (Video-P2P): the source branch uses the optimised null embeddings, the target the initial negative one: "
    "faithful source, strong edits. shared_null (prompt-to-prompt): the optimised embeddings for both. fast: the source "
    "branch conditional only (pairs with a ddim_only inversion), the target with cfg."
)


class P2PController(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_P2PController",
            display_name="P2P Controller",
            category="video_p2p/3 edit",
            search_aliases=["p2p", "prompt to prompt", "prompt-to-prompt", "video edit", "word swap", "video p2p"],
            description=(
                "Describes a prompt-to-prompt edit of the inverted video: the source prompt (the one it was inverted with), "
                "the target prompt, and how the target's attention is taken from the source's. Only this node and the "
                "sampler re-run when you change the target."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint (its own tokenizer aligns the words)."),
                io.String.Input("source_prompt", default="a cat is running on the grass",
                                tooltip=SOURCE_PROMPT_HELP),
                io.String.Input("target_prompt", default="a tiger is running on the grass",
                                tooltip="The edited description: swap, add or re-weight words."),
                io.Combo.Input("edit", options=[k.value for k in EditKind], default=EditKind.AUTO.value, tooltip=EDIT_HELP),
                io.Float.Input("cross_replace", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps during which the target's cross-attention is taken from the "
                                       "source (layout kept). More keeps more of the source's structure. Default 0.2 as the "
                                       "official Video-P2P code (the paper quotes 0.4; its stylisation config uses 0.8)."),
                io.Float.Input("self_replace", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps during which the target's self-attention maps are the "
                                       "source's (motion and shape kept); see self_replace_attention. Default 0.5 as the "
                                       "official Video-P2P code."),
                io.String.Input("blend_source_words", default="",
                                tooltip="Local blend: words of the source prompt whose region may change (e.g. 'cat'). "
                                        "Empty (with empty target words): no local blend, the whole frame may change."),
                io.String.Input("blend_target_words", default="",
                                tooltip="Local blend: words of the target prompt whose region may change (e.g. 'tiger'). "
                                        "Outside the union of both regions each frame keeps the source exactly."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend mask threshold on the normalised attention (0.3 in Video-P2P); lower "
                                       "grows the edited region. See 'Attention Maps' to choose."),
                io.String.Input("reweight", default="",
                                tooltip="Scale words' cross-attention in the target while it is replaced, e.g. "
                                        "'fluffy:2.0, grass:0.5'. Words must be in the target prompt. Empty: none."),
                io.String.Input("cross_replace_words", default="", optional=True,
                                tooltip="Per-word cross_replace fractions for target words, e.g. 'tiger:0.6'."),
                io.Combo.Input("self_replace_attention", options=[s.value for s in SelfReplace], default=SelfReplace.TEMPORAL.value,
                               optional=True,
                               tooltip="Which self-attention self_replace acts on. temporal (the reference Video-P2P's "
                                       "behaviour): the temporal-attention maps only. frame: frame attention (layers of "
                                       "≤16² tokens, as prompt-to-prompt). both."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Local blend applies from this fraction of the steps on (0.2 in Video-P2P)."),
                io.Boolean.Input("blend_average", default=True, optional=True,
                                 tooltip="Masks from attention averaged over the steps so far (the reference's behaviour); "
                                         "off: the current step's attention only."),
            ],
            outputs=[Control.Output("control", tooltip="The edit, for the Decoupled Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, source_prompt: "str | None" = None, target_prompt: "str | None" = None, edit: "str | None" = None,
                        reweight: "str | None" = None, blend_source_words: "str | None" = None,
                        blend_target_words: "str | None" = None, cross_replace_words: "str | None" = None) -> "bool | str":
        """Before the run (no CLIP needed): the edit kind, replace's word counts, the ``word:value`` lists and every
        listed word in its prompt (plain words: '(cat:1.2)' is 'cat'). A linked input (None) skips its checks."""
        from ..vp2p.prompt_align import check_edit_words
        from .prompt_host import parse_weights, validation_message

        return validation_message(lambda: check_edit_words(
            source_prompt, target_prompt, edit, parse_weights, reweight=reweight, cross_replace_words=cross_replace_words,
            source_lists={"blend_source_words": blend_source_words}, target_lists={"blend_target_words": blend_target_words}))

    @classmethod
    def execute(cls, clip, source_prompt: str, target_prompt: str, edit: str, cross_replace: float, self_replace: float,
                blend_source_words: str, blend_target_words: str, blend_threshold: float, reweight: str,
                cross_replace_words: str = "", self_replace_attention: str = "temporal", blend_start: float = 0.2,
                blend_average: bool = True) -> io.NodeOutput:
        from .p2p_host import build_edit

        p2p = build_edit(clip, source_prompt, target_prompt, edit, cross_replace, self_replace, blend_source_words,
                         blend_target_words, blend_threshold, reweight, cross_replace_words, self_replace_attention,
                         blend_start, blend_average)
        log.info("P2P Controller: %s, %r → %r", p2p.kind.value, p2p.source.text, p2p.target.text)
        return io.NodeOutput(p2p)


class FateZeroController(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_FateZeroController",
            display_name="FateZero Controller",
            category="video_p2p/3 edit",
            search_aliases=["fatezero", "zero-shot video edit", "attention fusion", "video edit"],
            description=(
                "A zero-shot edit (FateZero): the Decoupled Sampler denoises only the target and fuses the source attention "
                "stored during the inversion (store_attention on). Cross-attention is taken from the source as in "
                "prompt-to-prompt; self-attention is the source's during the first self_replace of the steps, except where "
                "the blend words attend (there the edit keeps its own). Style and attribute edits need no tuning; shape "
                "edits work best on a tuned model with sparse_causal frame attention."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint (its own tokenizer aligns the words)."),
                io.String.Input("source_prompt", default="a silver jeep driving down a curvy road",
                                tooltip=SOURCE_PROMPT_HELP),
                io.String.Input("target_prompt", default="watercolor painting of a silver jeep driving down a curvy road",
                                tooltip="The edited description: add a style, change an attribute or swap an object."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps during which the target's cross-attention is rebuilt from the "
                                       "stored source maps (layout kept). FateZero: 0.8 for style, 0.5–0.8 for attributes, "
                                       "0.5 for shapes."),
                io.Float.Input("self_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps during which the self-attention is the source's (structure and "
                                       "motion kept), blended by the blend words' mask. FateZero: 0.8 style, 0.5 shapes."),
                io.String.Input("blend_words", default="",
                                tooltip="Source words whose region may change shape (e.g. 'jeep'): there the edit keeps its "
                                        "own self-attention. Empty: the self-attention is replaced everywhere (style edits)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold on the blend words' normalised source cross-attention (FateZero: 0.3). 1: "
                                       "no region (full replacement); 0: everywhere (no replacement)."),
                io.String.Input("reweight", default="",
                                tooltip="Scale target words' cross-attention while it is replaced, e.g. 'watercolor:10' (FateZero "
                                        "amplifies style words by up to 10). Empty: none."),
                io.Boolean.Input("latent_blend", default=False,
                                 tooltip="Also keep the inverted video's latents outside the blend words' region between 20% "
                                         "and 80% of the steps (FateZero's local latent blend). Needs blend_words."),
                io.Combo.Input("edit", options=[k.value for k in EditKind], default=EditKind.AUTO.value, optional=True,
                               tooltip=EDIT_HELP),
                io.String.Input("latent_blend_target_words", default="", optional=True,
                                tooltip="Target words whose region is added to the latent blend mask (e.g. 'porsche')."),
                io.Float.Input("latent_blend_start", default=0.2, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="The latent blend starts at this fraction of the steps (FateZero: 0.2)."),
                io.Float.Input("latent_blend_end", default=0.8, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="The latent blend stops at this fraction of the steps (FateZero: 0.8). As in "
                                       "FateZero's code the last blended step is int(end·steps) − 2 (step 38 of 0–49)."),
                io.Combo.Input("latent_blend_source", options=[b.value for b in BlendLatent], default=BlendLatent.SAME_LEVEL.value,
                               optional=True,
                               tooltip="Which inverted latent the latent blend keeps outside its mask. same_level: the one at "
                                       "the noise level the step reached (keeps the background exactly on its inversion path). "
                                       "one_level_noisier: the one a step noisier, as FateZero's code reads it (for parity "
                                       "with its numbers)."),
            ],
            outputs=[Control.Output("control", tooltip="The edit, for the Decoupled Sampler (with an inversion that stored "
                                                       "attention).")],
        )

    @classmethod
    def validate_inputs(cls, source_prompt: "str | None" = None, target_prompt: "str | None" = None, blend_words: "str | None" = None,
                        reweight: "str | None" = None, latent_blend: "bool | None" = None, edit: "str | None" = None,
                        latent_blend_target_words: "str | None" = None, latent_blend_start: "float | None" = None,
                        latent_blend_end: "float | None" = None) -> "bool | str":
        """Before the run (no CLIP needed): as the P2P Controller's, with blend_words in the source prompt,
        latent_blend_target_words in the target, latent_blend's words and window."""
        from .fatezero_host import check_fatezero_inputs
        from .prompt_host import validation_message

        return validation_message(lambda: check_fatezero_inputs(source_prompt, target_prompt, blend_words, reweight, latent_blend,
                                                                edit, latent_blend_target_words, latent_blend_start,
                                                                latent_blend_end))

    @classmethod
    def execute(cls, clip, source_prompt: str, target_prompt: str, cross_replace: float, self_replace: float, blend_words: str,
                blend_threshold: float, reweight: str, latent_blend: bool, edit: str = "auto", latent_blend_target_words: str = "",
                latent_blend_start: float = 0.2, latent_blend_end: float = 0.8,
                latent_blend_source: str = BlendLatent.SAME_LEVEL.value) -> io.NodeOutput:
        from .fatezero_host import build_fatezero

        fz = build_fatezero(clip, source_prompt, target_prompt, float(cross_replace), float(self_replace), blend_words,
                            float(blend_threshold), reweight, bool(latent_blend), edit, latent_blend_target_words,
                            float(latent_blend_start), float(latent_blend_end), latent_blend_source)
        log.info("FateZero Controller: %s, %r → %r", fz.edit.kind.value, fz.edit.source.text, fz.edit.target.text)
        return io.NodeOutput(fz)


EDIT_INPUT_HELP = {
    "model": "The MODEL the video was inverted with (checked).",
    "inversion": "From 'Shared Null-Text Invert' or 'Load Inversion'.",
    "control": "From 'P2P Controller', or 'FateZero Controller' (then only the target is denoised, from the inversion's "
               "attention store).",
    "cfg": "Guidance scale of the target branch (the source uses the inversion's).",
    "positive": "Optional CONDITIONING whose extras apply to the conditional rows of both branches: a ControlNet / "
                "T2I-Adapter (Apply ControlNet: its hint is broadcast to source and target), GLIGEN, hooks, a timestep "
                "range. Its text is not used: the prompts are the controller's (connect the target prompt's encoding).",
    "negative": "Optional CONDITIONING whose extras apply to the unconditional rows of both branches (Apply ControlNet's "
                "negative output). Its text is not used: the null embeddings are the inversion's.",
}


def _edit_inputs() -> list:
    return [
        io.Model.Input("model", tooltip=EDIT_INPUT_HELP["model"]),
        Inversion.Input("inversion", tooltip=EDIT_INPUT_HELP["inversion"]),
        Control.Input("control", tooltip=EDIT_INPUT_HELP["control"]),
        io.Float.Input("cfg", default=7.5, min=1.0, max=100.0, step=0.1, round=0.01, tooltip=EDIT_INPUT_HELP["cfg"]),
        io.Combo.Input("guidance", options=[g.value for g in Guidance], default=Guidance.DECOUPLED.value, tooltip=GUIDANCE_HELP),
        io.Conditioning.Input("positive", optional=True, tooltip=EDIT_INPUT_HELP["positive"]),
        io.Conditioning.Input("negative", optional=True, tooltip=EDIT_INPUT_HELP["negative"]),
    ]


def _guider(model, inversion, control, cfg: float, guidance: str, positive=None, negative=None):
    from .edit_guider import VideoP2PGuider

    return VideoP2PGuider(model, inversion, control, float(cfg), Guidance.parse(guidance), positive, negative)


class VideoP2PGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_Guider",
            display_name="Video-P2P Guider",
            category="video_p2p/3 edit",
            search_aliases=["video p2p guider", "p2p", "prompt to prompt", "fatezero", "video edit"],
            description=(
                "The edit as a GUIDER for SamplerCustomAdvanced: connect its sigmas and start latent to the sampler, with "
                "Disable Noise and the euler sampler (exactly the Decoupled Sampler's result; other samplers evaluate the "
                "same steps and integrate the target their own way). Prompt-to-prompt or FateZero, by the control."
            ),
            inputs=_edit_inputs(),
            outputs=[
                io.Guider.Output("guider", tooltip="For SamplerCustomAdvanced."),
                io.Sigmas.Output("sigmas", tooltip="The inversion's sigmas: the steps the edit runs on."),
                io.Latent.Output("start", tooltip="The inverted noise z_T: the sampler's latent_image (with Disable Noise)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, control, cfg: float, guidance: str, positive=None, negative=None) -> io.NodeOutput:
        guider = _guider(model, inversion, control, cfg, guidance, positive, negative)
        return io.NodeOutput(guider, guider.sigmas, guider.start_latent())


class DecoupledSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_DecoupledSampler",
            display_name="Decoupled Sampler",
            category="video_p2p/3 edit",
            search_aliases=["video p2p", "p2p sampler", "prompt to prompt", "fatezero", "video edit"],
            description=(
                "Edits the video: DDIM from the inverted noise over the inversion's steps, source and target branches in "
                "one UNet call per step, the controller editing the target's attention from the source's. The source branch "
                "is taken from the inversion where it already holds it. The 'Video-P2P Guider' with SamplerCustomAdvanced "
                "and euler, in one node."
            ),
            inputs=_edit_inputs(),
            outputs=[
                io.Latent.Output("edited", tooltip="The edited video (VAE Decode it)."),
                io.Latent.Output("source", tooltip="The source branch: the reconstruction of the input video."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, control, cfg: float, guidance: str, positive=None, negative=None) -> io.NodeOutput:
        import comfy.samplers
        from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, SamplerCustomAdvanced

        guider = _guider(model, inversion, control, cfg, guidance, positive, negative)
        if not guider.fused and Guidance.parse(guidance) is not Guidance.FAST and inversion.null_embeddings is None:
            log.info("Decoupled Sampler: a %s inversion has no null embeddings; the source branch runs conditional only.",
                     inversion.mode.value)
        out = SamplerCustomAdvanced.execute(Noise_EmptyNoise(), guider, comfy.samplers.sampler_object("euler"), guider.sigmas,
                                            guider.start_latent())
        return io.NodeOutput(out.result[0], guider.source_latent())


class AttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_AttentionMaps",
            display_name="Attention Maps",
            category="video_p2p/3 edit",
            search_aliases=["cross attention maps", "local blend", "p2p", "fatezero"],
            description=(
                "Shows, per frame, where words of the source and target prompts attend — the maps the local blend "
                "thresholds — so you can pick blend words and a threshold by looking. One UNet call at the chosen step."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the video was inverted with."),
                Inversion.Input("inversion", tooltip="From 'Shared Null-Text Invert' or 'Load Inversion'."),
                Control.Input("control", tooltip="From 'P2P Controller' or 'FateZero Controller' (its prompts, and its blend "
                                                 "words by default)."),
                io.String.Input("source_words", default="",
                                tooltip="Words of the source prompt to show (comma-separated). Empty: the controller's "
                                        "blend_source_words."),
                io.String.Input("target_words", default="",
                                tooltip="Words of the target prompt to show. Empty: the controller's blend_target_words."),
                io.Float.Input("at_step", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Where in the denoising to look (0 = the first, noisiest step; 1 = the last)."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="The blend_threshold to preview: the mask output is the union of both maps above it."),
                io.Conditioning.Input("positive", optional=True, tooltip=EDIT_INPUT_HELP["positive"]),
            ],
            outputs=[
                io.Image.Output("source_maps", tooltip="Per-frame heat maps of the source words (normalised per frame)."),
                io.Image.Output("target_maps", tooltip="Per-frame heat maps of the target words."),
                io.Mask.Output("mask", tooltip="The local-blend mask these maps give at the threshold (white: may change)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, control, source_words: str, target_words: str, at_step: float,
                threshold: float, positive=None) -> io.NodeOutput:
        import torch
        import torch.nn.functional as F

        from ..vp2p import SettingsError
        from ..vp2p.fatezero import FateZeroEdit
        from ..vp2p.p2p import P2PEdit
        from ..vp2p.prompt_align import split_words
        from .edit_inputs import check_consistency
        from .p2p_host import word_maps

        fatezero = isinstance(control, FateZeroEdit)
        if fatezero:  # its prompts; its blend words are source words
            control, blend_positions = control.edit, control.mask_positions
        if not isinstance(control, P2PEdit):
            raise SettingsError(f"control must come from 'P2P Controller' or 'FateZero Controller'; got {type(control).__name__}.")
        check_consistency(model, inversion, control)

        def words(text: str, fallback: tuple[int, ...], prompt) -> list[str]:
            picked = split_words(text)
            if picked:
                return picked
            names = [w for w, (a, b) in zip(prompt.words, prompt.spans) if any(a <= p < b for p in fallback)]
            if not names:
                raise SettingsError("Name the words to show (source_words / target_words), or set blend words in the controller.")
            return names

        blend = control.blend
        src = words(source_words, blend_positions if fatezero else (blend.source_positions if blend else ()), control.source)
        if fatezero and not split_words(target_words) and not (blend and blend.target_positions):
            # a FateZero control names source words only: show the target's new words (else the same words)
            new_words = [w for w in control.target.words if w not in control.source.words]
            target_words = ", ".join(new_words or [w for w in src if w in control.target.words])
        tgt = words(target_words, blend.target_positions if blend else (), control.target)
        maps, mask = word_maps(model, inversion, control, float(at_step), src, tgt, float(threshold), positive)
        scale = 8  # latent -> pixels for SD's VAE
        up = F.interpolate(maps, scale_factor=scale, mode="nearest")  # [2, F, H, W]
        heat = torch.stack([up, up.pow(2), (1 - up) * 0.3 + up * 0.1], dim=-1).clamp(0, 1)  # dark blue → yellow
        mask_px = F.interpolate(mask[:, None], scale_factor=scale, mode="nearest")[:, 0]
        return io.NodeOutput(heat[0], heat[1], mask_px)
