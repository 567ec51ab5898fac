"""Node ``VP2P_TuneOnVideo`` — "Tune on Video"."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vp2p import SettingsError
from ..vp2p.tuning import TuneSettings
from .tune_host import tune_model

log = logging.getLogger("VideoP2P")


class TuneOnVideo(io.ComfyNode):
    """Fine-tune the inflated model on the video it will edit (Video-P2P stage 1)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VP2P_TuneOnVideo",
            display_name="Tune on Video",
            category="video_p2p/model",
            description=(
                "Fine-tunes a T2S model on one video so it can reconstruct it: to_q of frame and cross attention in "
                "every transformer block and all temporal-attention layers (Video-P2P/Tune-A-Video). The input MODEL "
                "is not changed; the output carries the tuned weights as patches and works with stock samplers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from 'Inflate to T2S' (optionally already tuned)."),
                io.Conditioning.Input("positive", tooltip="The source prompt describing the video (CLIP Text Encode)."),
                io.Latent.Input("latent", tooltip="The video as latents: one frame per batch entry (VAE Encode of the frames)."),
                io.Int.Input("steps", default=500, min=0, max=100000,
                             tooltip="Training steps. The reference uses 300–500. 0 returns the model unchanged."),
                io.Float.Input("learning_rate", default=3e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate (weight decay 1e-2, gradient clipping 1.0)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the timesteps and noise; the same seed gives the same tuned model."),
            ],
            outputs=[io.Model.Output(tooltip="The tuned T2S MODEL.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps: int, learning_rate: float, seed: int) -> io.NodeOutput:
        import comfy.utils

        samples = latent.get("samples") if isinstance(latent, dict) else None
        if samples is None or samples.dim() != 4 or samples.shape[0] == 0:
            shape = None if samples is None else tuple(samples.shape)
            raise SettingsError(f"Tune on Video needs a LATENT with samples [frames, 4, h, w]; got {shape}. Connect a VAE Encode of the video frames.")
        settings = TuneSettings(steps=int(steps), learning_rate=float(learning_rate), seed=int(seed) % (2**63))
        pbar = comfy.utils.ProgressBar(max(1, settings.steps))
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        def progress(step: int, total: int, loss: float) -> None:
            pbar.update_absolute(step, total)
            if step == 1 or step % max(1, total // 20) == 0 or step == total:
                log.info("Tune on Video: step %d/%d, loss %.5f", step, total, loss)
                _progress_text(f"step {step}/{total} · loss {loss:.5f}", node_id)

        tuned, losses = tune_model(model, positive, samples, settings, progress)
        if losses:
            log.info("Tune on Video: done, loss %.5f → %.5f (mean of first/last 10 steps)",
                     sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
        return io.NodeOutput(tuned)


def _progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (scripts/tests): the log line is enough
        pass
