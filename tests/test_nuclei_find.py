"""digital_stain.nuclei.find: a dark-field plane's nuclei by adaptation (stain, then segment the virtual H&E)."""

from __future__ import annotations

import numpy as np
import pytest

from digital_stain.core.arrays import InputError
from digital_stain.nuclei.find import choose_method, find_nuclei
from digital_stain.nuclei.segment import NucleiSettings, segment_nuclei


@pytest.mark.parametrize(("stain", "source"), [("auto", "teacher"), ("teacher", "teacher"), ("student", "student")])
def test_adaptation_segments_the_chosen_stain_of_the_plane(tiny_model, darkfield_tile, stain, source):
    found = find_nuclei(tiny_model, darkfield_tile, stain=stain, settings=None, adapt="off")
    assert found.method == "adaptation" and found.source == source
    assert found.labels.shape == darkfield_tile.shape[:2] and found.labels.dtype == np.uint16
    stained = tiny_model.stain(darkfield_tile, [source], adapt="off")[source]
    np.testing.assert_array_equal(found.stained, stained)  # the stain the user sees
    np.testing.assert_array_equal(found.labels, segment_nuclei(stained))
    assert found.count == int(found.labels.max())
    assert found.adaptation["mode"] == "off"


def test_nuclei_settings_reach_the_segmenter(tiny_model, darkfield_tile):
    few = find_nuclei(tiny_model, darkfield_tile, nuclei=NucleiSettings(min_area=10**5), adapt="off")
    assert few.count == 0


def test_a_model_without_a_teacher_segments_the_student_and_a_missing_stain_is_refused(tiny_model, darkfield_tile):
    from digital_stain.stain.model import StainModel

    student_only = StainModel(tiny_model.enhancer, None, tiny_model.student, {"name": "student only"})
    assert find_nuclei(student_only, darkfield_tile, adapt="off").source == "student"
    with pytest.raises(InputError, match="has no teacher"):
        find_nuclei(student_only, darkfield_tile, stain="teacher")
    with pytest.raises(InputError, match="'eosin' is not known"):
        find_nuclei(tiny_model, darkfield_tile, stain="eosin")


def test_tutorship_without_a_segmenter_and_unknown_methods_are_refused(tiny_model):
    with pytest.raises(InputError, match="no nuclei segmenter.*--method adaptation"):
        choose_method(tiny_model, "tutorship")
    with pytest.raises(InputError, match="'magic' is not known"):
        choose_method(tiny_model, "magic")
    assert choose_method(tiny_model, "auto") == "adaptation"


def test_a_stack_is_refused_with_what_to_do(tiny_model, darkfield_tile):
    with pytest.raises(InputError, match="one dark-field plane"):
        find_nuclei(tiny_model, np.stack([darkfield_tile] * 2))
