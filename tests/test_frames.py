"""Frame selection (start, stride, cap) and the frame rate that plays a selection at real speed."""

import pytest

from vp2p.errors import SettingsError
from vp2p.frames import frame_indices, played_fps


def test_start_stride_cap():
    assert frame_indices(10) == list(range(10))
    assert frame_indices(10, start=1, stride=3) == [1, 4, 7]
    assert frame_indices(100, start=5, stride=2, cap=4) == [5, 7, 9, 11]
    assert frame_indices(5, stride=2, cap=8) == [0, 2, 4]  # a cap beyond the clip: what the clip has
    assert played_fps(24.0, 3) == 8.0


@pytest.mark.parametrize("kw, message", [
    (dict(total=0), "no frames"),
    (dict(total=5, stride=0), "stride=0"),
    (dict(total=5, cap=-1), "cap=-1"),
    (dict(total=5, start=5), "start=5 but the clip has 5 frames"),
])
def test_bad_selection_is_refused_clearly(kw, message):
    with pytest.raises(SettingsError, match=message):
        frame_indices(**kw)
    with pytest.raises(SettingsError, match="fps=0"):
        played_fps(0.0, 1)
