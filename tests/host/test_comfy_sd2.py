"""ComfyUI host: every node on SD2.x MODELs that ComfyUI's own loader detects (SD20, v-prediction 768-v and eps
512-base, decided from the weights; see tests/host/model_zoo.py) with ComfyUI's OpenCLIP-H text encoder and tokenizer."""

from __future__ import annotations

import pytest

from tests.host import family_checks as fc
from tests.host.model_zoo import make_clip_sd2, make_sd2


@pytest.fixture(scope="module")
def sd2v(comfy_path):
    return make_sd2(v_prediction=True)


@pytest.fixture(scope="module")
def clip(comfy_path):
    return make_clip_sd2(0)


def test_detection_gives_sd20_v_and_eps(comfy_path):
    import comfy.model_sampling

    v, eps = make_sd2(True), make_sd2(False, seed=1)  # make_sd2 asserts SD20 and the model type
    assert isinstance(v.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert isinstance(eps.get_model_object("model_sampling"), comfy.model_sampling.EPS)


def test_tokenizer_is_openclip_h_with_its_padding(pack, clip):
    from tests.host.comfy_env import host_module

    prompt_host = host_module(pack, "prompt_host")
    key, inner = prompt_host.pick_key(clip.tokenizer)
    assert key == "h" and inner.pad_token == 0  # OpenCLIP-H pads with 0, CLIP-L with the end token
    tp = prompt_host.tokenized_prompt(clip, "a cat running")
    assert tp.words == ("a", "cat", "running") and tp.spans == ((1, 2), (2, 3), (3, 4)) and tp.context == 77


def test_edit_identity_blend_and_untouched_model_v_prediction(pack, sd2v, clip):
    fc.edit_checks(pack, "sd2-v", sd2v, clip)


def test_edit_eps_base(pack, clip):
    fc.edit_checks(pack, "sd2-eps", make_sd2(False, seed=2), clip)


def test_fatezero(pack, sd2v, clip):
    fc.fatezero_checks(pack, "sd2-v", sd2v, clip)


def test_cross_attention_guidance(pack, sd2v, clip):
    fc.guidance_checks(pack, "sd2-v", sd2v, clip)


def test_tune_and_start_from_noise(pack, sd2v, clip):
    fc.tune_and_noise_checks(pack, "sd2-v", sd2v, clip)
