"""The CLIP BPE vocabulary for hosts that bring no tokenizer (the headless diffusers runs
and the tests). Inside ComfyUI the connected CLIP's own tokenizer is always used.

Neither transformers nor diffusers ships the vocabulary. Two sources carry it:
ComfyUI's ``comfy/sd1_tokenizer/`` (``vocab.json`` + ``merges.txt``) and the
open_clip_torch wheel's ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (install it with
``--no-deps``; the file is read without importing the package). From the latter the
vocabulary is rebuilt: 256 byte symbols, the same with ``</w>``, one entry per merge
(the first 48 894 merge lines), then the two special tokens — 49 408 entries.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import SettingsError

N_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77  # CLIP ViT-L/14 text context of SD1.x
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The printable stand-in of every byte, in the order CLIP's vocabulary lists them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in keep] + [symbols[b] for b in range(256) if b not in keep]


def find_vocab_source() -> Optional[Path]:
    """A file or folder holding the vocabulary, or ``None``."""
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy and (Path(comfy) / "comfy" / "sd1_tokenizer" / "vocab.json").is_file():
        return Path(comfy) / "comfy" / "sd1_tokenizer"
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            gz = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if gz.is_file():
                return gz
    return None


def write_vocab_files(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Rebuild ``vocab.json`` and ``merges.txt`` from the open_clip BPE file."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(source: Optional[Path] = None) -> Any:
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary."""
    from transformers import CLIPTokenizer

    source = source or find_vocab_source()
    if source is None:
        raise SettingsError(
            "No CLIP vocabulary found. Install it with `pip install --no-deps open_clip_torch` (the tokenizer file only), "
            "or set COMFYUI_PATH to a ComfyUI checkout (comfy/sd1_tokenizer)."
        )
    if source.is_dir():
        return CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), model_max_length=CONTEXT_LENGTH)
    folder = Path(tempfile.mkdtemp(prefix="vp2p_clip_vocab_"))
    vocab_file, merges_file = write_vocab_files(source, folder)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CONTEXT_LENGTH)
