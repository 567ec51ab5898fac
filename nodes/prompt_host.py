"""Prompts as ComfyUI reads them: its emphasis syntax, its embeddings and its tokenizers.

* ``parse_weights`` is ComfyUI's own parse of a prompt's text (``comfy.sd1_clip``): the
  ``(word:1.2)`` / ``(word)`` emphasis segments with their weights, escaped ``\\(`` ``\\)``, and
  ``embedding:name`` chunks. The pack's words are the whitespace-split words of those segments
  (``vp2p.prompt_align.prompt_words``), so ``(cat:1.2)`` is the word ``cat`` at weight 1.2. It
  needs no CLIP: the nodes' ``validate_inputs`` use it to refuse bad graphs before they run.
* ``tokenized_prompt`` tokenises through the CLIP's own tokenizer
  (``tokenize_with_weights(text, return_word_ids=True)``) and gives each word its span in
  ComfyUI's token sequence and the weights ComfyUI gives those tokens, so the embedding is
  exactly CLIP Text Encode's (``encode_prompt``) and the alignment is on the plain words.
* ``view_tokenizer`` picks the ComfyUI tokenizer of the CLIP a controller is connected to, for
  the token view (a checkpoint's or text encoder's safetensors header, or the loader's type).

The tokenizer key (``"l"`` for SD1.x, ``"h"`` for SD2.x; SDXL has ``"l"`` and ``"g"``, whose
word tokens are the same BPE ids) is the first of ``KEYS`` the tokenizer has unless given.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any, Callable, Iterable, Optional

from ..vp2p import SettingsError
from ..vp2p.prompt_align import Segment, TokenizedPrompt, check_length, from_words, prompt_words

log = logging.getLogger("VideoP2P")

EMBEDDING = "embedding:"  # ComfyUI's embedding identifier in prompts
KEYS = ("l", "h", "g")  # the CLIP tokenizer keys tried in order: SD1.x/SDXL CLIP-L, SD2.x OpenCLIP-H, CLIP-G
_EMBEDDING_ID_BASE = 1_000  # stand-in ids of embedding vectors are ≤ −1000 (no vocabulary id, not the alignment's −101/−102)


def parse_weights(text: str) -> list[Segment]:
    """ComfyUI's segments of ``text``: (plain text, emphasis weight), in order. An
    ``embedding:name`` chunk (after a space or newline, or at a segment's start, as ComfyUI
    finds them) starts a segment of its own, so an embedding is always a segment's first word."""
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    out: list[Segment] = []
    for segment, weight in token_weights(escape_important(text), 1.0):
        for chunk in re.split(r"[ \n](?=" + re.escape(EMBEDDING) + ")", unescape_important(segment)):
            out.append((chunk, float(weight)))
    return out


def embedding_words(text: str) -> set[int]:
    """Indices (into ``prompt_words(text, parse_weights)``) of the words that name an embedding."""
    out, i = set(), 0
    for segment, _ in parse_weights(text):
        words = segment.split()
        if words and segment.startswith(EMBEDDING):
            out.add(i)
        i += len(words)
    return out


def _embedding_id(name: str, k: int) -> int:
    """A stand-in token id for vector ``k`` of embedding ``name``: the same in both prompts of an edit
    (so the alignment pairs it), never a vocabulary id."""
    return -(_EMBEDDING_ID_BASE + zlib.crc32(f"{name}/{k}".encode()) % 1_000_000_000)


def pick_key(tokenizer: Any, key: Optional[str] = None) -> tuple[str, Any]:
    """(key, ComfyUI ``SDTokenizer``) of a CLIP tokenizer: ``key``, else the first of ``KEYS`` it has."""
    for k in ([key] if key else KEYS):
        inner = getattr(tokenizer, f"clip_{k}", None)
        if inner is not None and hasattr(inner, "tokenizer") and hasattr(inner, "max_length"):
            return k, inner
    raise SettingsError(
        f"The controllers need an SD1.x/SD2.x/SDXL CLIP (CLIP-L, OpenCLIP-H, or SDXL's CLIP-L + CLIP-G); this CLIP's tokenizer is "
        f"{type(tokenizer).__name__}{f' without the key {key!r}' if key else ''}. Connect the CLIP of the checkpoint the video is "
        "edited with."
    )


def word_encoder(inner: Any) -> Callable[[str], list[int]]:
    """A word's BPE ids as the ComfyUI ``SDTokenizer`` ``inner`` tokenises a chunk (no start/end tokens)."""
    end = -1 if getattr(inner, "tokenizer_adds_end_token", True) else None
    start = int(getattr(inner, "tokens_start", 1))
    return lambda word: [int(t) for t in inner.tokenizer(word)["input_ids"][start:end]]


def tokenized_prompt(clip_or_tokenizer: Any, text: str, key: Optional[str] = None) -> TokenizedPrompt:
    """``text`` through ComfyUI's tokenizer of a CLIP (or a bare ComfyUI tokenizer): its plain words,
    their token spans, ids (embedding vectors get negative stand-ins) and ComfyUI's weights.

    Refuses a prompt longer than the context, an embedding that is not found (ComfyUI would drop
    it silently), and — a safety net — a prompt ComfyUI tokenises otherwise than word by word."""
    if hasattr(clip_or_tokenizer, "encode_from_tokens"):  # a CLIP: its tokenizer options apply
        tokenizer = clip_or_tokenizer.tokenizer
        key, inner = pick_key(tokenizer, key)
        batches = clip_or_tokenizer.tokenize(text, return_word_ids=True)[key]
    else:
        tokenizer = clip_or_tokenizer
        key, inner = pick_key(tokenizer, key)
        batches = tokenizer.tokenize_with_weights(text, return_word_ids=True)[key]
    body = [entry for batch in batches for entry in batch if entry[2] != 0]  # word tokens (start/end/padding have word id 0)
    context = int(inner.max_length)
    check_length(text, len(body), context)
    encode = word_encoder(inner)
    # without an embeddings folder ComfyUI reads 'embedding:name' as plain text
    embeddings = embedding_words(text) if getattr(inner, "embedding_directory", None) is not None else set()
    words: list[tuple[str, list[int], list[float]]] = []
    pos = 0
    for i, (word, _) in enumerate(prompt_words(text, parse_weights)):
        if i in embeddings:
            name = word[len(EMBEDDING):]
            n = 0
            while pos + n < len(body) and not isinstance(body[pos + n][0], int):
                n += 1
            if n == 0:
                raise SettingsError(
                    f"The prompt {text!r} names the embedding {word!r}, which is not in ComfyUI's embeddings folder (CLIP Text "
                    "Encode would skip it silently). Put the embedding file there, or remove the word."
                )
            ids = [_embedding_id(name, k) for k in range(n)]
            tail = name[len(name.rstrip(",")):]  # ComfyUI retries 'name,' as 'name' and then reads the comma as text
            tail_ids = encode(tail) if tail else []
            if tail_ids and [e[0] for e in body[pos + n:pos + n + len(tail_ids)]] == tail_ids:
                ids += tail_ids
        else:
            ids = encode(word)
            if [e[0] if isinstance(e[0], int) else None for e in body[pos:pos + len(ids)]] != ids:
                raise _not_word_by_word(text, word)
        words.append((word, ids, [float(e[1]) for e in body[pos:pos + len(ids)]]))
        pos += len(ids)
    if pos != len(body):
        raise _not_word_by_word(text, "the end")
    return from_words(text, words, context)


def _not_word_by_word(text: str, where: str) -> SettingsError:
    return SettingsError(
        f"ComfyUI's tokenizer does not read the prompt {text!r} word by word (at {where!r}), so its words cannot be aligned. "
        "Use plain words, '(word:1.2)' emphasis and 'embedding:name'; other syntax is not supported by the controllers."
    )


def encode_prompt(clip: Any, text: str) -> Any:
    """[1, T, D] float32 CPU embedding of ``text``: exactly CLIP Text Encode's (emphasis weights and embeddings applied)."""
    return encode_prompt_pooled(clip, text)[0]


def encode_prompt_pooled(clip: Any, text: str) -> tuple[Any, Any]:
    """(embedding [1, T, D], pooled output [1, P] or None) of ``text`` as CLIP Text Encode makes them; SDXL-family
    models take the pooled output (CLIP-G's projected end token) into their ``y``."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu(), None if pooled is None else pooled.detach().float().cpu()


def validation_message(check: Callable[[], None]) -> "bool | str":
    """``True``, or the message of the ``SettingsError`` (or ``ValueError``) ``check`` raises: a ``validate_inputs`` answer."""
    try:
        check()
    except ValueError as e:
        return str(e)
    return True


# ---- the token view's tokenizer: the connected CLIP's kind ----

TOKENIZER_KINDS: dict[str, tuple[str, str, str]] = {  # kind -> (module, class, label)
    "sd1": ("comfy.sd1_clip", "SD1Tokenizer", "SD1.x CLIP-L"),
    "sd2": ("comfy.text_encoders.sd2_clip", "SD2Tokenizer", "SD2.x OpenCLIP-H"),
    "sdxl": ("comfy.sdxl_clip", "SDXLTokenizer", "SDXL CLIP-L + CLIP-G"),
}
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader", "unCLIPCheckpointLoader", "ImageOnlyCheckpointLoader",
                      "CheckpointLoaderSimpleShared")


def kind_from_keys(keys: Iterable[str]) -> Optional[str]:
    """sd1 / sd2 / sdxl from the tensor names of a checkpoint or text-encoder file (None: not a CLIP we know).

    SDXL checkpoints hold two embedders (``conditioner.embedders.1`` is OpenCLIP-G); SD2.x's OpenCLIP-H has 24
    layers (a layer 22 exists; CLIP-G has 32, CLIP-L 12); SD1.x's CLIP-L sits under ``cond_stage_model.transformer``."""
    layers = 0
    sdxl = sd1 = False
    for k in keys:
        if k.startswith("conditioner.embedders.1."):
            sdxl = True
        m = re.search(r"(?:text_model\.encoder\.layers|transformer\.resblocks)\.(\d+)\.", k)
        if m:
            layers = max(layers, int(m.group(1)) + 1)
        if k.startswith("cond_stage_model.transformer.") or k.startswith("text_model."):
            sd1 = True
    if sdxl:
        return "sdxl"
    if layers >= 31:
        return "sdxl"  # a CLIP-G alone (its words tokenise as SDXL's)
    if layers >= 23:
        return "sd2"
    if layers > 0 or sd1:
        return "sd1"
    return None


def unsafe_name(name: str) -> Optional[str]:
    """Why a model file name sent by a client cannot be looked up (None: it can): an absolute path, a ``..``
    component, a NUL byte or a name longer than any file name. Names resolve only through ``folder_paths``."""
    clean = name.replace("\\", "/")
    if "\0" in name or len(name) > 1024:
        return "it is no file name"
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        return "it is an absolute path; give a name inside the models folder"
    if ".." in clean.split("/"):
        return "it leaves the models folder ('..')"
    return None


def _file_kind(folder: str, name: str) -> tuple[Optional[str], str]:
    """(kind, note) of a model file in ComfyUI's ``folder`` (e.g. ``checkpoints``), from its safetensors header only
    (the header is checked first: ``vp2p.safetensors_io.read_header``); never a path outside the folder."""
    import folder_paths

    from ..vp2p.safetensors_io import read_header

    why = unsafe_name(name) if name else None
    if why:
        return None, f"{name[:200]!r} is not a known {folder} name: {why}"
    path = folder_paths.get_full_path(folder, name) if name else None
    if not path:
        return None, f"{name[:200]!r} is not in the {folder} folder"
    if not str(path).endswith((".safetensors", ".sft")):
        return None, f"{name!r} is not a safetensors file (its header cannot be read cheaply)"
    try:
        header, _ = read_header(path, "safetensors", SettingsError)
    except SettingsError as e:  # unreadable header: fall back with a note
        return None, f"{name!r} could not be read ({e})"
    kind = kind_from_keys(header)
    return kind, "" if kind else f"{name!r} holds no CLIP text encoder the pack knows"


def clip_source_kind(source: Optional[dict]) -> tuple[Optional[str], str]:
    """(kind, note) of the CLIP a controller is connected to, from what feeds its ``clip`` input:
    ``{"class_type": ..., "inputs": {widget: value}}`` as the frontend sends it (anything else: a note)."""
    if not isinstance(source, dict) or not source.get("class_type"):
        return None, "no CLIP loader found upstream"
    cls, inputs = str(source["class_type"])[:200], source.get("inputs")
    if not isinstance(inputs, dict):
        inputs = {}
    if "ckpt_name" in inputs or cls in CHECKPOINT_LOADERS:
        return _file_kind("checkpoints", str(inputs.get("ckpt_name") or ""))
    if cls == "CLIPLoader":
        kind = str(inputs.get("type") or "stable_diffusion")
        if kind != "stable_diffusion":
            return None, f"CLIPLoader type {kind[:200]!r} is no SD1.x/SD2.x CLIP"
        return _file_kind("text_encoders", str(inputs.get("clip_name") or ""))
    if cls == "DualCLIPLoader":
        kind = str(inputs.get("type") or "")
        return ("sdxl", "") if kind == "sdxl" else (None, f"DualCLIPLoader type {kind[:200]!r} is no SD1.x/SD2.x/SDXL CLIP")
    return None, f"{cls} is not a CLIP loader the view knows"


def comfy_tokenizer(kind: str, cache: dict[str, Any]) -> Any:
    """ComfyUI's tokenizer of a kind (``TOKENIZER_KINDS``), made once per kind into ``cache``."""
    if kind not in cache:
        import importlib

        import folder_paths

        module, name, _ = TOKENIZER_KINDS[kind]
        cls = getattr(importlib.import_module(module), name)
        cache[kind] = cls(embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return cache[kind]


def view_tokenizer(source: Optional[dict], cache: dict[str, Any]) -> tuple[Any, str, str]:
    """(tokenizer, label, note) for the token view: the connected CLIP's kind, else SD1.x with a note."""
    kind, note = clip_source_kind(source)
    if kind is None:
        kind, note = "sd1", f"tokenizer: {TOKENIZER_KINDS['sd1'][2]} assumed ({note})"
    else:
        note = ""
    return comfy_tokenizer(kind, cache), TOKENIZER_KINDS[kind][2], note
