"""The CLIP vocabulary rebuilt from the open_clip BPE file tokenises as CLIP does."""

from __future__ import annotations

import pytest

from vp2p.clip_vocab import clip_tokenizer, find_vocab_source

pytestmark = pytest.mark.skipif(find_vocab_source() is None, reason="no CLIP vocabulary (pip install --no-deps open_clip_torch)")


def test_known_token_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a cat").input_ids == [49406, 320, 2368, 49407]
    ids = tok("a photo of a tiger", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406
