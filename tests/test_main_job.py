"""The README's main job runs end to end on the embedded default (small)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vp2p.clip_vocab import find_vocab_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(find_vocab_source() is None, reason="no CLIP vocabulary (pip install --no-deps open_clip_torch)")
def test_main_job_edits_a_video(tmp_path):
    spec = importlib.util.spec_from_file_location("video_p2p_cli", ROOT / "scripts" / "video_p2p.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--frames", "3", "--width", "64", "--height", "48", "--steps", "3", "--inner-steps", "1", "--tune-steps", "2",
                   "--out", str(tmp_path)])
    assert rc == 0
    from PIL import Image

    for name in ("edited", "source"):
        assert (tmp_path / f"{name}.gif").stat().st_size > 0
        assert len(list(tmp_path.glob(f"{name}_*.png"))) == 3
        assert Image.open(tmp_path / f"{name}_000.png").size == (64, 48)
    assert (tmp_path / "edited_000.png").read_bytes() != (tmp_path / "source_000.png").read_bytes()


def test_p2p_defaults_are_the_official_codes():
    """cross_replace 0.2 / self_replace 0.5 (the official run_videop2p.py) in the edit, the headless
    options, the command's flags and the video edit example workflow."""
    import dataclasses
    import json

    from vp2p.diffusers_pipeline import EditOptions
    from vp2p.p2p import P2PEdit

    spec = importlib.util.spec_from_file_location("video_p2p_cli", ROOT / "scripts" / "video_p2p.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args([])
    for cls in (P2PEdit, EditOptions):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert (defaults["cross_replace"], defaults["self_replace"]) == (0.2, 0.5), cls.__name__
    assert (args.cross_replace, args.self_replace) == (0.2, 0.5)
    workflow = json.loads((ROOT / "example_workflows" / "video_p2p_edit.json").read_text(encoding="utf-8"))
    (node,) = [n for n in workflow["nodes"] if n["type"] == "VP2P_P2PController"]
    assert node["widgets_values"][2] == "auto" and node["widgets_values"][3:5] == [0.2, 0.5]
