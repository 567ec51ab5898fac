"""Running the pack's FateZero on the FateZero parity fixture (../shared/parity/fatezero_attribute.safetensors):
what the official FateZero code (ChenyangQiQi/FateZero 9b6cb7b, ``test_fatezero.py`` →
``P2pDDIMSpatioTemporalPipeline``) computed on the parity fixture's tiny random model, and the same computation
through the pack (diffusers host, ``vp2p.fatezero``), stage by stage:

* the inversion from the official video latents x0 (recording the pack's attention store on the way);
* the self-attention blend values and masks of the self-replace steps, from that store;
* the edit from the official x_T, fusing that store;
* the controller's tensors (cross-replace α, equaliser, refinement mapper and alphas, text embeddings).

``run_stagewise`` returns (ours, reference) in the pack's layout (frames first); ``distances`` compares them.
``python -m tests.parity_fatezero [--precision fp32] [--store-on official]`` prints the distances of one
configuration (what the test's docstring and README quote for the other configurations).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from tests.parity import PARITY_DIR, load_model, relative_l2

FIXTURE = PARITY_DIR / "fatezero_attribute.safetensors"

log = logging.getLogger("VideoP2P")


def _frames_first(x: torch.Tensor) -> torch.Tensor:
    """FateZero's (…, 1, C, F, h, w) -> the pack's (…, F, C, h, w)."""
    return x.squeeze(-5).transpose(-4, -3).contiguous()


def read_fixture(path: Path = FIXTURE) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The official results in the pack's layout and the settings in the file's metadata.

    Latents (DDPM scale) frames first: ``x0``, ``x_T`` and ``edited_latents`` [F, C, h, w];
    ``inversion_latents`` [S+1, F, C, h, w] (index k: after k inversion steps); ``edit_step_latents``
    [S, F, C, h, w]. Blend values and masks ``self_blend_{values,mask}_<r>`` [self steps, F, r, r] as stored;
    ``cross_replace_alpha`` [S+1, T]; ``equalizer``, ``refine_mapper``, ``refine_alphas`` [T];
    ``text_embeddings_{source,target}`` [2 ("", prompt), T, D]."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: _frames_first(raw[k]) for k in ("x0", "x_T", "edited_latents", "inversion_latents", "edit_step_latents")}
    out.update({k: v for k, v in raw.items() if k.startswith("self_blend_") or k.startswith("text_embeddings_")})
    out["cross_replace_alpha"] = raw["cross_replace_alpha"].flatten(1)
    for k in ("equalizer", "refine_mapper", "refine_alphas"):
        out[k] = raw[k].flatten()
    return out, meta


def threshold_gap(path: Path = FIXTURE) -> float:
    """The smallest distance of the fixture's blend values from its threshold (its metadata's
    ``self_blend_masks``): a pack whose values are closer than this to the official ones has its masks."""
    with safe_open(str(path), framework="pt") as f:
        masks = json.loads((f.metadata() or {})["self_blend_masks"])
    return min(v["min_abs_value_minus_th"] for k, v in masks.items() if isinstance(v, dict))


def blend_resolutions(reference: dict[str, torch.Tensor]) -> list[int]:
    """The self-attention layer resolutions the fixture holds blend values for (32, 16, 8 at 64² latents)."""
    return sorted((int(k.rsplit("_", 1)[1]) for k in reference if k.startswith("self_blend_values_")), reverse=True)


@dataclass(frozen=True)
class FixtureSettings:
    """The FateZero run the fixture holds, in the pack's terms."""

    t2s: Any  # vp2p.T2SSettings
    options: Any  # vp2p.diffusers_pipeline.EditOptions (prompts, refine/replace, fractions, re-weighting, cfg)
    mask_words: tuple[str, ...]  # FateZero's blend words of the source prompt (its self-attention mask is the source's)
    threshold: float
    steps: int


def fixture_settings(meta: dict[str, str]) -> FixtureSettings:
    """Read the run's settings from the metadata; refuse a run this helper does not reproduce."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_pipeline import EditOptions
    from vp2p.video_norm import NormScope

    frame = json.loads(meta["frame_attention_index"])
    words = json.loads(meta["blend_words"])
    th = json.loads(meta["blend_th"])
    cross = json.loads(meta["cross_replace_steps"])
    eq = json.loads(meta["eq_params"]) if meta.get("eq_params", "null") != "null" else None
    expected = {"blend_latents": "False", "blend_self_attention": "True", "use_inversion_attention": "True",
                "use_invertion_latents": "True", "is_replace_controller": "False"}
    unexpected = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if frame not in (["mid"], ["middle"]) or set(cross) != {"default_"} or len(set(th)) != 1 or unexpected \
            or not meta.get("temporal_attention", "").endswith("adds exactly 0") or "all frames" not in meta.get("video_groupnorm", ""):
        raise ValueError(f"unexpected FateZero fixture settings: frame attention {frame}, cross_replace_steps {cross}, "
                         f"blend_th {th}, {unexpected or ''} (this helper reproduces the middle-frame refine run of the README)")
    reweight = ", ".join(f"{w}:{v:g}" for w, v in zip(eq["words"], eq["values"])) if eq else ""
    t2s = T2SSettings(FrameMode.MIDDLE_FRAME, False, NormScope.VIDEO, frame_attention_min_channels=int(meta["least_sc_channel"]))
    options = EditOptions(source_prompt=meta["src"], target_prompt=meta["tgt"], negative="", edit="refine",
                          cross_replace=float(cross["default_"]), self_replace=float(meta["self_replace_steps"]),
                          reweight=reweight, cfg=float(meta["guidance_scale"]))
    return FixtureSettings(t2s, options, tuple(words[0]), float(th[0]), int(meta["steps"]))


def run_stagewise(path: Path = FIXTURE, components: Optional[Any] = None, precision: str = "fp16",
                  store_on: str = "own") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, official), each stage of the pack on the official input of that stage.

    ``precision``: the store the edit fuses (fp16, the pack's default, or fp32, FateZero's). The store is
    recorded in fp32 and rounded for fp16 (what an fp16 recording holds, bit for bit:
    ``tests/test_fatezero.py``); blend values are reported for both (``…@fp32``, ``…@fp16``).
    ``store_on``: ``own`` records the store by the pack's inversion from x0 (as a user's run does);
    ``official`` records it with the same UNet calls on the official inversion latents instead
    (``record_missing_steps``), ten more UNet calls, to measure what the inversion's drift adds."""
    from vp2p import LayoutSpec
    from vp2p.attention_store import AttentionStore, StorePrecision, StoreRecorder, StoreSpec, cond_digest, record_missing_steps
    from vp2p.control import RunState
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.diffusers_pipeline import build_edit
    from vp2p.edit import EditInputs, Guidance, fused_edit
    from vp2p.fatezero import FateZeroController, FateZeroEdit
    from vp2p.inversion import ddim_invert
    from vp2p.prompt_align import word_positions
    from vp2p.schedule import Schedule

    reference, meta = read_fixture(path)
    fs = fixture_settings(meta)
    c = components if components is not None else load_model()
    edit, negative = build_edit(c, fs.options)
    fz = FateZeroEdit(edit, tuple(word_positions(edit.source, fs.mask_words, "blend words", "source")), fs.threshold)
    x0 = reference["x0"]
    frames, latent_hw = x0.shape[0], tuple(x0.shape[-2:])
    schedule = Schedule.reference(fs.steps, c.alphas_cumprod)
    scale = torch.sqrt(1 + schedule.sigmas**2)  # σ-space latent at sigmas[i] = DDPM-scale latent × scale[i]
    spec = StoreSpec.for_fraction(fs.steps, 1.0, 32 * 32, frames, fs.t2s.frame_attention, cond_digest(edit.source_cond),
                                  fs.t2s.frame_attention_min_channels, StorePrecision.FP32)
    official_path = torch.stack([reference["inversion_latents"][fs.steps - i] * scale[i] for i in range(fs.steps + 1)])
    ours: dict[str, torch.Tensor] = {}
    with DiffusersT2S(c.unet, fs.t2s) as host:
        den = host.denoiser(c.alphas_cumprod)
        store = AttentionStore(spec)
        recording = RunState(StoreRecorder(store, schedule), LayoutSpec(frames))
        t0 = time.perf_counter()
        with torch.no_grad():
            trajectory = ddim_invert(den, x0, edit.source_cond, schedule, run=recording if store_on == "own" else None)
            if store_on == "official":
                record_missing_steps(den, official_path, edit.source_cond, schedule, store, recording)
        store.finish()
        log.info("FateZero parity: inversion %.0f s", time.perf_counter() - t0)
        ours["inversion_latents"] = torch.stack([trajectory[fs.steps - k] / scale[fs.steps - k] for k in range(fs.steps + 1)])
        ours["x_T"] = ours["inversion_latents"][-1]
        stores = {"fp32": store, "fp16": AttentionStore.from_tensors(replace(spec, precision=StorePrecision.FP16.value), store.tensors())}
        self_steps = fz.edit.self_steps(fs.steps)
        for name, st in stores.items():
            ctl = FateZeroController(fz, st, schedule, latent_hw)
            for r in blend_resolutions(reference):
                values = torch.stack([ctl.self_blend_values(step, (r, r)) for step in range(self_steps)])
                ours[f"self_blend_values_{r}@{name}"] = values
                ours[f"self_blend_mask_{r}@{name}"] = (values > fz.mask_threshold).float()
        fused = stores[StorePrecision.parse(precision).value]
        del stores, store, recording, ctl  # the other store's memory back before the edit
        steps: list[torch.Tensor] = []
        inputs = EditInputs(reference["x_T"] * scale[0], schedule, edit.source_cond, None, negative, fs.options.cfg)
        t0 = time.perf_counter()
        with torch.no_grad():
            result = fused_edit(den, inputs, official_path, edit.target_cond, fs.options.cfg, Guidance.DECOUPLED,
                                FateZeroController(fz, fused, schedule, latent_hw),
                                on_step=lambda i, x: steps.append(x / scale[i + 1]))
        log.info("FateZero parity: edit %.0f s", time.perf_counter() - t0)
    ours["edit_step_latents"] = torch.stack(steps)
    ours["edited_latents"] = result.edited
    ours["cross_replace_alpha"] = edit.cross_alpha(fs.steps)
    ours["equalizer"] = edit.reweight if edit.reweight is not None else torch.ones(edit.target.context)
    ours["refine_mapper"], ours["refine_alphas"] = edit.mapper.float(), edit.alphas.float()
    ours["text_embeddings_source"] = torch.cat([negative, edit.source_cond])
    ours["text_embeddings_target"] = torch.cat([negative, edit.target_cond])
    return ours, reference


def distances(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per compared tensor: relative L2 (per step where the tensor has steps: a list; for blend values also the
    largest absolute difference, ``…:max_abs``), mask pixels that differ (``…mask…``: counts per self step), exact
    equality for the controller's tables."""
    out: dict[str, Any] = {}
    for name, mine in ours.items():
        ref = reference[name.split("@")[0]]
        if name == "cross_replace_alpha":
            out[name] = bool(torch.equal(mine, ref[: mine.shape[0]]))
        elif name in ("equalizer", "refine_mapper", "refine_alphas"):
            out[name] = bool(torch.equal(mine, ref))
        elif "_mask_" in name:
            out[name] = [int((a != b).sum()) for a, b in zip(mine, ref)]
        elif name in ("inversion_latents", "edit_step_latents") or name.startswith("self_blend_values"):
            out[name] = [relative_l2(a, b) for a, b in zip(mine, ref)]
            if name.startswith("self_blend_values"):  # against the gap the fixture's threshold sits in
                out[f"{name}:max_abs"] = float((mine.double() - ref.double()).abs().max())
        else:
            out[name] = relative_l2(mine, ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="the store the edit fuses")
    ap.add_argument("--store-on", choices=("own", "official"), default="own",
                    help="record the store by the pack's inversion (own) or on the official inversion latents")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    ours, reference = run_stagewise(precision=a.precision, store_on=a.store_on)
    d = distances(ours, reference)
    # largest distance over the steps; mask pixels that differ, summed over the steps
    summary = {k: (v if not isinstance(v, list) else sum(v) if isinstance(v[0], int) else max(v)) for k, v in d.items()}
    print(json.dumps({"precision": a.precision, "store_on": a.store_on, "seconds": round(time.perf_counter() - t0), **summary}, indent=1))


if __name__ == "__main__":
    main()
