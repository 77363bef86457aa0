"""digital_stain.nuclei.slide and ``digital-stain nuclei SLIDE -o OUT.ome.zarr``: a slide's nuclei as an NGFF
label image beside its stain, chunk by chunk, stoppable and resumable."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v04 import Image as ImageV04
from ome_zarr_models.v05 import Image as ImageV05

from digital_stain.cli import main
from digital_stain.nuclei.chunked import global_threshold, segment_block
from digital_stain.nuclei.segment import NucleiSettings
from digital_stain.nuclei.slide import find_nuclei_slide

SMALL = dict(chunk=256, overlap=32, device="cpu", precision="fp32", adapt="off")


@pytest.fixture
def slide(darkfield_tile) -> np.ndarray:
    rows = [np.concatenate([darkfield_tile, darkfield_tile[:, ::-1], darkfield_tile[::-1]], axis=1)]
    rows.append(rows[0][::-1, ::-1])
    rows.append(np.rot90(rows[0], 2))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:700, :600])


@pytest.mark.parametrize(("ngff", "image"), [("0.4", ImageV04), ("0.5", ImageV05)])
def test_labels_beside_the_stain_agree_with_segmenting_the_stored_stain_whole(tiny_model, slide, tmp_path, ngff,
                                                                              image):
    path = tmp_path / "slide.ome.zarr"
    # the tiny random student's stain has nucleus-sized blobs; its teacher's, blobs wider than the margin
    result = find_nuclei_slide(tiny_model, slide, path, ngff=ngff, stain="student", **SMALL)
    root = zarr.open_group(str(path), mode="r")
    assert sorted(root.group_keys()) == ["labels", "student"]
    image.from_zarr(root)  # the image with its labels group: valid NGFF
    labels = root["labels/nuclei/0"][:]
    assert labels.shape == (700, 600) and labels.dtype == np.uint32
    stained = root["student/0"][:].transpose(1, 2, 0).astype(np.float32) / 255
    settings = NucleiSettings()
    whole, count = segment_block(stained, (0, 0), (0, 700, 0, 600), (700, 600), settings,
                                 global_threshold([stained], settings))  # 9 chunks: the crops are all of it
    assert np.mean(labels == whole) > 0.99 and abs(result.count - count) <= 2
    np.testing.assert_array_equal(root["labels/nuclei/1"][:], labels[::2, ::2])
    record = dict(root.attrs)["digital_stain"]["nuclei"]
    assert record["count"] == result.count and record["method"] == "adaptation"
    attrs = dict(root["labels/nuclei"].attrs)
    ngff_attrs = attrs if ngff == "0.4" else attrs["ome"]
    assert ngff_attrs["image-label"]["source"] == {"image": "../../"}
    translations = [d["coordinateTransformations"][1]["translation"] for d in ngff_attrs["multiscales"][0]["datasets"]]
    assert all(t == translations[0] for t in translations)  # every other pixel: no half-pixel move


def test_a_model_with_a_segmenter_labels_the_stored_enhanced_gray_by_tutorship(tutored_model, slide, tmp_path):
    from digital_stain.nuclei.tutor import segment_enhanced

    path = tmp_path / "tutored.ome.zarr"
    result = find_nuclei_slide(tutored_model, slide, path, **SMALL)  # auto: the model has a segmenter
    root = zarr.open_group(str(path), mode="r")
    assert sorted(root.group_keys()) == ["enhanced", "labels"]
    record = dict(root.attrs)["digital_stain"]["nuclei"]
    assert (record["method"], record["source"], record["threshold"], result.threshold) == (
        "tutorship", "enhanced", None, None)
    labels = root["labels/nuclei/0"][:]
    whole = segment_enhanced(tutored_model.segmenter, root["enhanced/0"][:].astype(np.float32) / 255)
    assert result.count > 20 and abs(result.count - int(whole.max())) <= 2
    assert np.mean((labels > 0) == (whole > 0)) > 0.999  # the segmenter's nuclei, unit by unit
    again = find_nuclei_slide(tutored_model, slide, path, resume=True, **SMALL)  # complete: read back
    assert again.count == result.count and again.threshold is None


def test_stopped_while_labelling_leaves_the_stain_and_no_labels_then_resume_labels_it(tiny_model, slide, tmp_path):
    reference = find_nuclei_slide(tiny_model, slide, tmp_path / "reference.ome.zarr", **SMALL)
    path = tmp_path / "stopped.ome.zarr"
    stop = threading.Event()
    units = []

    def progress(done, total):
        units.append(done)
        if done == reference.stained.units_total + 2:  # two label units into the labelling
            stop.set()

    first = find_nuclei_slide(tiny_model, slide, path, progress=progress, stop=stop, **SMALL)
    assert first.stopped and first.stained.complete
    assert not (path / "labels").exists() and not (path / ".labels.partial").exists()
    second = find_nuclei_slide(tiny_model, slide, path, resume=True, **SMALL)
    assert second.count == reference.count
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["labels/nuclei/0"][:],
                                  zarr.open_group(str(tmp_path / "reference.ome.zarr"), mode="r")["labels/nuclei/0"][:])
    again = find_nuclei_slide(tiny_model, slide, path, resume=True, **SMALL)  # complete: nothing to redo
    assert again.count == reference.count and again.stained.units_done == 0


def test_the_command_line_labels_a_slide(capsys, tiny_model_file, slide, tmp_path):
    source = tmp_path / "slide.tif"
    tifffile.imwrite(source, slide, tile=(256, 256), photometric="rgb")
    out = tmp_path / "out.ome.zarr"
    code = main(["nuclei", str(source), "-o", str(out), "--model", str(tiny_model_file), "--chunk", "256",
                 "--device", "cpu", "--precision", "fp32", "--adapt", "off", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    count = dict(zarr.open_group(str(out), mode="r").attrs)["digital_stain"]["nuclei"]["count"]
    assert f"{count} nuclei" in err
    code = main(["nuclei", str(source), "-o", str(tmp_path / "folder"), "--resume", "--model", str(tiny_model_file)])
    assert code == 2 and "--resume is for OME-Zarr output" in capsys.readouterr().err


def test_labels_another_program_put_in_the_store_are_never_replaced(tiny_model, slide, tmp_path):
    from digital_stain.core.arrays import InputError
    from stores import write_ome_zarr

    path = tmp_path / "slide.ome.zarr"
    find_nuclei_slide(tiny_model, slide, path, stain="student", **SMALL)
    # a crash after our labels were moved in, before the record: ours, so a resume labels again
    root = zarr.open_group(str(path), mode="r+")
    record = dict(root.attrs)["digital_stain"]
    root.attrs["digital_stain"] = {k: v for k, v in record.items() if k != "nuclei"}
    again = find_nuclei_slide(tiny_model, slide, path, resume=True, stain="student", **SMALL)
    assert again.count == record["nuclei"]["count"]
    # someone else's labels (another tool's cells): refused, kept as they were
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["digital_stain"] = {k: v for k, v in dict(root.attrs)["digital_stain"].items() if k != "nuclei"}
    import shutil

    shutil.rmtree(path / "labels")
    write_ome_zarr(path / "labels" / "cells", [np.ones((700, 600), np.uint16)], "yx")
    with pytest.raises(InputError, match="labels this tool did not write"):
        find_nuclei_slide(tiny_model, slide, path, resume=True, stain="student", **SMALL)
    assert (path / "labels" / "cells").exists() and not (path / "labels" / "nuclei").exists()
