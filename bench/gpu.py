"""The first GPU session in one command: every stage of the pack on SD1.5's real UNet shape.

    python bench/gpu.py --out gpu.json                 # CUDA: SD1.5 shape, fp16, 8 frames × 512², 50 steps
    python bench/gpu.py --tiny --out /tmp/tiny.json    # CPU: the same code path on a tiny UNet (what CI runs)

What runs. A diffusers ``UNet2DConditionModel`` with SD1.5's configuration (block_out_channels
320/640/1280/1280, cross_attention_dim 768, 8 heads, 2 layers per block) and **random weights**
(``tests.helpers.init_weights``; no model weights exist on these machines and nothing is ever
downloaded), in fp16 on CUDA, on 8 frames of 64² latents (512² pixels), 50 DDIM steps, through the
pack's diffusers host (``vp2p.diffusers_host.DiffusersT2S``) and the pack's own loops:

============== ======================================================================================
tune           Tune on Video (``tune_diffusers``): ``--tune-steps`` steps; s/step and 300 steps extrapolated
ddim_invert    DDIM inversion (``vp2p.inversion.ddim_invert``) with the source prompt
null_text      shared null-text optimisation (``optimise_null_text``), 50 steps × 10 inner steps
               (early stop off, so every inner step runs)
p2p_edit       the P2P edit: ``decoupled_edit`` with ``P2PController`` (word swap, cross 0.2 / self 0.5,
               local blend) and decoupled guidance; the source walked beside the target (``reuse=False``):
               source and target, uncond and cond, in one UNet call per step
fatezero_invert DDIM inversion recording FateZero's attention store (``StoreRecorder``), middle-frame attention
fatezero_edit  FateZero's fused edit (``fused_edit`` + ``FateZeroController``: cross 0.8, self 0.8, blend word)
guidance       generation from noise with backward cross-attention guidance (``vp2p.guidance.guided_update``
               on the study's schedule of steps, a moving box) and CFG; the loop is written here, as the
               ComfyUI GUIDER's is in ``nodes/guidance_host.py``
============== ======================================================================================

Per stage: wall time (``torch.cuda.synchronize`` around it, after a warm-up run cut short after one
step), peak ``torch.cuda.max_memory_allocated`` (reset per stage; weights and the earlier stages'
results included: what a card must hold), UNet rows (and calls) per step counted by a forward
pre-hook on the UNet (forward rows; tuning, null-text and guidance also run backward through the
rows with gradients), and host↔device copies inside the step loop: a third run of the stage is
profiled (``torch.profiler``, CUDA activity) from the end of its first step for ``--profile-steps``
steps and its ``Memcpy HtoD``/``Memcpy DtoH`` device events are counted per step (the target is 0;
``--strict-copies`` makes any a failure). One table is printed and written as JSON (``--out``).
Copies that are there by design: FateZero's store lives on the host (``AttentionStore.put`` moves each
recorded tensor to the CPU, as FateZero offloads its maps), so ``fatezero_invert`` copies DtoH and
``fatezero_edit`` HtoD every step; Tune on Video draws its noise on the CPU (one seeded generator on every
device) and copies it up. Anything else in a step loop is a sync point to look at. The JSON is rewritten
after every stage, and a stage that raises (e.g. out of memory) is reported as an error while the
stages that do not need its results still run.

Loud checks (exit status 1, each failure named with its stage, after the table and the JSON are
written): a NaN/inf in a stage's outputs, an output tensor on the wrong device, a stage whose peak
memory is above ``--max-gb`` (12 GB: FateZero's reported VRAM on a 3090; the card budget the pack aims
for).

``--tiny`` runs the same stages on the CPU in fp32 on ``tests.helpers.TINY_UNET_CONFIG`` (32/64
channels), 2 frames of 8² latents, 3 steps, 2 inner steps: seconds per stage. There the peak is the
process's peak resident memory (``/proc/self/clear_refs`` resets it per stage) and copies are n/a.

**diffusers without network.** The GPU machine has torch (CUDA), transformers, safetensors, einops,
numpy and pillow, and no diffusers. The pack's diffusers host is the honest way to run every stage
outside ComfyUI, and SD1.5's real UNet is diffusers' ``UNet2DConditionModel``, so this script uses it
from a carried wheel: ``diffusers-0.42.1-py3-none-any.whl``, the version the project's ``.venv`` runs
(pure Python, about 6 MB; its other dependencies — huggingface_hub, packaging, regex, requests,
filelock — come with transformers). Nothing is downloaded. Make the wheel offline from this
environment with ``python bench/gpu.py --pack-wheel .whl`` (it zips the installed package and its
``.dist-info`` with a fresh RECORD; ``.whl/`` is git-ignored), or take the registry's file where there
is network (``pip download --no-deps diffusers==0.42.1 -d .whl``). On the GPU machine either install
it (``pip install --no-deps .whl/diffusers-0.42.1-py3-none-any.whl``) or pass the folder:
``--wheels .whl`` unpacks every ``*.whl`` there into a scratch folder and puts it first on
``sys.path`` (nothing is installed). With this project's device runner: carry ``.whl`` and run
``python bench/gpu.py --wheels .whl --out $OUT/gpu.json``.

Text. No text encoder runs: the stages take prompt embeddings, and a random token-embedding table
stands in for CLIP's encoder. Prompts are tokenised with the real CLIP vocabulary when one is found
(``vp2p.clip_vocab``: open_clip_torch or ComfyUI), else word by word (one token per word: with random
weights the ids only pick rows of the random table, and the word alignment prompt-to-prompt needs is
the same); the JSON says which.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("VideoP2P")

# SD1.5's UNet (diffusers' unet/config.json of stable-diffusion-v1-5), spelled out rather than relying on
# UNet2DConditionModel's defaults, whose cross_attention_dim (1280) is not SD1.5's.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

STAGES = ("tune", "ddim_invert", "null_text", "p2p_edit", "fatezero_invert", "fatezero_edit", "guidance")
SOURCE_PROMPT, TARGET_PROMPT, WORD, NEW_WORD = "a cat is running on the grass", "a tiger is running on the grass", "cat", "tiger"
TUNE_REFERENCE_STEPS = 300  # Video-P2P's tuning length, for the extrapolation


class BenchError(RuntimeError):
    """The bench cannot run (e.g. diffusers missing); the message says what to do."""


@dataclass(frozen=True)
class BenchConfig:
    """One run's sizes. ``size`` is the latent side (pixels / 8)."""

    device: str
    dtype: str
    frames: int
    size: int
    steps: int
    inner_steps: int
    tune_steps: int
    profile_steps: int
    max_gb: float
    tiny: bool
    strict_copies: bool = False
    stages: tuple[str, ...] = STAGES

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def full_config(max_gb: float) -> BenchConfig:
    return BenchConfig("cuda", "float16", frames=8, size=64, steps=50, inner_steps=10, tune_steps=5, profile_steps=2,
                       max_gb=max_gb, tiny=False)


def tiny_config(max_gb: float) -> BenchConfig:
    return BenchConfig("cpu", "float32", frames=2, size=8, steps=3, inner_steps=2, tune_steps=2, profile_steps=1,
                       max_gb=max_gb, tiny=True)


# -- diffusers without installing it ------------------------------------------------------------------
def add_wheels(folder: Path) -> list[str]:
    """Unpack every ``*.whl`` in ``folder`` into a scratch folder and put it first on ``sys.path``.

    Unpacked rather than imported from the zip: a package may read its own files from disk, and
    importlib.metadata finds the unpacked ``.dist-info`` (diffusers asks it for versions)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise BenchError(f"--wheels {folder}: no *.whl file there. Put diffusers-0.42.1-py3-none-any.whl in it.")
    scratch = Path(tempfile.mkdtemp(prefix="vp2p_gpu_wheels_"))
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(scratch)
    sys.path.insert(0, str(scratch))
    log.info("wheels unpacked into %s: %s", scratch, ", ".join(w.name for w in wheels))
    return [w.name for w in wheels]


def pack_wheel(folder: Path, package: str = "diffusers") -> Path:
    """Pack the installed pure-Python ``package`` of this environment into ``folder`` as a wheel (a zip of the
    package and its ``.dist-info``, with a fresh RECORD), for a machine without network: offline, from what
    pip installed here. ``.pyc`` caches and install-time files (INSTALLER, REQUESTED, direct_url.json) are
    left out."""
    import base64
    import hashlib
    import importlib.metadata

    dist = importlib.metadata.distribution(package)
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts and not str(f).endswith(".pyc")
             and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json") and not str(f).startswith("..")]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None or not any(f.name == "WHEEL" for f in files):
        raise BenchError(f"{package} {dist.version} here was not installed from a wheel (no .dist-info/WHEEL); cannot repack it.")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package}-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(files, key=str):
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def unet_class() -> Any:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        raise BenchError(
            f"diffusers cannot be imported ({e}). The bench runs the pack's diffusers host on diffusers' UNet2DConditionModel: "
            "`pip install --no-deps diffusers-0.42.1-py3-none-any.whl`, or pass --wheels DIR with that wheel in DIR "
            "(see this script's docstring). Nothing is downloaded."
        ) from e
    return UNet2DConditionModel


# -- measuring ----------------------------------------------------------------------------------------
class Abort(Exception):
    """Raised by a probe's ``should_stop`` to end a warm-up or profiling run early."""


class RowCounter:
    """Counts UNet forward calls and their rows (batch entries) with a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0


class StepProbe:
    """Passed to a stage's loop as its ``on_step``/``should_stop``: counts finished steps, ends the run
    after ``stop_after`` steps, and (``profile``) runs torch.profiler from the end of the first step for
    ``profile_steps`` steps, counting the device's host↔device copies."""

    def __init__(self, device: torch.device, stop_after: Optional[int] = None, profile_steps: int = 0) -> None:
        self.device = device
        self.done = 0
        self.stop_after = stop_after if not profile_steps else 1 + profile_steps
        self.profile_steps = profile_steps
        self._prof: Any = None
        self._started_at = 0
        self.profiled = 0
        self.htod = 0
        self.dtoh = 0

    def on_step(self, *_: Any) -> None:
        self.done += 1
        if not self.profile_steps:
            return
        if self.done == 1:
            self._start()
        elif self._prof is not None and self.done == 1 + self.profile_steps:
            self._stop()

    def should_stop(self) -> None:
        if self.stop_after is not None and self.done >= self.stop_after:
            raise Abort()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(self.device)  # the earlier steps' copies finish outside the window
        self._started_at = self.done
        self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._prof.start()

    def _stop(self) -> None:
        torch.cuda.synchronize(self.device)
        self._prof.stop()
        self.profiled = self.done - self._started_at
        for e in self._prof.events():
            # device-side copy records are named "Memcpy HtoD (Pageable -> Device)" and the like; the CPU-side
            # runtime calls (cudaMemcpyAsync) carry no direction and are not counted twice
            name = e.name.lower()
            if "memcpy" in name and "htod" in name:
                self.htod += 1
            elif "memcpy" in name and "dtoh" in name:
                self.dtoh += 1
        self._prof = None

    def finish(self) -> None:
        """A run that ended inside the window (fewer steps than asked) still closes the profiler."""
        if self._prof is not None:
            self._stop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field_name: str) -> Optional[int]:
    from tests.proc_memory import status_kb

    return status_kb(field_name)


class PeakMemory:
    """Per-stage peak: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident memory
    (VmHWM, reset through /proc/self/clear_refs) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> float:
        """Reset the peak; returns what is held now (GB)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 1e9
        from tests.proc_memory import reset_peak

        if not reset_peak():  # VmHWM := VmRSS
            log.warning("cannot reset the peak RSS (/proc/self/clear_refs); the CPU peak is the process's since start")
        return (_status_kb("VmRSS") or 0) / 1e6

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return (_status_kb("VmHWM") or 0) / 1e6


class TensorTimeline(PeakMemory):
    """``--memory tensors`` (CPU): the peak of **live tensor bytes** per stage, from the CPU allocator's events
    recorded by ``torch.profiler`` (``profile_memory``) from before the model is built — weights, inputs and the
    earlier stages' results included, as ``torch.cuda.max_memory_allocated`` counts on a card, without its
    block rounding and without the Python runtime the RSS holds. With ``--device cpu`` at the full shape this
    computes, from the real tensors and shapes, what each stage holds at its peak (``--dtype bfloat16`` has
    fp16's sizes and fast CPU kernels). Peaks are known when the run ends (``finish``)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.kind = "cpu_live_tensor_bytes"
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        self._open: Optional[Any] = None
        self.windows = 0  # reset/peak windows so far

    def reset(self) -> float:
        gc.collect()
        self.windows += 1
        self._open = torch.profiler.record_function(f"vp2p_window_{self.windows}")
        self._open.__enter__()
        return float("nan")  # filled in by finish()

    def peak(self) -> float:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        return float("nan")

    def finish(self) -> dict[int, tuple[float, float]]:
        """{window: (held at its start, peak inside it)} in GB for every reset/peak window."""
        self._prof.__exit__(None, None, None)
        events = list(self._prof.profiler.kineto_results.events())
        memory = sorted(((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU))
        windows = sorted((int(e.name().rsplit("_", 1)[1]), e.start_ns(), e.end_ns()) for e in events
                         if e.name().startswith("vp2p_window_"))
        out, live, i = {}, 0, 0
        for n, t0, t1 in windows:
            while i < len(memory) and memory[i][0] < t0:
                live += memory[i][1]
                i += 1
            held = peak = live
            while i < len(memory) and memory[i][0] <= t1:
                live += memory[i][1]
                peak = max(peak, live)
                i += 1
            out[n] = (held / 1e9, peak / 1e9)
        return out


@dataclass
class StageResult:
    """One row of the table (and of the JSON)."""

    stage: str
    steps: int
    wall_s: float
    s_per_step: float
    unet_rows_per_step: float
    unet_calls_per_step: float
    peak_gb: float
    held_before_gb: float
    copies_htod_per_step: Optional[float]
    copies_dtoh_per_step: Optional[float]
    extra: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """``run(probe)`` runs the stage's whole loop with the probe's callbacks and returns its outputs:
    tensors that must be finite and on the run's device (``outputs``), tensors kept on the CPU by design
    (``host_outputs``, checked for finiteness only) and numbers for the JSON (``extra``)."""

    name: str
    run: Callable[[StepProbe], "StageOutputs"]


@dataclass
class StageOutputs:
    outputs: dict[str, torch.Tensor]
    host_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def check_outputs(stage: str, out: StageOutputs, device: torch.device) -> list[str]:
    """The loud checks on a stage's outputs: finite values, the expected device."""
    failures = []
    for name, t in out.outputs.items():
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            failures.append(f"{stage}: output {name} is on {t.device}, expected {device}")
        if not bool(torch.isfinite(t).all()):
            failures.append(f"{stage}: output {name} has NaN/inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    for name, t in out.host_outputs.items():
        if not bool(torch.isfinite(t.float()).all()):
            failures.append(f"{stage}: {name} has NaN/inf")
    return failures


def measure(stage: Stage, cfg: BenchConfig, device: torch.device, rows: RowCounter, memory: PeakMemory) -> tuple[StageResult, StageOutputs]:
    """Warm-up (cut after one step), the timed full run (peak reset before it), then on CUDA a profiled
    run cut after ``1 + profile_steps`` steps."""
    if not isinstance(memory, TensorTimeline):  # counting bytes needs no warm kernels: spare the CPU a step
        log.info("stage %s: warm-up", stage.name)
        try:
            stage.run(StepProbe(device, stop_after=1))
        except Abort:
            pass
        _sync(device)
    held = memory.reset()
    rows.reset()
    probe = StepProbe(device)
    log.info("stage %s: timed run", stage.name)
    t0 = time.perf_counter()
    try:
        out = stage.run(probe)
        _sync(device)
    finally:
        peak = memory.peak()  # closes a TensorTimeline's window also when the stage raises
    wall = time.perf_counter() - t0
    steps = max(probe.done, 1)
    calls, n_rows = rows.calls, rows.rows
    htod = dtoh = None
    if device.type == "cuda" and cfg.profile_steps > 0:
        log.info("stage %s: profiled run (%d steps)", stage.name, cfg.profile_steps)
        prof = StepProbe(device, profile_steps=cfg.profile_steps)
        try:
            stage.run(prof)
        except Abort:
            pass
        finally:
            prof.finish()
        if prof.profiled:
            htod, dtoh = prof.htod / prof.profiled, prof.dtoh / prof.profiled
    result = StageResult(stage.name, probe.done, wall, wall / steps, n_rows / steps, calls / steps, peak, held, htod, dtoh,
                         dict(out.extra))
    if isinstance(memory, TensorTimeline):
        result.extra["memory_window"] = memory.windows
    result.failures = check_outputs(stage.name, out, device)
    if peak > cfg.max_gb:
        result.failures.append(f"{stage.name}: peak memory {peak:.3g} GB ({memory.kind}) is above --max-gb {cfg.max_gb:g}")
    if cfg.strict_copies and ((htod or 0) > 0 or (dtoh or 0) > 0):
        result.failures.append(f"{stage.name}: {htod:g} HtoD and {dtoh:g} DtoH copies per step (--strict-copies: target 0)")
    return result, out


# -- the model, the prompts, the stages -----------------------------------------------------------------
@dataclass
class Setup:
    unet: torch.nn.Module
    dim: int
    device: torch.device
    tokenizer: str
    cond: torch.Tensor  # [1, 77, D] the source prompt, on the device
    target: torch.Tensor  # [1, 77, D]
    empty: torch.Tensor  # [1, 77, D] the initial null embedding
    src: Any  # TokenizedPrompt
    tgt: Any
    latents: torch.Tensor  # [F, 4, h, w]
    masks: torch.Tensor  # [F, H, W] guidance target masks (a box moving left to right)


def _encoder() -> tuple[Callable[[str], list[int]], str]:
    """The real CLIP vocabulary when one is found, else one token per word (see the module docstring)."""
    from vp2p.clip_vocab import clip_tokenizer, find_vocab_source
    from vp2p.prompt_align import hf_encoder

    if find_vocab_source() is not None:
        return hf_encoder(clip_tokenizer()), "clip_bpe"
    return (lambda word: [1 + zlib.crc32(word.lower().encode()) % 49000]), "word_level"


def build_setup(cfg: BenchConfig, device: torch.device) -> Setup:
    from tests.helpers import TINY_UNET_CONFIG, init_weights
    from vp2p.masks import box_trajectory
    from vp2p.prompt_align import tokenize_prompt

    model_cfg = dict(TINY_UNET_CONFIG) if cfg.tiny else dict(SD15_UNET_CONFIG)
    model_cfg["sample_size"] = cfg.size
    unet = init_weights(unet_class()(**model_cfg), seed=0).to(device, cfg.torch_dtype).eval()
    dim = int(model_cfg["cross_attention_dim"])
    encode, tokenizer = _encoder()
    src, tgt = tokenize_prompt(SOURCE_PROMPT, encode, 77), tokenize_prompt(TARGET_PROMPT, encode, 77)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(49408, dim, generator=g)  # a random token-embedding table stands in for CLIP's text encoder

    def embed(p: Any) -> torch.Tensor:
        ids = [49406, *p.ids, 49407] + [49407] * (77 - p.end - 1)
        return table[ids].unsqueeze(0).to(device)

    f, s = cfg.frames, cfg.size
    # one shared image plus per-frame variation: a video, not independent noise frames
    latents = (torch.randn(1, 4, s, s, generator=g) + 0.3 * torch.randn(f, 4, s, s, generator=g)).to(device)
    empty = (0.1 * torch.randn(1, 77, dim, generator=g)).to(device)
    masks = box_trajectory(8 * s, 8 * s, f, (0.1, 0.3, 0.3, 0.3), (0.6, 0.3, 0.3, 0.3)).to(device)
    return Setup(unet, dim, device, tokenizer, embed(src), embed(tgt), empty, src, tgt, latents, masks)


def build_stages(cfg: BenchConfig, su: Setup) -> list[Stage]:
    """The stages in order; later ones read what earlier ones left in ``state``."""
    from vp2p import COND, UNCOND, FrameMode, LayoutSpec, RunState, T2SSettings
    from vp2p.attention_store import DEFAULT_MAX_TOKENS, AttentionStore, StoreRecorder, StoreSpec, cond_digest
    from vp2p.diffusers_host import DiffusersT2S, tune_diffusers
    from vp2p.edit import EditInputs, Guidance, decoupled_edit, fused_edit
    from vp2p.fatezero import FateZeroController, FateZeroEdit
    from vp2p.guidance import WordMapRecorder, default_guided_steps, guided_update
    from vp2p.inversion import InversionSettings, ddim_invert, optimise_null_text
    from vp2p.local_blend import LocalBlend, LocalBlendSpec
    from vp2p.p2p import P2PController, P2PEdit
    from vp2p.prompt_align import EditKind
    from vp2p.schedule import Schedule, ddim_step, sd_alphas_cumprod
    from vp2p.tuning import TuneSettings

    dev, frames, hw = su.device, cfg.frames, (cfg.size, cfg.size)
    ac = sd_alphas_cumprod().to(dev)
    sched = Schedule.reference(cfg.steps)
    p2p_host = DiffusersT2S(su.unet, T2SSettings(FrameMode.FIRST_FRAME, True))  # Video-P2P: first-frame + temporal layers
    fz_host = DiffusersT2S(su.unet, T2SSettings(FrameMode.MIDDLE_FRAME, False))  # FateZero zero-shot: middle frame
    gen_host = DiffusersT2S(su.unet, T2SSettings(FrameMode.FIRST_FRAME, True))  # generation: an untuned inflated model
    state: dict[str, Any] = {}
    src_words, tgt_words = tuple(su.src.positions(WORD)), tuple(su.tgt.positions(NEW_WORD))

    def tune(probe: StepProbe) -> StageOutputs:
        with p2p_host as host:
            losses = tune_diffusers(host, su.latents, su.cond, ac, TuneSettings(steps=cfg.tune_steps, learning_rate=3e-5),
                                    on_step=probe.on_step, should_stop=probe.should_stop)
        trained = {f"to_q delta {kind} {key}": d for (kind, key), d in p2p_host.deltas.items()}
        trained.update({f"temporal {n}": p for n, p in p2p_host.bank.named_parameters()})
        return StageOutputs(trained, {"losses": torch.tensor(losses)}, {"final_loss": losses[-1] if losses else None})

    def invert(probe: StepProbe) -> StageOutputs:
        with p2p_host as host, torch.no_grad():
            traj = ddim_invert(host.denoiser(ac), su.latents, su.cond, sched, should_stop=probe.should_stop, on_step=probe.on_step)
        state["traj"] = traj
        return StageOutputs({"trajectory": traj})

    def null_text(probe: StepProbe) -> StageOutputs:
        settings = InversionSettings(steps=cfg.steps, inner_steps=cfg.inner_steps, early_stop=0.0)
        with p2p_host as host:
            res = optimise_null_text(host.denoiser(ac), state["traj"], su.cond, su.empty, sched, settings,
                                     on_step=probe.on_step, should_stop=probe.should_stop)
        state["null"] = res
        return StageOutputs({"null_embeddings": res.null_embeddings, "source_path": res.source_path},
                            extra={"inner_steps_used": sum(res.iterations)})

    def p2p_edit(probe: StepProbe) -> StageOutputs:
        res = state["null"]
        spec = LocalBlendSpec(src_words, tgt_words, threshold=0.3)
        edit = P2PEdit(su.src, su.tgt, su.cond.cpu(), su.target.cpu(), EditKind.REPLACE, cross_replace=0.2, self_replace=0.5,
                       blend=spec)
        inputs = EditInputs(state["traj"][0], sched, su.cond, res.null_embeddings, su.empty, 7.5, res.source_path)
        with p2p_host as host, torch.no_grad():
            out = decoupled_edit(host.denoiser(ac), inputs, su.target, 7.5, Guidance.DECOUPLED,
                                 P2PController(edit, sched, LocalBlend(spec, frames, hw, sched.steps)), reuse=False,
                                 on_step=probe.on_step, should_stop=probe.should_stop)
        return StageOutputs({"edited": out.edited, "source": out.source}, extra={"rows_per_call": sorted(set(out.rows))})

    def fatezero_invert(probe: StepProbe) -> StageOutputs:
        spec = StoreSpec.for_fraction(cfg.steps, 0.8, DEFAULT_MAX_TOKENS, frames, FrameMode.MIDDLE_FRAME, cond_digest(su.cond))
        store = AttentionStore(spec)
        with fz_host as host, torch.no_grad():
            traj = ddim_invert(host.denoiser(ac), su.latents, su.cond, sched, should_stop=probe.should_stop, on_step=probe.on_step,
                               run=RunState(StoreRecorder(store, sched), LayoutSpec(frames)))
        store.finish()
        state["fz"] = (traj, store)
        some = dict(list(store.tensors().items())[:8])  # on the CPU by design (FateZero offloads its store)
        return StageOutputs({"trajectory": traj}, some, {"store_gb": store.nbytes / 1e9, "stored_steps": spec.stored_steps})

    def fatezero_edit(probe: StepProbe) -> StageOutputs:
        traj, store = state["fz"]
        fz = FateZeroEdit(P2PEdit(su.src, su.tgt, su.cond.cpu(), su.target.cpu(), EditKind.REPLACE, cross_replace=0.8,
                                  self_replace=0.8), src_words, 0.3)
        inputs = EditInputs(traj[0], sched, su.cond, None, su.empty, 7.5)
        with fz_host as host, torch.no_grad():
            out = fused_edit(host.denoiser(ac), inputs, traj, su.target, 7.5, Guidance.DECOUPLED,
                             FateZeroController(fz, store, sched, hw), on_step=probe.on_step, should_stop=probe.should_stop)
        return StageOutputs({"edited": out.edited})

    def guidance(probe: StepProbe) -> StageOutputs:
        g = torch.Generator().manual_seed(1)
        sig = sched.sigmas.to(dev)
        sig_host = sched.sigmas.tolist()  # python floats for guided_update: no device sync per step
        x = (torch.randn(su.latents.shape, generator=g) * math.sqrt(1 + sig_host[0] ** 2)).to(dev)
        ctx = torch.cat([su.empty.expand(frames, -1, -1), su.cond.expand(frames, -1, -1)])
        cond_rows = su.cond.expand(frames, -1, -1)
        guided = default_guided_steps(sched.steps)
        energies = []
        with gen_host as host:
            den = host.denoiser(ac)
            for i in range(sched.steps):
                probe.should_stop()
                if guided[i]:
                    rec = WordMapRecorder(src_words, hw, (4, 8), True)

                    def evaluate(xx: torch.Tensor, r: WordMapRecorder, i: int = i) -> None:
                        den(xx, sig[i].expand(frames), cond_rows, [COND], RunState(r, LayoutSpec(frames)))

                    x, e = guided_update(x, sig_host[i], su.masks, 20.0, evaluate, rec)
                    energies.append(e)
                with torch.no_grad():
                    d = den(torch.cat([x, x]), sig[i].expand(2 * frames), ctx, [UNCOND, COND], RunState()).float()
                d_u, d_c = d.chunk(2)
                x = ddim_step(x, d_u + 7.5 * (d_c - d_u), sig[i], sig[i + 1])
                probe.on_step(i)
        return StageOutputs({"latent": x}, {"energies": torch.tensor(energies)}, {"guided_steps": sum(guided)})

    table = {"tune": tune, "ddim_invert": invert, "null_text": null_text, "p2p_edit": p2p_edit,
             "fatezero_invert": fatezero_invert, "fatezero_edit": fatezero_edit, "guidance": guidance}
    return [Stage(name, table[name]) for name in STAGES]


def needed_stages(wanted: tuple[str, ...]) -> list[str]:
    """The asked stages plus the ones whose results they read (measured too: timing them costs little)."""
    needs = {"null_text": ["ddim_invert"], "p2p_edit": ["ddim_invert", "null_text"], "fatezero_edit": ["fatezero_invert"]}
    out = set(wanted)
    for s in wanted:
        out.update(needs.get(s, []))
    return [s for s in STAGES if s in out]


# -- the report ------------------------------------------------------------------------------------------
def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(results: list[StageResult], cfg: BenchConfig, memory_kind: str) -> None:
    print(f"\nVideo-P2P GPU bench ({'tiny, CPU' if cfg.tiny else 'SD1.5 shape'}; {cfg.device} {cfg.dtype}, {cfg.frames} frames, "
          f"{cfg.size}² latents, {cfg.steps} steps, {cfg.inner_steps} inner; peak = {memory_kind})")
    head = f"{'stage':16s} {'steps':>5s} {'wall s':>9s} {'s/step':>8s} {'rows/step':>9s} {'calls/step':>10s} {'peak GB':>8s} " \
           f"{'HtoD/step':>9s} {'DtoH/step':>9s}  status"
    print(head)
    print("-" * len(head))
    for r in results:
        status = "ok" if not r.failures else "FAIL"
        print(f"{r.stage:16s} {r.steps:5d} {r.wall_s:9.3f} {r.s_per_step:8.4f} {r.unet_rows_per_step:9.1f} "
              f"{r.unet_calls_per_step:10.2f} {r.peak_gb:8.3f} {_fmt(r.copies_htod_per_step, '9.1f'):>9s} "
              f"{_fmt(r.copies_dtoh_per_step, '9.1f'):>9s}  {status}")
    for r in results:
        if r.extra:
            print(f"  {r.stage}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.extra.items()))


def environment(device: torch.device, wheels: list[str], tokenizer: str) -> dict[str, Any]:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "diffusers_from": "--wheels " + ", ".join(wheels) if wheels else str(Path(diffusers.__file__).parent),
           "tokenizer": tokenizer, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU fp32, tiny UNet, 2 frames of 8² latents, 3 steps (CI)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu.json", help="JSON report")
    ap.add_argument("--wheels", type=Path, help="folder of wheels (diffusers) to unpack and import; nothing is installed")
    ap.add_argument("--pack-wheel", type=Path, metavar="DIR",
                    help="write this environment's diffusers as a wheel into DIR (for --wheels on a machine without it), then exit")
    ap.add_argument("--max-gb", type=float, default=12.0, help="fail a stage whose peak memory is above this (GB)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset (their inputs' stages run too)")
    ap.add_argument("--device", help="override the mode's device (cuda | cpu); e.g. the SD1.5 shape on the CPU at small sizes")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="override the mode's UNet dtype")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--size", type=int, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--inner-steps", type=int)
    ap.add_argument("--tune-steps", type=int)
    ap.add_argument("--profile-steps", type=int, help="steps profiled for copies per stage (CUDA; 0: skip)")
    ap.add_argument("--strict-copies", action="store_true", help="any host<->device copy in a step loop fails the stage")
    ap.add_argument("--memory", choices=("auto", "tensors"), default="auto",
                    help="auto: CUDA's max_memory_allocated, or the CPU's peak RSS; tensors (CPU): the peak of live tensor "
                         "bytes from the allocator's events — with --device cpu at the full shape, what each stage holds")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    if args.pack_wheel:
        try:
            print(pack_wheel(args.pack_wheel))
        except (BenchError, ImportError) as e:  # PackageNotFoundError is an ImportError
            print(f"gpu.py: {e}", file=sys.stderr)
            return 2
        return 0
    unknown = [s for s in args.stages.split(",") if s and s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; the stages are {', '.join(STAGES)}")
    cfg = tiny_config(args.max_gb) if args.tiny else full_config(args.max_gb)
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("frames", args.frames), ("size", args.size), ("steps", args.steps),
                                   ("inner_steps", args.inner_steps), ("tune_steps", args.tune_steps),
                                   ("profile_steps", args.profile_steps)) if v is not None}
    cfg = replace(cfg, strict_copies=args.strict_copies, stages=tuple(needed_stages(tuple(s for s in args.stages.split(",") if s))),
                  **overrides)
    try:
        wheels = add_wheels(args.wheels) if args.wheels else []
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise BenchError("CUDA is not available: this torch build or machine has no GPU. Run with --tiny for the CPU check.")
            if device.index is None:  # an explicit index, so the wrong-device check compares like with like
                device = torch.device("cuda", torch.cuda.current_device())
        if args.memory == "tensors" and device.type != "cpu":
            raise BenchError("--memory tensors counts the CPU allocator's events: use it with --device cpu.")
        memory = TensorTimeline(device) if args.memory == "tensors" else PeakMemory(device)  # before the model: weights count
        torch.manual_seed(0)
        su = build_setup(cfg, device)
    except BenchError as e:
        print(f"gpu.py: {e}", file=sys.stderr)
        return 2
    rows = RowCounter(su.unet)
    results: list[StageResult] = []
    errors: dict[str, str] = {}  # stages that raised (an OOM, a bug) or could not run: the others still run
    env = environment(device, wheels, su.tokenizer)

    def write_report() -> list[str]:
        # written after every stage, so a run killed at a time limit leaves what it measured
        failures = [f for r in results for f in r.failures] + [f"{k}: {v}" for k, v in errors.items()]
        report = {"config": asdict(cfg), "environment": env, "peak_kind": memory.kind,
                  "stages": {r.stage: asdict(r) for r in results}, "errors": errors, "failures": failures}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        return failures

    for stage in build_stages(cfg, su):
        if stage.name not in cfg.stages:
            continue
        missing = [n for n in needed_stages((stage.name,)) if n != stage.name and n in errors]
        if missing:
            errors[stage.name] = f"not run: it needs the results of {', '.join(missing)}"
            write_report()
            continue
        try:
            result, _ = measure(stage, cfg, device, rows, memory)
        except Exception as e:  # noqa: BLE001 - reported with the stage's name; the next stages still run
            log.exception("stage %s raised", stage.name)
            errors[stage.name] = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_report()
            continue
        if stage.name == "tune":
            result.extra["extrapolated_s_for_300_steps"] = result.s_per_step * TUNE_REFERENCE_STEPS
        results.append(result)
        log.info("stage %s: %.3f s", stage.name, result.wall_s)
        write_report()
    if isinstance(memory, TensorTimeline):
        windows = memory.finish()
        for r in results:
            r.held_before_gb, r.peak_gb = windows[r.extra.pop("memory_window")]
            if r.peak_gb > cfg.max_gb:
                r.failures.append(f"{r.stage}: peak memory {r.peak_gb:.3g} GB ({memory.kind}) is above --max-gb {cfg.max_gb:g}")
    failures = write_report()
    print_table(results, cfg, memory.kind)
    for name, why in errors.items():
        print(f"{name:16s} ERROR  {why}")
    print(f"\nJSON: {args.out}")
    if failures:
        print("\nFAILED checks:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
