"""Running the pack on the parity fixture (../shared/parity): the official Video-P2P code's results
on a tiny random model, and the same computation through the pack's diffusers pipeline.

Two ways to compare:

* ``stagewise`` (the test): each stage on the official stage's input — the inversion (and null-text
  optimisation) from the video latents x0, the edit from the official x_T (and, in null-text mode,
  the official null embeddings). A difference then belongs to the stage that made it.
* ``end_to_end`` (``bench/bench_parity.py``): the whole pipeline from x0, as a user runs it. On this
  random UNet a difference in x_T is amplified about five-fold by the ten denoising steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = ROOT.parent / "shared" / "parity"
# Fixtures kept in the project (data only: the official results, ~2 MB each); they run on the shared
# fixture's model (PARITY_DIR / "model"), so they count only where that model is present.
PROJECT_FIXTURE_DIR = ROOT / "tests" / "fixtures" / "parity"


def _discover() -> list[Path]:
    if not (PARITY_DIR / "model").is_dir():
        return []
    shared = sorted(PARITY_DIR.glob("video_p2p_*.safetensors"))
    project = sorted(PROJECT_FIXTURE_DIR.glob("video_p2p_*.safetensors"))
    return shared + project


FIXTURES = _discover()


def fixture_id(path: Path) -> str:
    """A test id naming where the file lives (the shared dir and the project may both hold a mode)."""
    return f"{'project' if path.parent == PROJECT_FIXTURE_DIR else 'shared'}-{path.stem}"


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
    """The fixture's model as diffusers components (no VAE: the fixture starts from latents)."""
    from vp2p.diffusers_pipeline import load_components

    return load_components(PARITY_DIR / "model", torch.device("cpu"), torch.float32, vae=False)


def fixture_settings(path: Path, **changes: Any) -> tuple[Any, Any, Any]:
    """(T2SSettings, EditOptions, InversionSettings) of a fixture file, with ``changes`` applied to
    whichever of them has the field (to measure what a choice contributes)."""
    from vp2p import FrameMode, T2SSettings
    from vp2p.diffusers_pipeline import EditOptions
    from vp2p.inversion import InversionMode, InversionSettings

    _, meta = read_fixture(path)
    mode = meta["mode"]
    if meta.get("frame_attention", "first_frame") != "first_frame" or not meta.get("temporal", "").startswith("untuned"):
        raise ValueError(f"{path.name}: unexpected fixture settings {meta}")
    word, value = meta["reweight"].split(":") if meta.get("reweight") else ("", "")
    settings = T2SSettings(FrameMode.FIRST_FRAME, True)
    options = EditOptions(
        source_prompt=meta["src"], target_prompt=meta["tgt"], negative="", edit=meta["edit"],
        cross_replace=float(meta["cross_replace"]), self_replace=float(meta["self_replace"]),
        blend_source_words=tuple(meta["blend_source_words"].split()), blend_target_words=tuple(meta["blend_target_words"].split()),
        blend_threshold=float(meta["blend_threshold"]), reweight=f"{word}:{value}" if word else "",
        guidance="fast" if mode == "fast" else "decoupled", cfg=float(meta["cfg"]),
    )
    inversion = InversionSettings(steps=int(meta["steps"]), cfg=float(meta["cfg"]),
                                  mode=InversionMode.DDIM_ONLY if mode == "fast" else InversionMode.SHARED_NULL_TEXT,
                                  inner_steps=int(meta.get("inner_steps", 10)), early_stop=float(meta.get("early_stop", 1e-5)))
    out = []
    for obj in (settings, options, inversion):
        fields = obj.__dataclass_fields__
        out.append(replace(obj, **{k: v for k, v in changes.items() if k in fields}))
    return tuple(out)


def run_stagewise(path: Path, components: Optional[Any] = None, null_steps: Optional[int] = None,
                  **changes: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, official): x_T (and null embeddings) inverted from x0; source and edited latents sampled
    from the official x_T (and null embeddings).

    ``null_steps``: optimise the null embeddings of only the first so many DDIM steps (from x_T: the
    optimisation of step i depends on steps < i only, so a prefix is exactly the full run's first steps);
    ``reference["null_embeddings"]`` is cut to the same steps. None: every step."""
    from vp2p.diffusers_host import DiffusersT2S
    from vp2p.diffusers_pipeline import build_edit, sample_edit
    from vp2p.edit import EditInputs
    from vp2p.inversion import ddim_invert, optimise_null_text
    from vp2p.schedule import Schedule

    reference, _ = read_fixture(path)
    c = components if components is not None else load_model()
    settings, options, inversion = fixture_settings(path, **changes)
    edit, negative = build_edit(c, options)
    cond = edit.source_cond
    schedule = Schedule.reference(inversion.steps, c.alphas_cumprod)
    sigma0 = torch.sqrt(1 + schedule.sigmas[0] ** 2)
    ours: dict[str, torch.Tensor] = {}
    with DiffusersT2S(c.unet, settings) as host:
        den = host.denoiser(c.alphas_cumprod)
        with torch.no_grad():
            trajectory = ddim_invert(den, reference["x0"], cond, schedule)
        ours["x_T"] = trajectory[0] / sigma0
        k = schedule.steps if null_steps is None else max(1, min(int(null_steps), schedule.steps))
        prefix = Schedule(schedule.timesteps[:k], schedule.sigmas[:k + 1])
        nulls = optimise_null_text(den, trajectory[:k + 1], cond, negative, prefix, inversion).null_embeddings
        official = EditInputs(reference["x_T"] * sigma0, schedule, cond, reference.get("null_embeddings"), negative, inversion.cfg)
        if nulls is not None:
            ours["null_embeddings"] = nulls
            reference = {**reference, "null_embeddings": reference["null_embeddings"][:k]}
        out = sample_edit(den, edit, official, options, tuple(reference["x0"].shape[-2:]))
    ours["source"], ours["edited"] = out.source, out.edited
    return ours, reference


def run_end_to_end(path: Path, components: Optional[Any] = None, **changes: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, official): the pack's whole pipeline (``edit_video``) from x0."""
    from vp2p.diffusers_pipeline import edit_video

    reference, _ = read_fixture(path)
    c = components if components is not None else load_model()
    settings, options, inversion = fixture_settings(path, **changes)
    run = edit_video(c, settings, reference["x0"], options, inversion)
    ours = {"x_T": run.z_t, "source": run.source, "edited": run.edited}
    if run.null_embeddings is not None:
        ours["null_embeddings"] = run.null_embeddings
    return ours, reference
