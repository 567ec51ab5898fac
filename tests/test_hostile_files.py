"""Hostile and damaged files (issue 26 item 4): every loader of the pack — inversion files, tuned T2S weights, attention
store folders — given a truncated file, flipped bytes in the tensors or the header, a header declaring huge shapes or
absurd offsets, wrong dtypes, fields that do not fit together, non-finite values, metadata with missing or extra
keys, a file for another model or video size, or a symlink out of its folder, raises a ``VP2PError`` subclass whose
message names the file and the problem, before allocating anything the size of what the header declares. A seeded
fuzz run of random mutations of each kind ends in a good load or a ``VP2PError``, never anything else."""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from vp2p.attention_store import AttentionStore, AttentionStoreError, StoreSpec, check_store_matches, cond_digest, entry
from vp2p.control import ATTN1, ATTN2
from vp2p.errors import VP2PError
from vp2p.frame_attention import FrameMode
from vp2p.inversion import InversionMode
from vp2p.inversion_file import Inversion, InversionFileError, check_fits, load_inversion, save_inversion
from vp2p.keys import LayerKey
from vp2p.patch import T2SSettings
from vp2p.safetensors_io import read_header
from vp2p.schedule import Schedule
from vp2p.tuned_file import TunedFileError, TunedWeights, check_compatible, load_tuned, save_tuned

KEY = LayerKey("input", 4, 0)
STEPS, FRAMES = 2, 2


# -- valid files of each kind -----------------------------------------------------------------------------------------

def make_inversion(store: bool = True, seed: int = 0) -> Inversion:
    """A small shared-null-text inversion (2 steps, 2 frames, 4×4 latents) with a one-step attention store."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 5, 8, generator=g)
    inv = Inversion(torch.randn(STEPS + 1, FRAMES, 4, 4, 4, generator=g), torch.randn(STEPS, 1, 5, 8, generator=g), cond,
                    Schedule.reference(STEPS), InversionMode.SHARED_NULL_TEXT, 7.5, "f" * 40, negative=torch.zeros(1, 5, 8),
                    iterations=torch.tensor([3, 2], dtype=torch.int32), source_path=torch.randn(STEPS + 1, FRAMES, 4, 4, 4, generator=g))
    if store:
        inv.attention = make_store(cond, None, g)
    return inv


def make_store(cond: torch.Tensor, directory: Path | None, g: torch.Generator) -> AttentionStore:
    spec = StoreSpec(STEPS, 1, 16, FRAMES, FrameMode.FIRST_FRAME.value, cond_digest(cond))
    store = AttentionStore(spec, directory, in_memory=directory is None)
    store.put(0, entry(ATTN1, KEY, "q"), torch.randn(FRAMES, 16, 8, generator=g))
    store.put(0, entry(ATTN1, KEY, "k"), torch.randn(1, 16, 8, generator=g))
    store.put(0, entry(ATTN2, KEY, "p"), torch.rand(FRAMES, 2, 16, 5, generator=g))
    return store.finish()


def make_tuned(seed: int = 0) -> TunedWeights:
    g = torch.Generator().manual_seed(seed)
    return TunedWeights(T2SSettings(), {("attn1", KEY): torch.randn(8, 8, generator=g), ("attn2", KEY): torch.randn(8, 8, generator=g)},
                        {"layers.input_4_0.to_out.weight": torch.randn(8, 8, generator=g)}, {"base_fingerprint": "b" * 40})


def write_kind(kind: str, folder: Path) -> Path:
    """A valid file of ``kind`` in ``folder``: the path to load (for ``store``, the shard of step 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "inversion":
        return save_inversion(folder / "inv.safetensors", make_inversion())
    if kind == "tuned":
        return save_tuned(folder / "tuned.safetensors", make_tuned())
    make_store(torch.ones(1, 5, 8), folder / "attention_x", torch.Generator().manual_seed(0))
    return folder / "attention_x" / "step_0000.safetensors"


def load_kind(kind: str, path: Path) -> object:
    if kind == "inversion":
        return load_inversion(path)
    if kind == "tuned":
        return load_tuned(path)
    store = AttentionStore.open(path.parent, in_memory=True)
    return store.step(0)


ERRORS = {"inversion": InversionFileError, "tuned": TunedFileError, "store": AttentionStoreError}
KINDS = tuple(ERRORS)


def refused(kind: str, path: Path, *words: str) -> str:
    """Load ``path``; assert it raises the kind's error naming the file and each of ``words``; return the message."""
    with pytest.raises(ERRORS[kind]) as info:
        load_kind(kind, path)
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def split(path: Path) -> tuple[dict, bytes, bytes]:
    """(header JSON, header bytes, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8:8 + n], raw[8 + n:]


def rewrite(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def resave(path: Path, change: Callable[[dict, dict], None]) -> None:
    """Rewrite ``path`` through safetensors with ``change(tensors, metadata)`` applied (a well-formed file with other
    contents; the digest is dropped so that only the semantic checks can catch it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("tensor_digest", None)
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


# -- each damage, each kind ---------------------------------------------------------------------------------------------

def test_tensors_sharing_memory_are_saved(tmp_path):
    """Start From Noise's inversion holds one tensor as both ``cond`` and ``negative``: saving it failed in safetensors
    ("Some tensors share memory") before the writer copied shared tensors apart."""
    inv = make_inversion(store=False)
    inv.negative = inv.cond
    back = load_inversion(save_inversion(tmp_path / "shared.safetensors", inv))
    assert torch.equal(back.negative, inv.cond) and torch.equal(back.cond, inv.cond)


def test_valid_files_load_and_round_trip(tmp_path):
    inv = load_inversion(write_kind("inversion", tmp_path))
    ref = make_inversion()
    assert torch.equal(inv.trajectory, ref.trajectory) and torch.equal(inv.null_embeddings, ref.null_embeddings)
    assert torch.equal(inv.attention.get(0, entry(ATTN1, KEY, "q")), ref.attention.get(0, entry(ATTN1, KEY, "q")))
    tuned = load_tuned(write_kind("tuned", tmp_path))
    assert torch.equal(tuned.deltas[("attn1", KEY)], make_tuned().deltas[("attn1", KEY)])
    assert set(load_kind("store", write_kind("store", tmp_path))) == {entry(ATTN1, KEY, "q"), entry(ATTN1, KEY, "k"), entry(ATTN2, KEY, "p")}


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated(kind, tmp_path, keep):
    path = write_kind(kind, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-7])
    refused(kind, path, "truncated")


def test_flipped_bytes_in_the_tensor_data(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # a mantissa bit of the last tensor's last element: a finite, plausible, wrong value
    path.write_bytes(bytes(raw))
    if kind == "store":  # shards carry no checksum (see docs/reliability.md): the value changes, nothing else
        assert load_kind(kind, path)
        raw[-1] = 0x7F  # an fp16 exponent of all ones: NaN/inf
        raw[-2] = 0xFF
        path.write_bytes(bytes(raw))
        refused(kind, path, "NaN or infinite")
    else:
        refused(kind, path, "checksum")


@pytest.mark.parametrize("damage", ["not_json", "not_object", "bad_utf8", "huge_length"])
def test_flipped_bytes_in_the_header(kind, tmp_path, damage):
    path = write_kind(kind, tmp_path)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    if damage == "not_json":
        raw[8] = ord("x")  # the header's opening brace
        words = ("not JSON",)
    elif damage == "not_object":
        text = b"[1, 2]".ljust(n)
        raw[8:8 + n] = text
        words = ("not an object",)
    elif damage == "bad_utf8":
        raw[9] = 0xFF
        words = ("not JSON",)
    else:
        raw[7] = 0x40  # the length's top byte: 2^62 bytes of header
        words = ("truncated",)
    path.write_bytes(bytes(raw))
    refused(kind, path, *words)


@pytest.mark.parametrize("change,words", [
    (lambda h, n: h[n].update(shape=[10**12]), ("shape [1000000000000]", "needs", "offsets span")),
    (lambda h, n: h[n].update(shape=[10**6, 10**6], data_offsets=[0, 4 * 10**12]), ("outside",)),
    (lambda h, n: h[n].update(data_offsets=[2**63, 2**64]), ("outside",)),
    (lambda h, n: h[n].update(data_offsets=[-8, h[n]["data_offsets"][1] - 8]), ("outside",)),
    (lambda h, n: h[n].update(shape=[-1]), ("non-negative",)),
    (lambda h, n: h[n].update(shape=[2.5]), ("non-negative",)),
    (lambda h, n: h[n].update(shape="16"), ("non-negative",)),
    (lambda h, n: h[n].update(dtype="F128"), ("unknown dtype",)),
    (lambda h, n: h[n].update(data_offsets=[0, 0], shape=[0]), ("cover",)),
    (lambda h, n: h.update(__metadata__={"format": 3}), ("map of strings",)),
])
def test_header_declaring_absurd_shapes_offsets_or_dtypes(kind, tmp_path, change, words):
    path = write_kind(kind, tmp_path)
    header, _, data = split(path)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])  # the last tensor
    change(header, name)
    rewrite(path, header, data)
    tracemalloc.start()
    try:
        refused(kind, path, *words)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # nothing the size of what the header declares (a 1e12-element tensor: terabytes)


def test_overlapping_offsets(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    header, _, data = split(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    header[b] = dict(header[a])  # two tensors on the same bytes
    rewrite(path, header, data)
    refused(kind, path, "overlapping")


def test_a_header_declaring_a_huge_tensor_fails_before_allocating(tmp_path):
    """The header alone, with a data section of 4 bytes: the check reads 8 + header bytes and stops."""
    path = tmp_path / "huge.safetensors"
    rewrite(path, {"__metadata__": {"format": "vp2p-inversion/2"}, "trajectory": {"dtype": "F32", "shape": [10**6] * 2,
                                                                                   "data_offsets": [0, 4 * 10**12]}}, b"\0" * 4)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InversionFileError, match="huge.safetensors.*outside the file's 4 bytes"):
        load_inversion(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000 and time.perf_counter() - t0 < 1.0
    with pytest.raises(InversionFileError, match="huge.safetensors"):
        read_header(path, "inversion", InversionFileError)


def test_wrong_dtypes(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    name = {"inversion": "trajectory", "tuned": "to_q.attn1.input_4_0", "store": entry(ATTN1, KEY, "q")}[kind]
    resave(path, lambda t, m: t.update({name: (t[name] * 100).to(torch.int32)}))
    refused(kind, path, name, "int32")


def test_store_shard_in_another_precision(tmp_path):
    path = write_kind("store", tmp_path)
    resave(path, lambda t, m: t.update({k: v.float() for k, v in t.items()}))
    refused("store", path, "float32", "precision")


def test_non_finite_values(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    name = {"inversion": "null_embeddings", "tuned": "temporal.layers.input_4_0.to_out.weight", "store": entry(ATTN2, KEY, "p")}[kind]

    def poison(t, m):
        v = t[name].clone()
        v.view(-1)[1] = float("nan")
        t[name] = v

    resave(path, poison)
    refused(kind, path, name, "NaN or infinite")
    resave(path, lambda t, m: t[name].view(-1).__setitem__(1, float("inf")))
    refused(kind, path, "NaN or infinite")


@pytest.mark.parametrize("field,change,words", [
    ("trajectory", lambda t: t["trajectory"][:2], "3 latents"),  # replaced below: the trajectory/schedule step mismatch
    ("sigmas", lambda t: t["sigmas"][:-1], "sigmas"),
    ("null_embeddings", lambda t: t["null_embeddings"][:1], "'null_embeddings' has 1 steps"),
    ("null_embeddings", lambda t: torch.zeros(STEPS, 3, 5, 8), "3 rows"),
    ("null_embeddings", lambda t: torch.zeros(STEPS, 1, 5, 9), "token width 8"),
    ("cond", lambda t: t["cond"][0], "3 dimensions"),
    ("source_path", lambda t: t["source_path"][:, :1], "'source_path' has shape"),
    ("iterations", lambda t: torch.tensor([1, 2, 3], dtype=torch.int32), "3 entries for 2 steps"),
])
def test_inversion_fields_that_do_not_fit_together(tmp_path, field, change, words):
    path = write_kind("inversion", tmp_path)
    resave(path, lambda t, m: t.update({field: change(t).contiguous()}))
    if field == "trajectory":
        words = "trajectory holds 2 latents, but its 2-step schedule needs 3"
    refused("inversion", path, words)


@pytest.mark.parametrize("key", ["mode", "cfg", "model_fingerprint", "latent_shape", "format"])
def test_inversion_metadata_missing_a_key(tmp_path, key):
    path = write_kind("inversion", tmp_path)
    resave(path, lambda t, m: m.pop(key))
    refused("inversion", path, "format" if key == "format" else key)


@pytest.mark.parametrize("key,value,words", [("mode", "sideways", "mode"), ("cfg", "lots", "cfg"), ("cfg", "inf", "cfg"),
                                             ("latent_shape", "[2, 4, 4", "parse"), ("latent_shape", "[2, 4, 4, 5]", "latent shape"),
                                             ("frames", "3", "frames"), ("generated", "yes", "generated"),
                                             ("attention_spec", '{"steps": 1e12}', "attention store"),
                                             ("attention_spec", "[]", "attention store")])
def test_inversion_metadata_that_does_not_parse(tmp_path, key, value, words):
    path = write_kind("inversion", tmp_path)
    resave(path, lambda t, m: m.update({key: value}))
    refused("inversion", path, words)


def test_extra_tensors_are_refused_extra_metadata_is_ignored(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    resave(path, lambda t, m: m.update(note="made on a Tuesday"))
    assert load_kind(kind, path)  # string metadata the pack does not read cannot change what it loads
    extra = {"inversion": "payload", "tuned": "lora.up", "store": "payload"}[kind]
    resave(path, lambda t, m: t.update({extra: torch.zeros(4)}))
    refused(kind, path, extra)


@pytest.mark.parametrize("key,value,words", [(None, None, "frame_attention"), ("temporal_attention", "maybe", "parse"),
                                             ("temporal_attention", "3", "true or false"), ("frame_attention", "all", "parse"),
                                             ("frame_attention_min_channels", "x", "parse")])
def test_tuned_metadata_missing_or_unparsable(tmp_path, key, value, words):
    path = write_kind("tuned", tmp_path)
    resave(path, lambda t, m: m.pop("frame_attention") if key is None else m.update({key: value}))
    refused("tuned", path, words)


def test_tuned_delta_of_the_wrong_rank_or_name(tmp_path):
    path = write_kind("tuned", tmp_path)
    resave(path, lambda t, m: t.update({"to_q.attn1.input_4_0": torch.zeros(8)}))
    refused("tuned", path, "[out, in]")
    path = write_kind("tuned", tmp_path / "b")
    resave(path, lambda t, m: t.update({"to_q.attn3.input_4_0": torch.zeros(8, 8)}))
    refused("tuned", path, "to_q.attn3.input_4_0")
    path = write_kind("tuned", tmp_path / "c")
    resave(path, lambda t, m: t.update({"to_q.attn1.input_x_0": torch.zeros(8, 8)}))
    refused("tuned", path, "to_q.attn1.input_x_0")


@pytest.mark.parametrize("spec,words", [
    ("{not json", "unreadable"), ("[]", "format"), ('{"format": "vp2p-attention-store/1"}', "JSON NoneType"),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 1000000000000, "stored_steps": 1000000000000}}', "steps="),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 2, "stored_steps": "1", "max_tokens": 16, "frames": 2}}', "stored_steps="),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 2, "stored_steps": 1, "max_tokens": 16, "frames": 2, '
     '"frame_mode": "first_frame", "cond_digest": "x", "extra": 1}}', "unexpected keyword"),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 2, "stored_steps": 1, "max_tokens": 16, "frames": 2, '
     '"frame_mode": "sideways", "cond_digest": "x"}}', "frame_attention"),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 2, "stored_steps": 1, "max_tokens": 16, "frames": 2, '
     '"frame_mode": "first_frame", "cond_digest": "x", "precision": "fp8"}}', "precision"),
    ('{"format": "vp2p-attention-store/1", "spec": {"steps": 2, "stored_steps": 1, "max_tokens": 16, "frames": 2, '
     '"frame_mode": "first_frame", "cond_digest": "x"}, "nbytes": "lots"}', "nbytes"),
])
def test_store_description_damaged(tmp_path, spec, words):
    shard = write_kind("store", tmp_path)
    (shard.parent / "spec.json").write_text(spec)
    with pytest.raises(AttentionStoreError) as info:
        AttentionStore.open(shard.parent, in_memory=False)
    assert "attention_x" in str(info.value) and words.lower() in str(info.value).lower(), str(info.value)


def test_store_description_too_large_or_missing_a_shard(tmp_path):
    shard = write_kind("store", tmp_path)
    spec = shard.parent / "spec.json"
    good = spec.read_text()
    spec.write_text(" " * 2_000_000 + good)
    with pytest.raises(AttentionStoreError, match="attention_x/spec.json holds 2000"):
        AttentionStore.open(shard.parent, in_memory=False)
    spec.write_text(good)
    shard.unlink()
    with pytest.raises(AttentionStoreError, match="attention_x lacks step_0000.safetensors, the shard of step 0"):
        AttentionStore.open(shard.parent, in_memory=False)


def test_store_read_step_by_step_checks_the_shard_too(tmp_path):
    shard = write_kind("store", tmp_path)
    store = AttentionStore.open(shard.parent, in_memory=False)  # disk mode: shards are read when an edit asks
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(AttentionStoreError, match="attention_x/step_0000.safetensors is unreadable: .*truncated"):
        store.step(0)


def test_a_file_made_for_another_model_or_video_size(tmp_path):
    inv = load_inversion(write_kind("inversion", tmp_path))
    with pytest.raises(InversionFileError, match="inv.safetensors was made with a different model"):
        check_fits(inv, "0" * 40, inv.latent_shape, "inv.safetensors")
    with pytest.raises(InversionFileError, match=r"inv.safetensors holds a video of latent shape \[2, 4, 4, 4\]"):
        check_fits(inv, inv.model_fingerprint, (3, 4, 4, 4), "inv.safetensors")
    tuned = load_tuned(write_kind("tuned", tmp_path))
    with pytest.raises(TunedFileError, match="tuned.safetensors was tuned with"):
        check_compatible(tuned, T2SSettings(FrameMode.SPARSE_CAUSAL), None, {KEY}, "tuned.safetensors")
    with pytest.raises(TunedFileError, match="tuned.safetensors holds 1 transformer blocks; this MODEL has 2"):
        check_compatible(tuned, T2SSettings(), None, {KEY, LayerKey("output", 3, 0)}, "tuned.safetensors")
    with pytest.raises(TunedFileError, match="tuned.safetensors was tuned on a different base model"):
        check_compatible(tuned, T2SSettings(), "c" * 40, {KEY}, "tuned.safetensors")
    shard = write_kind("store", tmp_path)
    with pytest.raises(AttentionStoreError, match="attention_x: The attention store was recorded with another source prompt"):
        check_store_matches(AttentionStore.open(shard.parent, in_memory=True), torch.zeros(1, 5, 8))


def test_a_store_for_another_frame_count_inside_an_inversion(tmp_path):
    path = write_kind("inversion", tmp_path)

    def other_frames(t, m):
        spec = json.loads(m["attention_spec"])
        m["attention_spec"] = json.dumps(spec | {"frames": 3})

    resave(path, other_frames)
    refused("inversion", path, "3 frames")


def test_a_symlink_out_of_the_folder(kind, tmp_path):
    outside = write_kind(kind, tmp_path / "elsewhere")
    folder = tmp_path / "folder"
    folder.mkdir()
    if kind == "store":  # a shard of the store linked to another store's
        inside = write_kind("store", folder)
        inside.unlink()
        inside.symlink_to(outside)
        refused(kind, inside, "outside")
        inside.unlink()
        (inside.parent / "spec.json").unlink()
        (inside.parent / "spec.json").symlink_to(outside.parent / "spec.json")
        with pytest.raises(AttentionStoreError, match="spec.json is a link to .*outside"):
            AttentionStore.open(inside.parent, in_memory=True)
        return
    link = folder / ("linked_" + outside.name)
    link.symlink_to(outside)
    load = {"inversion": load_inversion, "tuned": load_tuned}[kind]
    assert load(link)  # without a folder to stay in (scripts), a link is followed
    with pytest.raises(ERRORS[kind], match=f"{link.name} is a link to .*outside the .* folder"):
        load(link, folder)
    inner = folder / "inner.safetensors"
    inner.write_bytes(outside.read_bytes())
    (folder / "alias.safetensors").symlink_to(inner)  # a link that stays inside is fine
    assert load(folder / "alias.safetensors", folder)


def test_not_a_regular_file(kind, tmp_path):
    path = write_kind(kind, tmp_path)
    path.unlink()
    os.mkfifo(path)  # opening a FIFO would block: it must be refused without opening it
    refused(kind, path, "no ")


# -- fuzz -----------------------------------------------------------------------------------------------------------------

def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random damage: byte flips (anywhere, in the header, in the length), a truncation, a header rewrite
    (a field of one tensor set to a hostile value), or a spliced/duplicated chunk."""
    data = bytearray(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    choice = rng.randrange(6)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        for _ in range(rng.randint(1, 4)):
            data[8 + rng.randrange(n)] = rng.randrange(256)
    elif choice == 2:
        data[rng.randrange(8)] = rng.randrange(256)
    elif choice == 3:
        data = data[:rng.randrange(len(data))]
    elif choice == 4:
        header = json.loads(raw[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"] + ["__metadata__"])
        hostile = rng.choice([[10**12], [-1], [2**64], "x", None, [0], [2**31, 2**31], [1.5], {}, [[1]]])
        if name == "__metadata__":
            meta = header["__metadata__"]
            meta[rng.choice(list(meta))] = rng.choice(["", "nan", "1e400", "[", "{}", "x" * 1000, "-1", "[-1]"])
        else:
            header[name][rng.choice(["shape", "data_offsets", "dtype"])] = hostile
        text = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    else:
        a, b = sorted(rng.randrange(len(data)) for _ in range(2))
        data = data[:a] + data[b:] + data[a:b]
    return bytes(data)


FUZZ_RUNS = 400


def test_fuzz_random_mutations_end_in_a_good_load_or_a_vp2p_error(tmp_path):
    rng = random.Random(26)
    outcomes: dict[str, dict[str, int]] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        for kind in KINDS:
            path = write_kind(kind, tmp_path / kind)
            original = path.read_bytes()
            good = load_kind(kind, path)
            counts = outcomes.setdefault(kind, {"loaded": 0, "refused": 0, "same": 0})
            for _ in range(FUZZ_RUNS):
                mutated = mutate(original, rng)
                path.write_bytes(mutated)
                try:
                    loaded = load_kind(kind, path)
                except VP2PError as e:
                    assert path.name in str(e) or path.parent.name in str(e), str(e)
                    counts["refused"] += 1
                    continue
                # anything else (MemoryError, KeyError, RuntimeError, a safetensors panic) fails the test here
                counts["loaded"] += 1
                counts["same"] += _same(kind, loaded, good)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"fuzz: {outcomes}, {elapsed:.1f} s, traced peak {peak / 1e6:.1f} MB, max RSS growth {rss_growth_mb:.0f} MB")
    for kind, counts in outcomes.items():
        assert counts["refused"] > FUZZ_RUNS // 2, (kind, counts)  # the mutations do damage
    assert elapsed < 60
    assert peak < 20_000_000  # Python-side allocations (headers, metadata) stay small
    assert rss_growth_mb < 300


def _same(kind: str, loaded: object, good: object) -> bool:
    """Whether a mutated file that loaded holds the original tensors (a mutation of metadata text may load)."""
    if kind == "inversion":
        return torch.equal(loaded.trajectory, good.trajectory) and torch.equal(loaded.cond, good.cond)
    if kind == "tuned":
        return all(torch.equal(loaded.deltas[k], v) for k, v in good.deltas.items() if k in loaded.deltas)
    return set(loaded) == set(good)
