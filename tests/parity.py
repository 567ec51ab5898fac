"""Running the pack on the parity fixture (../shared/parity): the official Video-P2P code's results
on a tiny random model, and the same computation through the pack's diffusers pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = ROOT.parent / "shared" / "parity"
FIXTURES = sorted(PARITY_DIR.glob("video_p2p_*.safetensors")) if PARITY_DIR.is_dir() else []


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def read_fixture(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The official results in the pack's layout (frames first: [F, C, h, w]; null embeddings
    [S, 1, T, D]) and the settings in the file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {"x0": raw["x0"], "x_T": raw["x_T"][0].permute(1, 0, 2, 3)}
    final = raw["final_latents"].permute(0, 2, 1, 3, 4)  # [2, F, C, h, w]
    out["source"], out["edited"] = final[0], final[1]
    if "null_embeddings" in raw:
        out["null_embeddings"] = raw["null_embeddings"]
    return out, meta


def load_model() -> Any:
    from vp2p.diffusers_pipeline import load_components

    c = load_components(PARITY_DIR / "model", torch.device("cpu"), torch.float32, vae=False)
    return c


def run_fixture(path: Path, components: Optional[Any] = None, **changes: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, official) for one fixture file. ``changes`` override fields of the pack's settings
    (``T2SSettings``: group_norm …; ``EditOptions``: …) to measure what each choice contributes."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_pipeline import EditOptions, edit_video
    from vp2p.inversion import InversionMode, InversionSettings

    reference, meta = read_fixture(path)
    c = components if components is not None else load_model()
    mode = meta["mode"]
    if meta.get("frame_attention", "first_frame") != "first_frame" or not meta.get("temporal", "").startswith("untuned"):
        raise ValueError(f"{path.name}: unexpected fixture settings {meta}")
    settings = T2SSettings(FrameMode.FIRST_FRAME, True)
    settings = replace(settings, **{k: v for k, v in changes.items() if k in T2SSettings.__dataclass_fields__})
    word, value = meta["reweight"].split(":") if meta.get("reweight") else ("", "")
    options = EditOptions(
        source_prompt=meta["src"], target_prompt=meta["tgt"], negative="", edit=meta["edit"],
        cross_replace=float(meta["cross_replace"]), self_replace=float(meta["self_replace"]),
        blend_source_words=tuple(meta["blend_source_words"].split()), blend_target_words=tuple(meta["blend_target_words"].split()),
        blend_threshold=float(meta["blend_threshold"]), reweight=f"{word}:{value}" if word else "",
        guidance="fast" if mode == "fast" else "decoupled", cfg=float(meta["cfg"]),
    )
    options = replace(options, **{k: v for k, v in changes.items() if k in EditOptions.__dataclass_fields__})
    inversion = InversionSettings(steps=int(meta["steps"]), cfg=float(meta["cfg"]),
                                  mode=InversionMode.DDIM_ONLY if mode == "fast" else InversionMode.SHARED_NULL_TEXT,
                                  inner_steps=10, early_stop=1e-5)
    with torch.no_grad():
        run = edit_video(c, settings, reference["x0"], options, inversion)
    ours = {"x_T": run.z_t, "source": run.source, "edited": run.edited}
    if run.null_embeddings is not None:
        ours["null_embeddings"] = run.null_embeddings
    return ours, reference
