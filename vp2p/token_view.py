"""What the frontend's live token view shows under the P2P and FateZero Controllers: how both
prompts tokenise (with their emphasis weights), how the target's words relate to the source's
(kept / swapped / added / changed), which are re-weighted or blended, and warnings for edits
that cannot run.

Pure Python over a ``tokenize`` (text -> ``TokenizedPrompt``) and a ``decode`` (id -> text);
the server route feeds it the connected CLIP's kind of ComfyUI tokenizer.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import VP2PError
from .prompt_align import EditKind, TokenizedPrompt, global_alignment, parse_word_values, resolve_kind, split_words, words_align

Decode = Callable[[int], str]
Tokenize = Callable[[str], TokenizedPrompt]


def _prompt_view(p: TokenizedPrompt, decode: Decode) -> list[dict[str, Any]]:
    out = []
    for i, (w, (a, b)) in enumerate(zip(p.words, p.spans)):
        view: dict[str, Any] = {"word": w, "tokens": [decode(t) for t in p.ids[a - 1:b - 1]], "positions": list(range(a, b))}
        if p.word_weight(i) != 1.0:
            view["weight"] = round(p.word_weight(i), 4)
        out.append(view)
    return out


def describe_edit(source: str, target: str, edit: str, reweight: str, blend_source: str, blend_target: str,
                  tokenize: Tokenize, decode: Decode, cross_replace_words: str = "") -> dict[str, Any]:
    """A JSON-able description of an edit; never raises for bad input (it reports it)."""
    warnings: list[str] = []
    out: dict[str, Any] = {"warnings": warnings}
    try:
        src = tokenize(source)
        tgt = tokenize(target)
    except VP2PError as e:
        warnings.append(str(e))
        return out
    context = src.context
    out["source"], out["target"] = _prompt_view(src, decode), _prompt_view(tgt, decode)
    out["token_count"] = {"source": len(src.ids), "target": len(tgt.ids), "limit": context - 2}
    try:
        kind = resolve_kind(EditKind.parse(edit), src, tgt)
    except VP2PError as e:
        warnings.append(str(e))
        kind = EditKind.REFINE
    out["kind"] = kind.value
    status: list[str] = []
    if kind is EditKind.REPLACE and words_align(src, tgt):
        status = ["kept" if a.lower() == b.lower() else "swapped" for a, b in zip(src.words, tgt.words)]
    else:
        pairs = global_alignment(src.ids, tgt.ids)
        for a, b in tgt.spans:
            matched = [pairs[j - 1] is not None for j in range(a, b)]
            status.append("kept" if all(matched) else "added" if not any(matched) else "changed")
    for view, s in zip(out["target"], status):
        view["status"] = s
    try:
        factors = parse_word_values(reweight, "reweight", 0.0, 10.0)
    except VP2PError as e:
        warnings.append(str(e))
        factors = {}
    for word, f in factors.items():
        hits = _views_of(tgt, out["target"], word)
        if not hits:
            warnings.append(f"reweight: {word!r} is not a word of the target prompt.")
        for v in hits:
            v["reweight"] = f
    try:
        for word in parse_word_values(cross_replace_words, "cross_replace_words", 0.0, 1.0):
            if not _views_of(tgt, out["target"], word):
                warnings.append(f"cross_replace_words: {word!r} is not a word of the target prompt.")
    except VP2PError as e:
        warnings.append(str(e))
    for text, prompt, views, which in ((blend_source, src, out["source"], "source"), (blend_target, tgt, out["target"], "target")):
        for word in split_words(text):
            hits = _views_of(prompt, views, word)
            if not hits:
                warnings.append(f"blend: {word!r} is not a word of the {which} prompt.")
            for v in hits:
                v["blend"] = True
    return out


def _views_of(prompt: TokenizedPrompt, views: list[dict[str, Any]], word: str) -> list[dict[str, Any]]:
    """The views of the prompt's words that ``word`` names (the same matching as the edit uses)."""
    hit = set(prompt.positions(word))
    return [v for v in views if hit & set(v["positions"])]
