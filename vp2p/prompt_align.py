"""Word ↔ token alignment of two prompts (prompt-to-prompt's edit kinds).

A prompt is tokenised word by word with the model's own CLIP tokenizer (CLIP's BPE splits
on whitespace first, so the concatenation of the words' tokens is the prompt's tokens; the
host checks that). Positions count the start token: the first word's first token is at 1.
A host with an emphasis syntax (ComfyUI's ``(word:1.2)``) passes its parse (``ParseWeights``):
the words are then the plain words inside it, each with its weight, and a word list such as
``reweight`` or the blend words names the plain words (``(cat:1.2)`` is the word ``cat``).

* ``replace`` (word swap): both prompts have the same number of words; a swapped word's
  tokens take the source word's attention, a one-to-many token swap spreads it evenly.
  Expressed as a matrix ``M [T, T]``: target maps = source maps @ M.
* ``refine``: prompt-to-prompt's global alignment (Needleman–Wunsch, its tie order and its
  treatment of the start/end tokens and padding, so the mapper equals the official code's);
  an aligned target token takes its source token's attention, a new token keeps the
  target's own (``alphas`` 0).
* ``reweight``: a per-token factor on the target's cross-attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Sequence

import torch

from .errors import SettingsError, parse_option

# word -> its BPE token ids (no start/end tokens)
Encode = Callable[[str], list[int]]
# a prompt's text -> its segments (plain text, emphasis weight) in order, e.g. ComfyUI's
# "a (cat:1.2) runs" -> [("a ", 1.0), ("cat", 1.2), (" runs", 1.0)]
Segment = tuple[str, float]
ParseWeights = Callable[[str], Sequence[Segment]]


def unweighted(text: str) -> list[Segment]:
    """The parse of a host without emphasis syntax (diffusers): the whole text at weight 1."""
    return [(text, 1.0)]


def prompt_words(text: str, parse: ParseWeights = unweighted) -> list[tuple[str, float]]:
    """The prompt's plain words with their emphasis weights: each segment split on whitespace
    (a segment boundary also ends a word: ``big(cat:1.2)`` is ``big`` and ``cat``)."""
    return [(w, float(weight)) for seg, weight in parse(text) for w in seg.split()]


class EditKind(str, Enum):
    AUTO = "auto"
    REPLACE = "replace"
    REFINE = "refine"

    @classmethod
    def parse(cls, value: "str | EditKind") -> "EditKind":
        return parse_option(cls, value, "edit", "an edit kind")


@dataclass(frozen=True)
class TokenizedPrompt:
    """``words`` (plain, without emphasis syntax) and each word's token positions
    ``spans[i] = (start, end)`` (end exclusive); ``ids`` are the prompt's token ids without
    start/end tokens (a host may stand in negative ids for tokens that are no vocabulary entry,
    e.g. a textual-inversion embedding's vectors); ``context`` is the tokenizer's sequence
    length (77 for CLIP); ``weights`` the emphasis weight of each token (``len(ids)`` floats;
    empty: all 1)."""

    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    ids: tuple[int, ...]
    context: int
    weights: tuple[float, ...] = ()

    def word_weight(self, i: int) -> float:
        """The emphasis weight of word ``i`` (its first token's; 1 for a word without tokens)."""
        a, b = self.spans[i]
        return self.weights[a - 1] if self.weights and b > a else 1.0

    @property
    def end(self) -> int:
        """Position of the end token."""
        return 1 + len(self.ids)

    def positions(self, word: str) -> list[int]:
        """Token positions of every occurrence of ``word`` (case-insensitive, punctuation ignored)."""
        want = _norm(word)
        return [p for w, (a, b) in zip(self.words, self.spans) if _norm(w) == want for p in range(a, b)]


def _norm(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def split_words(text: str) -> list[str]:
    """A user's word list: separated by commas and/or spaces."""
    return text.replace(",", " ").split()


def check_length(text: str, tokens: int, context: int) -> None:
    """Refuse a prompt of more ``tokens`` than fit in ``context`` with its start and end tokens."""
    if tokens + 2 > context:
        raise SettingsError(
            f"The prompt {text[:60]!r}… has {tokens} tokens; the text encoder takes {context - 2} (plus start and end). "
            "Shorten it: prompt-to-prompt aligns one sequence of tokens."
        )


def from_words(text: str, words: Sequence[tuple[str, Sequence[int], Sequence[float]]], context: int) -> TokenizedPrompt:
    """A ``TokenizedPrompt`` from its words in order, each ``(word, token ids, token weights)``;
    refuses prompts beyond ``context``."""
    spans, ids, weights, pos = [], [], [], 1
    for _, tok, wts in words:
        if len(tok) != len(wts):
            raise ValueError(f"{len(tok)} tokens but {len(wts)} weights")
        spans.append((pos, pos + len(tok)))
        ids += [int(t) for t in tok]
        weights += [float(w) for w in wts]
        pos += len(tok)
    check_length(text, len(ids), context)
    plain = all(w == 1.0 for w in weights)
    return TokenizedPrompt(text, tuple(w for w, _, _ in words), tuple(spans), tuple(ids), context, () if plain else tuple(weights))


def tokenize_prompt(text: str, encode: Encode, context: int, parse: ParseWeights = unweighted) -> TokenizedPrompt:
    """Split ``text`` into its plain words (``parse``: the host's emphasis syntax) and their
    token positions; refuse prompts beyond ``context``."""
    words = []
    for w, weight in prompt_words(text, parse):
        tok = list(encode(w))
        words.append((w, tok, [weight] * len(tok)))
    return from_words(text, words, context)


def words_align(source: TokenizedPrompt, target: TokenizedPrompt) -> bool:
    """Whether a word swap applies: the same number of words."""
    return len(source.words) == len(target.words)


def resolve_kind(kind: EditKind, source: TokenizedPrompt, target: TokenizedPrompt) -> EditKind:
    if kind is EditKind.AUTO:
        return EditKind.REPLACE if words_align(source, target) else EditKind.REFINE
    if kind is EditKind.REPLACE and not words_align(source, target):
        raise _replace_mismatch(source.words, target.words, source.text, target.text)
    return kind


def _replace_mismatch(source: Sequence[str], target: Sequence[str], source_text: str, target_text: str) -> SettingsError:
    return SettingsError(
        f"edit=replace swaps words one for one, but the source has {len(source)} words and the target "
        f"{len(target)} ({source_text!r} → {target_text!r}). Use edit=refine (or auto) for added or removed words."
    )


def replace_mapper(source: TokenizedPrompt, target: TokenizedPrompt) -> torch.Tensor:
    """M [T, T] with target maps = source maps @ M (word swap)."""
    resolve_kind(EditKind.REPLACE, source, target)
    t = source.context
    m = torch.zeros(t, t)
    m[0, 0] = 1.0
    for (sa, sb), (ta, tb) in zip(source.spans, target.spans):
        if sb - sa == tb - ta:
            idx = torch.arange(sb - sa)
            m[sa + idx, ta + idx] = 1.0
        elif tb > ta:  # one-to-many (or many-to-one): the source word's attention spread evenly
            m[sa:sb, ta:tb] = 1.0 / (tb - ta)
    _pair_tails(m, source.end, target.end, t)
    return m


def _pair_tails(m: torch.Tensor, s: int, t: int, context: int) -> None:
    """End token and padding: aligned position by position from each prompt's end."""
    while s < context and t < context:
        m[s, t] = 1.0
        s, t = s + 1, t + 1


UNALIGNED = -1  # mapper entry of a target token without a source token (its alpha is 0)
# Stand-ins for the start/end tokens in the alignment, which only compares ids for equality:
# each equals itself in both prompts and no vocabulary id.
_START, _END = -101, -102
# Needleman–Wunsch scores of prompt-to-prompt's refinement alignment.
MATCH, MISMATCH, GAP = 1, -1, 0


def refine_mapper(source: TokenizedPrompt, target: TokenizedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper [T] long, alphas [T]) of a refinement edit, as prompt-to-prompt computes them.

    The two prompts are aligned with their start and end tokens (``global_alignment``).
    ``mapper[j]`` is the source position target position ``j`` reads; a target token the
    alignment leaves unmatched has ``alphas[j] = 0`` (it keeps its own attention) and
    ``mapper[j] = UNALIGNED`` (−1: indexing then reads the last position, weighted by 0).
    Positions after the target's end token (padding) read the same position of the source,
    whatever the source holds there (a pad, its end token, or even a word when the source is
    longer); their alphas are 1.
    """
    context = source.context
    src = (_START, *source.ids, _END)
    tgt = (_START, *target.ids, _END)
    mapper = torch.arange(context, dtype=torch.long)
    alphas = torch.ones(context)
    for j, i in enumerate(global_alignment(src, tgt)):
        if i is None:
            mapper[j], alphas[j] = UNALIGNED, 0.0
        else:
            mapper[j] = i
    return mapper, alphas


def global_alignment(a: Sequence[int], b: Sequence[int], match: int = MATCH, mismatch: int = MISMATCH,
                     gap: int = GAP) -> list[Optional[int]]:
    """Needleman–Wunsch alignment of ``a`` (source) and ``b`` (target): for each element of
    ``b`` the index of the element of ``a`` it is paired with, or None.

    Score table S [len(a)+1, len(b)+1]: S[i][0] = i·gap, S[0][j] = j·gap, and
    S[i][j] = max(S[i][j−1] + gap, S[i−1][j] + gap, S[i−1][j−1] + (match if equal else mismatch)).
    The traceback starts at the bottom-right corner and, where several moves give the
    cell's score, takes the first of: skip ``b[j−1]`` (left), skip ``a[i−1]`` (up), pair them
    (diagonal). On the top row it can only go left, on the left column only up. This tie
    order is prompt-to-prompt's and decides which of repeated tokens are paired.
    A diagonal move pairs the two elements whatever they are; with the default scores
    (mismatch < 2·gap) it is only ever taken for equal elements, since "left" already scores
    at least S[i−1][j−1] + 2·gap, more than a mismatched pair would.
    """
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pair = score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch)
            score[i][j] = max(score[i][j - 1] + gap, score[i - 1][j] + gap, pair)
    out: list[Optional[int]] = [None] * m
    i, j = n, m
    while i > 0 or j > 0:
        if i == 0 or (j > 0 and score[i][j] == score[i][j - 1] + gap):
            j -= 1  # b[j-1] has no partner
        elif j == 0 or score[i][j] == score[i - 1][j] + gap:
            i -= 1  # a[i-1] has no partner
        else:
            i, j = i - 1, j - 1
            out[j] = i
    return out


def parse_word_values(text: str, option: str, low: float, high: float) -> dict[str, float]:
    """``"word:2.0, other:0.5"`` -> {"word": 2.0, "other": 0.5}; empty -> {}. The value follows the
    word's last colon (``embedding:style:1.5`` names the word ``embedding:style``)."""
    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        match = re.fullmatch(r"(\S+)\s*:\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", part)
        if match is None:
            raise SettingsError(f"{option}: {part!r} is not 'word:number'. Write pairs like 'cat:2.0, dog:0.5'.")
        value = float(match.group(2))
        if not low <= value <= high:
            raise SettingsError(f"{option}: {part!r} is out of range; use numbers between {low} and {high}.")
        out[match.group(1)] = value
    return out


def word_positions(prompt: TokenizedPrompt, words: Sequence[str], option: str, which: str) -> list[int]:
    """Token positions of ``words`` in ``prompt``; an absent word is an error naming the prompt's words."""
    out: list[int] = []
    for w in words:
        pos = prompt.positions(w)
        if not pos:
            raise SettingsError(f"{option}: {w!r} is not a word of the {which} prompt {prompt.text!r} "
                                f"(its words: {', '.join(prompt.words)}).")
        out += pos
    return out


def check_words_present(words: Sequence[str], names: Sequence[str], option: str, which: str, text: str) -> None:
    """``names`` (a user's word list) must be words of a prompt whose plain words are ``words``;
    the same matching as ``TokenizedPrompt.positions`` (case and punctuation ignored)."""
    have = {_norm(w) for w in words}
    for name in names:
        if _norm(name) not in have:
            raise SettingsError(f"{option}: {name!r} is not a word of the {which} prompt {text!r} (its words: {', '.join(words)}).")


def check_edit_words(source: Optional[str], target: Optional[str], edit: Optional[str], parse: ParseWeights = unweighted, *,
                     reweight: Optional[str] = None, cross_replace_words: Optional[str] = None,
                     source_lists: Optional[dict[str, Optional[str]]] = None,
                     target_lists: Optional[dict[str, Optional[str]]] = None) -> None:
    """The checks of an edit that need no tokenizer, for a node's ``validate_inputs``: the edit kind,
    ``word:value`` lists (syntax and range), every listed word present in its prompt (plain words:
    ``parse`` is the host's emphasis syntax), and ``replace`` with as many target words as source
    words. ``source_lists`` / ``target_lists`` map an input's name to its word list. A value that is
    None is unknown (e.g. a linked input): the checks that need it are skipped. Raises
    ``SettingsError`` with the first problem."""
    kind = EditKind.parse(edit) if edit is not None else None
    src = [w for w, _ in prompt_words(source, parse)] if source is not None else None
    tgt = [w for w, _ in prompt_words(target, parse)] if target is not None else None
    for words, which in ((src, "source"), (tgt, "target")):
        if words is not None and not words:
            raise SettingsError(f"The {which} prompt is empty; both prompts need at least one word: the source describes the "
                                "video, the target the edit.")
    if kind is EditKind.REPLACE and src is not None and tgt is not None and len(src) != len(tgt):
        raise _replace_mismatch(src, tgt, str(source), str(target))
    targets: dict[str, list[str]] = {}
    if reweight is not None:
        targets["reweight"] = list(parse_word_values(reweight, "reweight", 0.0, 10.0))
    if cross_replace_words is not None:
        targets["cross_replace_words"] = list(parse_word_values(cross_replace_words, "cross_replace_words", 0.0, 1.0))
    for option, text in (target_lists or {}).items():
        if text is not None:
            targets[option] = split_words(text)
    for option, names in targets.items():
        if tgt is not None:
            check_words_present(tgt, names, option, "target", str(target))
    for option, text in (source_lists or {}).items():
        if text is not None and src is not None:
            check_words_present(src, split_words(text), option, "source", str(source))


def reweight_vector(target: TokenizedPrompt, factors: dict[str, float]) -> torch.Tensor:
    """[T] factors on the target's cross-attention (1 elsewhere)."""
    eq = torch.ones(target.context)
    for word, f in factors.items():
        eq[word_positions(target, [word], "reweight", "target")] = f
    return eq


def hf_encoder(tokenizer: object) -> Encode:
    """``Encode`` for a Hugging Face CLIP tokenizer (no start/end tokens)."""
    return lambda word: list(tokenizer(word, add_special_tokens=False).input_ids)  # type: ignore[operator]
