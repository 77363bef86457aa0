"""digital_stain.nuclei.find: a dark-field plane's nuclei by adaptation (stain, then segment the virtual H&E)."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.find import choose_method, find_nuclei
from digital_stain.nuclei.segment import NucleiSettings, segment_nuclei


def test_adaptation_segments_the_student_stain_of_the_plane(tiny_model, darkfield_tile):
    found = find_nuclei(tiny_model, darkfield_tile, settings=None, adapt="off")
    assert found.method == "adaptation" and found.source == "student"
    assert found.labels.shape == darkfield_tile.shape[:2] and found.labels.dtype == np.uint16
    stained = tiny_model.stain(darkfield_tile, ["student"], adapt="off")["student"]
    np.testing.assert_array_equal(found.stained, stained)  # the stain the user sees
    np.testing.assert_array_equal(found.labels, segment_nuclei(stained))
    assert found.count == int(found.labels.max())
    assert found.adaptation["mode"] == "off"


def test_nuclei_settings_reach_the_segmenter(tiny_model, darkfield_tile):
    few = find_nuclei(tiny_model, darkfield_tile, nuclei=NucleiSettings(min_area=10**5), adapt="off")
    assert few.count == 0


def test_a_model_without_a_student_segments_the_teacher(tiny_model, darkfield_tile):
    from digital_stain.stain.model import StainModel

    teacher_only = StainModel(tiny_model.enhancer, tiny_model.teacher, None, {"name": "teacher only"})
    assert find_nuclei(teacher_only, darkfield_tile, adapt="off").source == "teacher"


def test_tutorship_without_a_segmenter_and_unknown_methods_are_refused(tiny_model):
    with pytest.raises(InputError, match="no nuclei segmenter.*--method adaptation"):
        choose_method(tiny_model, "tutorship")
    with pytest.raises(InputError, match="'magic' is not known"):
        choose_method(tiny_model, "magic")
    assert choose_method(tiny_model, "auto") == "adaptation"


def test_a_stack_is_refused_with_what_to_do(tiny_model, darkfield_tile):
    with pytest.raises(InputError, match="one dark-field plane"):
        find_nuclei(tiny_model, np.stack([darkfield_tile] * 2))
