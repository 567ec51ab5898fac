"""FateZero's attention store, kept lean: what fusion reads, not every probability map.

During the inversion the source's conditional rows are evaluated at every step's sigma on
the inverted latent of that step. For the layers fusion uses (≤ ``max_tokens`` query tokens
per frame, FateZero's 32²) and the first ``stored_steps`` edit steps, the store keeps, in fp16
(``precision``; FateZero keeps fp32, see ``StorePrecision``):

* ``attn1`` (frame/self attention): the source's queries ``q`` and its distinct keys
  (``compact_keys`` of the layer's own frame attention: one frame for first/middle-frame
  attention, every frame in blocks narrower than ``frame_attention_min_channels``). Fusion rebuilds the source's
  self-attention output as ``SDPA(q_src, k_src, v_edit)`` — never a probability tensor;
* ``attn2`` (cross attention): the probabilities ``[F, H, N, T]``. Replacement reads them per
  head; the blend masks read the blend words' columns. (Queries would not do: the source's
  text keys are not available inside the edit's attention call.)

Temporal attention is not stored (FateZero leaves it alone).

A step is named by its index in the schedule (``sigmas[step]``), the index the edit reads
it by; the inversion records the steps in the reverse order (it walks the sigmas upwards).
The store lives in memory (``cpu``) or as one safetensors shard per step in a folder
(``disk``), read back one step at a time during the edit. A finished folder holds
``spec.json``, written last, so a half-written store is never taken for a whole one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import torch

from .attention import attention_probabilities
from .cache_budget import touch
from .cache_lock import EntryLock, acquire, pin_for, pinned_here, remove_entry
from .control import ATTN1, ATTN2, AttentionCall, AttentionController, RunState
from .errors import VP2PError, parse_option
from .frame_attention import FrameMode, compact_keys, key_frames
from .inversion import inversion_input
from .keys import LayerKey
from .layout import COND, SOURCE
from .safetensors_io import check_inside, load_tensors, write_atomic
from .schedule import Schedule, sigma_index

log = logging.getLogger("VideoP2P")

STORE_FORMAT = "vp2p-attention-store/1"
DEFAULT_MAX_TOKENS = 32 * 32


class AttentionStoreError(VP2PError):
    """A store is missing, damaged, or was made for something else."""


class StorePrecision(str, Enum):
    """The dtype the store keeps its tensors in.

    ``fp16`` (the default) halves the store. FateZero keeps its maps in the precision of the run
    (fp32 in its fp32 runs), and the rounding is measurable: on the FateZero parity fixture
    (``tests/test_parity_fatezero.py``) the self-attention blend values are 6.5e-5 from the official
    code's with an fp16 store and 1.1e-6 with an fp32 store (relative L2), the edited latents 9.0e-5
    and 2.8e-5 (no mask pixel differs in either). ``fp32``: the official numbers, twice the store."""

    FP16 = "fp16"
    FP32 = "fp32"

    @classmethod
    def parse(cls, value: "str | StorePrecision") -> "StorePrecision":
        return parse_option(cls, value, "store_precision", "a store precision")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self is StorePrecision.FP16 else torch.float32


class StoreLocation(str, Enum):
    AUTO = "auto"  # disk above a predicted size (``auto_location``), else cpu
    CPU = "cpu"
    DISK = "disk"

    @classmethod
    def parse(cls, value: "str | StoreLocation") -> "StoreLocation":
        return parse_option(cls, value, "store_location", "a store location")


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds: steps ``0…stored_steps−1`` of a ``steps``-step schedule, layers with
    ≤ ``max_tokens`` tokens per frame, ``frames`` frames with ``frame_mode`` frame attention in
    the blocks at least ``frame_attention_min_channels`` wide (plain self-attention in narrower
    ones: their keys are every frame's), recorded with the source conditioning whose digest is
    ``cond_digest``, its tensors kept in ``precision`` (a ``StorePrecision`` value)."""

    steps: int
    stored_steps: int
    max_tokens: int
    frames: int
    frame_mode: str
    cond_digest: str
    frame_attention_min_channels: int = 0
    precision: str = StorePrecision.FP16.value

    def __post_init__(self) -> None:
        if not 0 <= self.stored_steps <= self.steps:
            raise AttentionStoreError(f"stored_steps={self.stored_steps} must be between 0 and steps={self.steps}.")
        StorePrecision.parse(self.precision)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return StorePrecision.parse(self.precision).dtype

    @classmethod
    def for_fraction(cls, steps: int, fraction: float, max_tokens: int, frames: int, frame_mode: FrameMode,
                     cond_digest: str, frame_attention_min_channels: int = 0,
                     precision: "str | StorePrecision" = StorePrecision.FP16) -> "StoreSpec":
        """Store the first ``fraction`` of the edit's steps (rounded up: what fractions ≤ it read)."""
        if not 0.0 < fraction <= 1.0:
            raise AttentionStoreError(f"store_steps={fraction} is a fraction of the steps; use a number in (0, 1].")
        stored = min(steps, int(-(-fraction * steps // 1)))
        return cls(steps, stored, int(max_tokens), frames, FrameMode.parse(frame_mode).value, cond_digest,
                   int(frame_attention_min_channels), StorePrecision.parse(precision).value)

    def to_json(self) -> str:
        spec = asdict(self)
        if not spec["frame_attention_min_channels"]:
            del spec["frame_attention_min_channels"]  # the default: the description (and cache folder) of earlier stores
        if spec["precision"] == StorePrecision.FP16.value:
            del spec["precision"]  # likewise
        return json.dumps(spec, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StoreSpec":
        """The spec ``to_json`` wrote; raises ``AttentionStoreError`` for anything else (unknown or missing fields,
        wrong types, counts beyond ``MAX_STORE_STEPS``/``MAX_STORE_FRAMES``, an unknown frame mode or precision)."""
        try:
            fields = json.loads(text)
        except ValueError as e:
            raise AttentionStoreError(f"An attention store description is unreadable ({e}); the store is damaged.") from e
        if not isinstance(fields, dict):
            raise AttentionStoreError(f"An attention store description is a JSON {type(fields).__name__}, not an object; the "
                                      "store is damaged.")
        bounds = {"steps": (1, MAX_STORE_STEPS), "stored_steps": (0, MAX_STORE_STEPS), "max_tokens": (1, 2**40),
                  "frames": (1, MAX_STORE_FRAMES), "frame_attention_min_channels": (0, 2**40)}
        for name, (low, high) in bounds.items():
            value = fields.get(name, low)
            if type(value) is not int or not low <= value <= high:
                raise AttentionStoreError(f"An attention store description gives {name}={value!r}, expected an integer in "
                                          f"[{low}, {high}]; the store is damaged.")
        for name in ("frame_mode", "cond_digest", "precision"):
            if name in fields and not isinstance(fields[name], str):
                raise AttentionStoreError(f"An attention store description gives {name}={fields[name]!r}, expected a string; "
                                          "the store is damaged.")
        try:
            FrameMode.parse(fields.get("frame_mode", ""))
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise AttentionStoreError(f"An attention store description is unreadable ({e}); the store is damaged.") from e


MAX_STORE_STEPS = 10_000  # a description giving more is damaged (no schedule has that many steps)
MAX_STORE_FRAMES = 1_000_000
MAX_SPEC_BYTES = 1_000_000  # spec.json is a few hundred bytes


AUTO_DISK_ABOVE_GB = 4.0  # an ``auto`` store larger than this goes to disk (VP2P_STORE_DISK_ABOVE_GB overrides)


def auto_location(predicted_bytes: int, above_gb: Optional[float] = None) -> StoreLocation:
    """Where an ``auto`` store goes: on disk (streamed back one step at a time) when its predicted size is above
    ``above_gb`` (default: ``VP2P_STORE_DISK_ABOVE_GB``, else 4 GB, ~5 SD1.5 frames at 512² and FateZero's
    settings), in RAM otherwise."""
    if above_gb is None:
        text = os.environ.get("VP2P_STORE_DISK_ABOVE_GB", "")
        try:
            above_gb = float(text) if text else AUTO_DISK_ABOVE_GB
        except ValueError:
            raise AttentionStoreError(f"VP2P_STORE_DISK_ABOVE_GB={text!r} is not a number of GB (e.g. 4 or 0.5).") from None
    return StoreLocation.DISK if predicted_bytes > above_gb * 1e9 else StoreLocation.CPU


def cond_digest(cond: torch.Tensor) -> str:
    """The digest of a source conditioning [1|F, T, D] that a store records (dtype and device aside)."""
    from .fingerprint import fingerprint

    return fingerprint([("cond", cond.detach().float().cpu())], {"what": "source conditioning"})


def check_store_matches(store: AttentionStore, cond: torch.Tensor) -> None:
    """Refuse a store recorded with another source conditioning than ``cond``."""
    if store.spec.cond_digest != cond_digest(cond):
        where = f"{store.directory.name}: " if store.directory is not None else ""
        raise AttentionStoreError(
            f"{where}The attention store was recorded with another source prompt than this inversion's: the file was mixed up or "
            "damaged. Invert again with store_attention."
        )


def entry(kind: str, key: LayerKey, part: str) -> str:
    """The name of one stored tensor of a step: ``attn1.input_4_0.q``."""
    return f"{kind}.{key.slug}.{part}"


def parse_entry(name: str) -> tuple[str, LayerKey, str]:
    kind, rest = name.split(".", 1)
    slug, part = rest.rsplit(".", 1)
    return kind, LayerKey.from_slug(slug), part


class AttentionStore:
    """Per-step tensors (see the module docstring), in memory or in a folder of shards.

    Recording: ``put`` tensors as the inversion produces them (a step is written out when the
    next step starts), then ``finish``. Reading: ``get(step, name)``; with a folder and no
    copy in memory, a step's shard is read when first asked for and kept until another is.
    """

    def __init__(self, spec: StoreSpec, directory: Optional[Path] = None, in_memory: bool = True) -> None:
        if directory is None and not in_memory:
            raise AttentionStoreError("An attention store kept on disk needs a folder.")
        self.spec = spec
        self.directory = directory
        self.in_memory = in_memory
        self._steps: dict[int, dict[str, torch.Tensor]] = {}
        self._recording: Optional[int] = None
        self._loaded: Optional[int] = None  # the one step read back from disk (disk mode)
        self.nbytes = 0
        self.complete = False
        self.record_order: list[int] = []  # steps in the order they were recorded
        self.read_order: list[int] = []  # steps in the order an edit first read them
        self._lock: Optional[EntryLock] = None  # the folder's lock while recording (``claim_folder``)

    # -- recording --------------------------------------------------------------------------
    def put(self, step: int, name: str, tensor: torch.Tensor) -> None:
        if self._recording is not None and step != self._recording:
            self._flush(self._recording)
        if step != self._recording:
            self._recording = step
            self.record_order.append(step)
        t = tensor.detach().to("cpu", self.spec.dtype).contiguous()
        old = self._steps.setdefault(step, {}).get(name)
        self.nbytes += t.numel() * t.element_size() - (0 if old is None else old.numel() * old.element_size())
        self._steps[step][name] = t

    def put_part(self, step: int, name: str, part: torch.Tensor, shape: tuple[int, ...], dim: int, start: int) -> None:
        """Write ``part`` into the tensor ``name`` of ``step`` (of full ``shape``) at ``start`` along ``dim``: a
        chunked inversion records each window's frames; the tensor is allocated (zeros) on the first part."""
        if self._recording is not None and step != self._recording:
            self._flush(self._recording)
        if step != self._recording:
            self._recording = step
            self.record_order.append(step)
        tensors = self._steps.setdefault(step, {})
        full = tensors.get(name)
        if full is None or tuple(full.shape) != tuple(shape):
            full = torch.zeros(shape, dtype=self.spec.dtype)
            self.nbytes += full.numel() * full.element_size()
            tensors[name] = full
        full.narrow(dim, start, part.shape[dim]).copy_(part.detach().to("cpu", self.spec.dtype))

    def _flush(self, step: int) -> None:
        tensors = self._steps.get(step)
        if self.directory is None or not tensors:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / _shard(step), tensors, {"format": STORE_FORMAT, "step": str(step)})
        if not self.in_memory:
            del self._steps[step]

    def finish(self) -> "AttentionStore":
        """Write out what is pending and (with a folder) the description that marks the store whole."""
        if self._recording is not None:
            self._flush(self._recording)
            self._recording = None
        missing = [s for s in range(self.spec.stored_steps) if s not in self.record_order]
        if missing:
            raise AttentionStoreError(f"The attention store lacks steps {missing}; the recording was cut short.")
        if self.directory is not None:
            meta = {"format": STORE_FORMAT, "spec": json.loads(self.spec.to_json()), "nbytes": self.nbytes}
            _write_text_atomic(self.directory / "spec.json", json.dumps(meta))
        self.complete = True
        return self

    # -- reading ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, torch.Tensor]:
        """All tensors of one step (raises when the step is not stored)."""
        if not 0 <= step < self.spec.stored_steps:
            raise AttentionStoreError(
                f"The attention store holds steps 0–{self.spec.stored_steps - 1} of {self.spec.steps}; step {step} was asked for."
            )
        if step not in self.read_order:
            self.read_order.append(step)
        if step in self._steps:
            return self._steps[step]
        if self.directory is None:
            raise AttentionStoreError(f"The attention store has no step {step}; it is damaged. Invert again with store_attention.")
        if self._loaded is not None and not self.in_memory:
            self._steps.pop(self._loaded, None)
        self._steps[step] = _read_shard(self.directory / _shard(step), self.spec)
        self._loaded = step
        return self._steps[step]

    def get(self, step: int, name: str) -> torch.Tensor:
        tensors = self.step(step)
        if name not in tensors:
            kind, key, _ = parse_entry(name)
            raise AttentionStoreError(
                f"The attention store has no {kind} of layer {key} at step {step}: it was recorded with another model or "
                "other layers. Invert again with store_attention on this MODEL."
            )
        return tensors[name]

    def names(self, step: int) -> list[str]:
        return list(self.step(step))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor as ``{"<step>/<name>": tensor}`` (reads all shards: for saving)."""
        return {f"{s}/{n}": t for s in range(self.spec.stored_steps) for n, t in self.step(s).items()}

    @classmethod
    def from_tensors(cls, spec: StoreSpec, tensors: dict[str, torch.Tensor]) -> "AttentionStore":
        """A store of ``{"<step>/<entry>": tensor}`` (what ``tensors`` gives); raises ``AttentionStoreError`` for a name
        that is no stored entry of a stored step, or a tensor that is not floating-point."""
        store = cls(spec)
        for name, t in tensors.items():
            step, entry_name = _step_entry(name, spec)
            _check_entry(entry_name, t, name)
            store.put(step, entry_name, t)
        store._recording = None
        return store.finish()

    @classmethod
    def open(cls, directory: Path, in_memory: bool) -> "AttentionStore":
        """A finished store folder; ``in_memory`` reads every shard now (cpu), else step by step (disk). Raises
        ``AttentionStoreError`` naming the folder's file and what is wrong (see ``_read_shard``)."""
        spec_path = directory / "spec.json"
        if not spec_path.is_file():
            raise AttentionStoreError(f"{directory.name} is not a finished attention store (no spec.json).")
        try:
            check_inside(spec_path, directory, "attention store", AttentionStoreError)
            if spec_path.stat().st_size > MAX_SPEC_BYTES:
                raise AttentionStoreError(f"{directory.name}/spec.json holds {spec_path.stat().st_size} bytes, more than an "
                                          f"attention store description ever does ({MAX_SPEC_BYTES}); the store is damaged.")
            meta = json.loads(spec_path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise AttentionStoreError(f"{directory.name}/spec.json is unreadable ({e}).") from e
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise AttentionStoreError(f"{directory.name} is not an attention store of this pack (format {found!r}).")
        try:
            spec = StoreSpec.from_json(json.dumps(meta.get("spec")))
        except AttentionStoreError as e:
            raise AttentionStoreError(f"{directory.name}/spec.json: {e}") from e
        nbytes = meta.get("nbytes", 0)
        if type(nbytes) is not int or nbytes < 0:
            raise AttentionStoreError(f"{directory.name}/spec.json gives nbytes={nbytes!r}, expected a byte count; the store is "
                                      "damaged.")
        store = cls(spec, directory, in_memory)
        store.nbytes = nbytes
        for s in range(store.spec.stored_steps):
            if not (directory / _shard(s)).is_file():
                raise AttentionStoreError(f"{directory.name} lacks {_shard(s)}, the shard of step {s} (or it is no regular file); the "
                                          "store is damaged.")
            if in_memory:
                store._steps[s] = _read_shard(directory / _shard(s), spec)
        store.complete = True
        return store


def claim_folder(folder: Path, spec: StoreSpec, in_memory: bool, reuse: bool = True, record: bool = True,
                 on_wait: Optional[Callable[[], None]] = None) -> tuple[Optional[AttentionStore], Optional[AttentionStore]]:
    """(finished store, None) when ``folder`` holds a finished store (``reuse``), else (None, a recording
    into ``folder``) — or (None, None) when ``record`` is off (the caller records in RAM).

    Concurrency (``vp2p.cache_lock``): a finished store is read under a shared lock (it waits only for a
    recording, never for readers — this process's own earlier stores included); recording takes the
    exclusive lock, so a second process asking for the same store waits for the first one's recording
    and then reads it. A finished store
    read step by step (``in_memory`` off) keeps a pin (shared lock) for as long as the store object
    lives, so clearing or evicting the cache never deletes a store an edit still reads; the recording
    keeps the exclusive lock until ``finish_recording`` turns it into that pin. An unfinished folder
    found under the lock is the leftover of a recording that was killed: it is removed (and reported)."""
    def reuse_finished(lock: EntryLock) -> Optional[AttentionStore]:
        if not (reuse and (folder / "spec.json").is_file()):
            return None
        try:
            store = AttentionStore.open(folder, in_memory)
        except AttentionStoreError as e:
            log.warning("Ignoring a damaged attention store (%s); recording it again.", e)
            return None
        touch(folder)
        if in_memory:
            lock.release()  # every shard read: nothing on disk is needed any more
        else:
            pin_for(store, lock)  # a shared lock: other readers (this process's earlier stores too) go on
        log.info("Attention store cache hit %s.", folder.name)
        return store

    # A shared lock first: it waits only while another process records this store, never for readers.
    lock = acquire(folder, exclusive=False, on_wait=on_wait)
    try:
        store = reuse_finished(lock)
    except BaseException:
        lock.release()
        raise
    if store is not None:
        return store, None
    lock.release()
    if not record:
        return None, None
    if pinned_here(folder):
        raise AttentionStoreError(
            f"{folder.name} is damaged, and an earlier run of this process still reads it, so it cannot be recorded "
            "again now. Clear the Video-P2P cache (it is removed once released) or use store_location cpu, then run again.")
    lock = acquire(folder, exclusive=True, on_wait=on_wait)
    try:
        store = reuse_finished(lock)  # another process may have finished it while this one waited
        if store is not None:
            return store, None
        if folder.exists():
            log.warning("Removing %s, an attention store whose recording did not finish (the process writing it stopped, "
                        "or the disk filled); recording it again.", folder.name)
            remove_entry(folder)
        recording = AttentionStore(spec, folder, in_memory)
        recording._lock = lock
        return None, recording
    except BaseException:
        lock.release()
        raise


def finish_recording(recording: AttentionStore) -> AttentionStore:
    """``recording.finish()``; a store kept on disk then holds a pin for its life (see ``claim_folder``).
    A failure (the disk full, the recording cut short) deletes the folder it started."""
    lock = getattr(recording, "_lock", None)
    try:
        store = recording.finish()
    except BaseException:
        abandon_recording(recording)
        raise
    if lock is not None:
        recording._lock = None
        if store.in_memory:
            lock.release()
        else:
            pin_for(store, lock)
    return store


def abandon_recording(recording: Optional[AttentionStore]) -> None:
    """Delete the folder of a recording that will not finish, and let go of its lock."""
    if recording is None:
        return
    lock = getattr(recording, "_lock", None)
    recording._lock = None
    try:
        if recording.directory is not None and not recording.complete:
            remove_entry(recording.directory)
    finally:
        if lock is not None:
            lock.release()


def _shard(step: int) -> str:
    return f"step_{step:04d}.safetensors"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_shard(path: Path, spec: Optional[StoreSpec] = None) -> dict[str, torch.Tensor]:
    """One step's tensors, refused (``AttentionStoreError`` naming the shard) when the file lies outside its store
    folder, its header is damaged (checked before anything is allocated), a name is no stored entry, a tensor is not
    in ``spec``'s precision, or a value is NaN/inf."""
    where = f"{path.parent.name}/{path.name}"
    try:
        check_inside(path, path.parent, "attention store", AttentionStoreError)
        tensors, _ = load_tensors(path, "attention store shard", AttentionStoreError)
    except AttentionStoreError as e:
        raise AttentionStoreError(f"{where} is unreadable: {e} Invert again with store_attention.") from e
    for name, t in tensors.items():
        _check_entry(name, t, where)
        if spec is not None and t.dtype != spec.dtype:
            raise AttentionStoreError(f"{where}: {name!r} has dtype {t.dtype}, the store's precision is {spec.precision}; the "
                                      "store is damaged. Invert again with store_attention.")
    return tensors


def _step_entry(name: str, spec: StoreSpec) -> tuple[int, str]:
    """(step, entry) of a saved ``"<step>/<entry>"`` name of a store of ``spec``."""
    step, sep, rest = name.partition("/")
    if not sep or not step.isdigit() or int(step) >= spec.stored_steps:
        raise AttentionStoreError(f"{name!r} is not an entry of a stored step (0–{spec.stored_steps - 1}); the store is damaged.")
    return int(step), rest


def _check_entry(name: str, t: torch.Tensor, where: str) -> None:
    """Refuse a stored tensor whose name is no ``kind.layer.part`` entry or which is not floating-point."""
    try:
        kind, _, part = parse_entry(name)
    except ValueError:
        kind, part = "", ""
    if kind not in (ATTN1, ATTN2) or part not in ("q", "k", "p"):
        raise AttentionStoreError(f"{where}: {name!r} is not an attention store entry (kind.layer.part); the store is damaged.")
    if not t.is_floating_point():
        raise AttentionStoreError(f"{where}: {name!r} has dtype {t.dtype}, expected a floating-point tensor; the store is damaged.")


# -- recording ------------------------------------------------------------------------------------

class StoreRecorder(AttentionController):
    """Records the source's conditional attention into a store while the inversion runs.

    It never changes an output: cross-attention probabilities are computed beside the fast
    path, so an inversion with a store is the same inversion as one without."""

    def __init__(self, store: AttentionStore, schedule: Schedule) -> None:
        if schedule.steps != store.spec.steps:
            raise AttentionStoreError(f"A store for {store.spec.steps} steps cannot record a {schedule.steps}-step inversion.")
        self.store = store
        self.sigmas = schedule.sigmas

    def override(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        if call.kind not in (ATTN1, ATTN2) or call.sigmas is None:
            return None
        step = sigma_index(self.sigmas, call.sigmas)
        spec = self.store.spec
        if step is None or step >= spec.stored_steps or call.frame_tokens(q) > spec.max_tokens:
            return None
        video = call.layout.video_of(COND, SOURCE)
        if video is None:
            return None
        per = q.shape[0] // call.layout.videos
        rows = slice(video * per, (video + 1) * per)
        if call.window is not None:
            self._record_window(call, step, q[rows], k[rows])
            return None
        if call.kind == ATTN1:
            self.store.put(step, entry(ATTN1, call.key, "q"), q[rows])
            self.store.put(step, entry(ATTN1, call.key, "k"), compact_keys(k[rows], call.frame_mode, call.layout.frames))
        else:
            self.store.put(step, entry(ATTN2, call.key, "p"), attention_probabilities(q[rows], k[rows], call.heads))
        return None

    def _record_window(self, call: AttentionCall, step: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """One window's part of the source video's tensors (q/k of the source video as the call regrouped
        them), written where the whole video's recording would hold them."""
        window, total, put = call.window, call.total_frames, self.store.put_part
        start, count = window.start, window.count
        if call.kind == ATTN2:
            p = attention_probabilities(q, k, call.heads)  # [count, H, N, T]
            put(step, entry(ATTN2, call.key, "p"), p, (total, *p.shape[1:]), 0, start)
            return
        mode = call.frame_mode
        if mode in (FrameMode.FIRST_FRAME, FrameMode.MIDDLE_FRAME):  # q [1, count·N, C], k: the anchor's [1, N, C]
            n = q.shape[1] // count
            put(step, entry(ATTN1, call.key, "q"), q, (1, total * n, q.shape[2]), 1, start * n)
            self.store.put(step, entry(ATTN1, call.key, "k"), k)
            return
        put(step, entry(ATTN1, call.key, "q"), q, (total, *q.shape[1:]), 0, start)
        if mode is FrameMode.SPARSE_CAUSAL:  # k [count, 2N, C]: frame 0's keys, then frame g−1's for frame g
            n = k.shape[1] // 2
            first = 1 if start == 0 else 0  # frame 0 reads itself: no previous frame to keep
            if count > first:
                put(step, entry(ATTN1, call.key, "k"), k[first:, n:], (total - 1, n, k.shape[2]), 0, start + first - 1)
        else:
            put(step, entry(ATTN1, call.key, "k"), k, (total, *k.shape[1:]), 0, start)


def store_nbytes(frames: int, layers: list[tuple[int, int, int]], frame_mode: FrameMode, context: int, stored_steps: int,
                 max_tokens: int = DEFAULT_MAX_TOKENS, frame_attention_min_channels: int = 0,
                 precision: "str | StorePrecision" = StorePrecision.FP16) -> int:
    """The store's size in bytes: per stored step and per layer with N ≤ ``max_tokens`` tokens per
    frame (``layers``: (N, channels C, heads H) of every transformer block), queries F·N·C,
    keys K·N·C (K = ``key_frames`` of the block's frame attention: ``frame_mode``, or plain
    self-attention where C < ``frame_attention_min_channels``) and cross probabilities F·H·N·T,
    in ``precision`` (2 bytes an element in fp16, 4 in fp32)."""
    size = StorePrecision.parse(precision).dtype.itemsize

    def keys(c: int) -> int:
        return key_frames(frame_mode if c >= frame_attention_min_channels else FrameMode.NONE, frames)

    per_step = sum((frames * n * c + keys(c) * n * c + frames * h * n * context) * size for n, c, h in layers if n <= max_tokens)
    return per_step * stored_steps


def record_missing_steps(denoise, trajectory: torch.Tensor, cond: torch.Tensor, schedule: Schedule, store: AttentionStore,
                         run: RunState) -> int:
    """Record every stored step the store lacks, with exactly the UNet call the inversion made for
    it: step i is evaluated at ``sigmas[i]`` on the latent ``trajectory[i+1]`` (see
    ``vp2p.inversion.inversion_step``). A store recorded during the inversion lacks none; a store
    added to a cached inversion lacks all of them.

    ``denoise`` is a ``vp2p.denoise.Denoiser``; ``run`` carries a ``StoreRecorder`` of ``store``;
    trajectory [S+1, F, C, h, w] (σ-space), cond [1|F, T, D]. Steps are recorded from the
    last to the first, as the inversion would. Returns the number of UNet calls made."""
    frames = trajectory.shape[1]
    sig = schedule.sigmas.to(trajectory.device)
    context = cond if cond.shape[0] == frames else cond.expand(frames, *cond.shape[1:])
    calls = 0
    for step in reversed(range(store.spec.stored_steps)):
        if step not in store.record_order:
            denoise(inversion_input(trajectory[step + 1].float(), sig[step + 1], sig[step]), sig[step].expand(frames), context, None, run)
            calls += 1
    return calls
