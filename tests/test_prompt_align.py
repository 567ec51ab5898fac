"""Word/token alignment of prompt pairs against hand-written references (real CLIP BPE)."""

from __future__ import annotations

import re

import pytest
import torch

from vp2p.clip_vocab import clip_tokenizer, find_vocab_source
from vp2p.prompt_align import (
    EditKind,
    check_edit_words,
    hf_encoder,
    parse_word_values,
    prompt_words,
    refine_mapper,
    replace_mapper,
    resolve_kind,
    reweight_vector,
    tokenize_prompt,
    word_positions,
)

pytestmark = pytest.mark.skipif(find_vocab_source() is None, reason="no CLIP vocabulary (pip install --no-deps open_clip_torch)")


@pytest.fixture(scope="module")
def tok():
    t = clip_tokenizer()
    return lambda text: tokenize_prompt(text, hf_encoder(t), 77), t


def test_words_map_to_the_prompts_tokens(tok):
    prompt, t = tok
    p = prompt("a cat, running")
    assert p.spans == ((1, 2), (2, 4), (4, 5)) and p.end == 5
    assert [49406, *p.ids, 49407] == t("a cat, running").input_ids  # word by word == whole prompt
    assert p.positions("cat") == [2, 3] and p.positions("Running") == [4] and p.positions("dog") == []
    with pytest.raises(ValueError, match="75"):
        prompt(" ".join(["cat"] * 80))


def test_replace_one_to_one_and_one_to_many(tok):
    prompt, _ = tok
    src, tgt = prompt("a cat running"), prompt("a snowleopard running")  # snowleopard = 2 tokens
    m = replace_mapper(src, tgt)
    want = torch.zeros(77, 77)
    want[0, 0] = want[1, 1] = 1  # start, "a"
    want[2, 2] = want[2, 3] = 0.5  # cat -> snow + leopard, evenly
    want[3, 4] = 1  # running shifts by one
    for k in range(77 - 5):  # end token and padding, from each prompt's end
        want[4 + k, 5 + k] = 1
    assert torch.equal(m, want)
    probs = torch.rand(2, 3, 5, 77).softmax(-1)
    edited = probs @ m
    assert torch.allclose(edited[..., 3], probs[..., 2] * 0.5) and torch.allclose(edited[..., 4], probs[..., 3])

    same = replace_mapper(src, prompt("a tiger running"))
    assert torch.equal(same, torch.eye(77))  # equal token counts: a permutation, here the identity
    with pytest.raises(ValueError, match="refine"):
        replace_mapper(src, prompt("a big cat running"))
    assert resolve_kind(EditKind.AUTO, src, prompt("a big cat running")) is EditKind.REFINE
    assert resolve_kind(EditKind.AUTO, src, tgt) is EditKind.REPLACE


def test_replace_keeps_later_words_aligned_when_a_swap_changes_token_count(tok):
    """The official man-motor config: "man" (1 token) → "Spider-Man" (spider, -, man). Every
    later word must still read its own source word, two positions earlier (a deliberate
    deviation: the official mapper reads the source two positions later from "is" on)."""
    prompt, _ = tok
    src = prompt("a man is driving a motorbike in the forest")
    tgt = prompt("a Spider-Man is driving a motorbike in the forest")
    assert src.spans[1] == (2, 3) and tgt.spans[1] == (2, 5) and tgt.end == src.end + 2
    m = replace_mapper(src, tgt)
    want = torch.zeros(77, 77)
    want[0, 0] = want[1, 1] = 1  # start, "a"
    want[2, 2:5] = 1 / 3  # man -> spider, -, man
    for s_pos in range(3, 77 - 2):  # is … forest, the end token and the padding: shifted by two
        want[s_pos, s_pos + 2] = 1
    assert torch.equal(m, want)
    for (sa, sb), (ta, tb), w in zip(src.spans[2:], tgt.spans[2:], src.words[2:]):
        assert m[sa:sb, ta:tb].diagonal().eq(1).all() and m[:, ta:tb].sum(0).eq(1).all(), w


def test_refine_aligns_and_marks_new_tokens(tok):
    prompt, _ = tok
    src, tgt = prompt("a cat running"), prompt("a big cat running on snow")
    mapper, alphas = refine_mapper(src, tgt)
    # target positions: 0 start, 1 a, 2 big (new), 3 cat, 4 running, 5 on (new), 6 snow (new), 7 end, 8… padding
    assert mapper[:8].tolist() == [0, 1, -1, 2, 3, -1, -1, 4] and alphas[:8].tolist() == [1, 1, 0, 1, 1, 0, 0, 1]
    assert mapper[8:].tolist() == list(range(8, 77)) and alphas[8:].eq(1).all()  # padding: the same position
    probs = torch.rand(1, 2, 4, 77).softmax(-1)
    target = torch.rand(1, 2, 4, 77).softmax(-1)
    edited = probs[..., mapper] * alphas + target * (1 - alphas)
    assert torch.equal(edited[..., 3], probs[..., 2]) and torch.equal(edited[..., 2], target[..., 2])
    assert torch.equal(edited[..., 7], probs[..., 4]) and torch.equal(edited[..., 9], probs[..., 9])


# Hand-derived with prompt-to-prompt's alignment (match 1, mismatch −1, gap 0; start and end
# tokens aligned too; traceback from the end preferring left (target token unpaired), then up
# (source token unpaired), then the diagonal). Each entry: the source position every target
# position up to and including its end token reads, −1 for a new token (alpha 0); padding
# after the target's end reads the same position of the source.
REFINE_CASES = {
    # a repeated target word: the traceback skips the later "cat" at no cost, so the first pairs
    ("a cat", "a cat cat"): [0, 1, 2, -1, 3],
    # a repeated source word: the later source "cat" is skipped, the target's pairs with the first
    ("a cat cat", "a cat"): [0, 1, 2, 4],
    # a word inserted before a repeated word: big is new, the first cat pairs, the second is new
    ("a cat", "a big cat cat"): [0, 1, -1, 2, -1, 3],
    # an inserted multi-token word (spider - man) before a repeated token (man)
    ("a man", "a man Spider-Man"): [0, 1, 2, -1, -1, -1, 3],
    ("a man is running", "a Spider-Man is running"): [0, 1, -1, -1, 2, 3, 4, 5],
    # two words swap places: left before up pairs the target's first (dog), its cat is new
    ("a cat dog", "a dog cat"): [0, 1, 3, -1, 4],
    ("a dog and a cat", "a cat and a dog"): [0, 1, -1, 3, 4, -1, 6],
    # removed words: target padding then reads the source's "running" (5) and end token (6)
    ("a big red cat running", "a cat running"): [0, 1, 4, 5, 6],
}


@pytest.mark.parametrize("pair", list(REFINE_CASES), ids=lambda p: f"{p[0]}->{p[1]}")
def test_refine_matches_prompt_to_prompt_on_ties(tok, pair):
    prompt, _ = tok
    src, tgt = prompt(pair[0]), prompt(pair[1])
    head = REFINE_CASES[pair]
    assert len(head) == tgt.end + 1  # the table lists every target token and the end token
    mapper, alphas = refine_mapper(src, tgt)
    want = torch.tensor(head + list(range(len(head), 77)))
    assert torch.equal(mapper, want)
    assert torch.equal(alphas, (want != -1).float())
    assert mapper.dtype == torch.long and alphas.shape == (77,)


def test_reweight_and_word_lists(tok):
    prompt, _ = tok
    tgt = prompt("a fluffy snowleopard")
    factors = parse_word_values("fluffy:2, snowleopard: 0.5", "reweight", 0.0, 10.0)
    eq = reweight_vector(tgt, factors)
    assert eq[2] == 2 and eq[3] == eq[4] == 0.5 and eq[1] == 1 and eq[0] == 1 and eq[5:].eq(1).all()
    assert parse_word_values("  ", "reweight", 0, 10) == {}
    for bad in ("fluffy=2", "fluffy:x", "fluffy:2 snow:1", ":2"):
        with pytest.raises(ValueError, match="word:number"):
            parse_word_values(bad, "reweight", 0, 10)
    with pytest.raises(ValueError, match="out of range"):
        parse_word_values("fluffy:-1", "reweight", 0, 10)
    with pytest.raises(ValueError, match="not a word of the target prompt"):
        reweight_vector(tgt, {"dog": 2.0})
    assert word_positions(tgt, ["snowleopard", "a"], "blend_target_words", "target") == [3, 4, 1]


def test_token_view_describes_and_warns(tok):
    from vp2p.token_view import describe_edit

    _, t = tok
    enc = lambda text: tokenize_prompt(text, hf_encoder(t), 77)
    dec = lambda i: t.convert_ids_to_tokens(i).replace("</w>", "")
    view = describe_edit("a cat running", "a snowleopard running", "auto", "snowleopard:2", "cat", "snowleopard", enc, dec)
    assert view["kind"] == "replace" and view["warnings"] == []
    assert [v["status"] for v in view["target"]] == ["kept", "swapped", "kept"]
    assert view["target"][1]["tokens"] == ["snow", "leopard"] and view["target"][1]["reweight"] == 2.0
    assert view["source"][1]["blend"] and view["target"][1]["blend"]
    refine = describe_edit("a cat running", "a big cat running", "auto", "", "", "", enc, dec)
    assert refine["kind"] == "refine" and [v["status"] for v in refine["target"]] == ["kept", "added", "kept", "kept"]
    bad = describe_edit("a cat running", "a big cat running", "replace", "dog:2, x", "dog", "", enc, dec)
    text = " | ".join(bad["warnings"])
    assert "edit=refine" in text and "word:number" in text and "'dog' is not a word of the source prompt" in text
    long = describe_edit("cat " * 80, "a cat", "auto", "", "", "", enc, dec)
    assert "75" in long["warnings"][0] and "kind" not in long


def _emphasis(text: str) -> list[tuple[str, float]]:
    """A stand-in for a host's emphasis parse: '(word:w)' segments at weight w."""
    out, last = [], 0
    for m in re.finditer(r"\(([^():]+):([\d.]+)\)", text):
        out += [(text[last:m.start()], 1.0), (m.group(1), float(m.group(2)))]
        last = m.end()
    return out + [(text[last:], 1.0)]


def test_weighted_prompt_aligns_on_its_plain_words(tok):
    _, t = tok
    enc = hf_encoder(t)
    plain = tokenize_prompt("a cat running", enc, 77)
    weighted = tokenize_prompt("a (cat:1.3) running", enc, 77, _emphasis)
    assert weighted.words == plain.words and weighted.ids == plain.ids and weighted.spans == plain.spans
    assert weighted.weights == (1.0, 1.3, 1.0) and plain.weights == () and weighted.word_weight(1) == 1.3
    assert weighted.positions("cat") == [2]
    assert torch.equal(replace_mapper(weighted, tokenize_prompt("a (dog:0.8) running", enc, 77, _emphasis)),
                       replace_mapper(plain, tokenize_prompt("a dog running", enc, 77)))
    assert prompt_words("big(cat:1.2) x", _emphasis) == [("big", 1.0), ("cat", 1.2), ("x", 1.0)]


def test_static_checks_need_no_tokenizer():
    ok = dict(reweight="tiger:2", cross_replace_words="tiger:0.5", source_lists={"blend_source_words": "cat"},
              target_lists={"blend_target_words": "tiger"})
    check_edit_words("a (cat:1.2) runs", "a tiger runs", "replace", _emphasis, **ok)
    with pytest.raises(ValueError, match="source has 3 words and the target 4"):
        check_edit_words("a cat runs", "a big tiger runs", "replace", _emphasis)
    check_edit_words("a cat runs", "a big tiger runs", "auto", _emphasis)
    with pytest.raises(ValueError, match="'x' is not 'word:number'"):
        check_edit_words("a cat", "a dog", "auto", reweight="dog:2, x")
    with pytest.raises(ValueError, match="out of range"):
        check_edit_words("a cat", "a dog", "auto", cross_replace_words="dog:1.5")
    with pytest.raises(ValueError, match="blend_source_words: 'dog' is not a word of the source prompt"):
        check_edit_words("a cat", "a dog", "auto", source_lists={"blend_source_words": "dog"})
    with pytest.raises(ValueError, match="reweight: 'cat' is not a word of the target prompt"):
        check_edit_words("a cat", "a (dog:1.1)", "auto", _emphasis, reweight="cat:2")
    with pytest.raises(ValueError, match="edit"):
        check_edit_words("a cat", "a dog", "swap")
    with pytest.raises(ValueError, match="target prompt is empty"):
        check_edit_words("a cat", "  ", "auto")
    check_edit_words(None, "a dog", "replace", reweight="dog:2", source_lists={"blend_source_words": "zzz"})  # linked: skipped
