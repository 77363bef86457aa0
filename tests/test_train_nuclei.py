"""Tutorship: digital_stain.nuclei.tutor and digital_stain.train.nuclei (a segmenter taught by H&E with masks
translated into dark-field), its place in the model file, and ``digital-stain train-nuclei``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch

from digital_stain.cli import main
from digital_stain.core.arrays import InputError
from digital_stain.io.images import read_image
from digital_stain.nuclei.find import find_nuclei
from digital_stain.nuclei.segment import segment_nuclei
from digital_stain.nuclei.tutor import check_masks, labels_from_maps, targets
from digital_stain.stain.model import StainModel
from digital_stain.train.nuclei import NucleiConfig, train_segmenter

TINY = dict(steps=6, batch=2, crop=64, width=4, depth=2, translations=1, val_every=3, report_every=1)


@pytest.fixture
def he_with_masks(hne_dir):
    """The sample H&E tiles with masks made by the H&E segmenter (what tutorship learns to find from dark-field)."""
    paths = sorted(hne_dir.glob("*.png"))
    images = [np.asarray(read_image(path)) for path in paths]
    return images, [segment_nuclei(image) for image in images], [path.name for path in paths]


def test_targets_are_nuclei_and_their_inner_boundaries():
    labels = np.zeros((20, 20), np.uint16)
    labels[2:8, 2:8], labels[2:8, 8:14] = 1, 2  # two touching squares
    nucleus, boundary = targets(labels)
    assert nucleus.sum() == 72 and not boundary[labels == 0].any()
    assert boundary[4, 7] and boundary[4, 8] and not boundary[4, 4]  # where they touch, each has its edge


def test_maps_with_boundaries_split_touching_nuclei():
    yy, xx = np.mgrid[:40, :60]
    a, b = (yy - 20) ** 2 + (xx - 22) ** 2 <= 64, (yy - 20) ** 2 + (xx - 36) ** 2 <= 64
    maps = np.zeros((2, 40, 60), np.float32)
    maps[0][a | b] = 0.9
    maps[1][(a | b) & (np.abs(xx - 29) <= 1)] = 0.9  # the boundary between them
    assert labels_from_maps(maps).max() == 2
    assert labels_from_maps(np.zeros((2, 8, 8), np.float32)).max() == 0


def test_masks_that_do_not_fit_are_refused(darkfield_tile):
    with pytest.raises(InputError, match="masks must match their images"):
        check_masks(darkfield_tile, np.zeros((10, 10), np.uint16), "a.png")
    with pytest.raises(InputError, match="not an instance label image"):
        check_masks(darkfield_tile, np.zeros((256, 256), np.float32), "a.png")


def test_stop_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_model, he_with_masks, tmp_path):
    images, masks, names = he_with_masks
    cfg = NucleiConfig(**TINY)
    whole, result = train_segmenter(tiny_model, images, masks, names, cfg, checkpoint=tmp_path / "a.ckpt")
    assert result.steps_done == 6 and not result.cancelled and 0 <= result.best_score <= 1
    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.step)
        if p.step == 3:
            stop.set()

    first, stopped = train_segmenter(tiny_model, images, masks, names, cfg, checkpoint=tmp_path / "b.ckpt",
                                     progress=progress, stop=stop)
    assert stopped.cancelled and stopped.steps_done == 3
    resumed, done = train_segmenter(tiny_model, images, masks, names, cfg, checkpoint=tmp_path / "b.ckpt",
                                    resume=True)
    assert done.steps_done == 6 and done.best_step == result.best_step
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    with pytest.raises(InputError, match="other settings"):
        train_segmenter(tiny_model, images, masks, names, NucleiConfig(**{**TINY, "lr": 0.1}),
                        checkpoint=tmp_path / "b.ckpt", resume=True)


def test_the_segmenter_lives_in_the_model_file_and_auto_chooses_tutorship(tiny_model, he_with_masks, darkfield_tile,
                                                                         tmp_path):
    images, masks, names = he_with_masks
    net, _ = train_segmenter(tiny_model, images, masks, names, NucleiConfig(**TINY))
    model = StainModel(tiny_model.enhancer, tiny_model.teacher, tiny_model.student, {"name": "with nuclei"},
                       segmenter=net)
    model.save(tmp_path / "m.safetensors")
    loaded = StainModel.load(tmp_path / "m.safetensors", device="cpu")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.segmenter.state_dict()[key], value, msg=key)
    found = find_nuclei(loaded, darkfield_tile, adapt="off")
    assert found.method == "tutorship" and found.source == "enhanced" and found.labels.dtype == np.uint16
    adapted = find_nuclei(loaded, darkfield_tile, method="adaptation", adapt="off")
    assert adapted.method == "adaptation" and adapted.source == "teacher"


def test_a_crop_the_u_net_cannot_take_is_refused(tiny_model, he_with_masks):
    images, masks, names = he_with_masks
    with pytest.raises(InputError, match="not a multiple of 4"):
        train_segmenter(tiny_model, images, masks, names, NucleiConfig(**{**TINY, "crop": 66}))


def test_the_command_line_trains_then_finds_nuclei_by_tutorship(capsys, tiny_model_file, hne_dir, darkfield_dir,
                                                                 tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted(hne_dir.glob("*.png")):
        tifffile.imwrite(masks / f"{path.stem}.tif", segment_nuclei(read_image(path)))
    out = tmp_path / "nuclei.safetensors"
    args = ["train-nuclei", "--stained", str(hne_dir), "--masks", str(masks), "--init", str(tiny_model_file),
            "-o", str(out), "--steps", "4", "--batch", "2", "--crop", "64", "--tint-from", str(darkfield_dir), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    assert StainModel.load(out, device="cpu").segmenter is not None
    code = main(["nuclei", str(darkfield_dir), "-o", str(tmp_path / "labels"), "--model", str(out),
                 "--method", "tutorship", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 0 and "by tutorship" in err, err
    assert len(list((tmp_path / "labels").glob("*.tif"))) == 3
    code = main(["nuclei", str(darkfield_dir / "darkfield_0_0.png"), "-o", str(tmp_path / "slide.ome.zarr"),
                 "--model", str(out), "--chunk", "256", "--device", "cpu", "-q"])  # a slide: auto is tutorship too
    err = capsys.readouterr().err
    assert code == 0 and "nuclei by tutorship" in err and "(the model's segmenter)" in err, err
    assert (tmp_path / "slide.ome.zarr" / "enhanced").is_dir() and (tmp_path / "slide.ome.zarr" / "labels").is_dir()
    (masks / "stained_0_0.tif").unlink()
    code = main([*args[:-1], "--overwrite", "-q"])
    assert code == 2 and "have no mask of the same name" in capsys.readouterr().err


def test_a_model_that_keeps_its_reverse_generator_translates_with_it(tiny_model, he_with_masks):
    from digital_stain.core.nets import ResnetGenerator
    from digital_stain.nuclei.tutor import reverse_translate, translate, translator_of

    images, _, _ = he_with_masks
    assert translator_of(tiny_model) == "enhancer"
    with pytest.raises(InputError, match="keeps no reverse generator"):
        translator_of(tiny_model, "reverse")
    torch.manual_seed(0)
    reverse = ResnetGenerator(in_channels=3, width=4, n_blocks=1)
    model = StainModel(tiny_model.enhancer, tiny_model.teacher, tiny_model.student, {"name": "with F"},
                       reverse=reverse)
    assert translator_of(model) == "reverse" and translator_of(model, "enhancer") == "enhancer"
    darkfield = reverse_translate(model.reverse, images[0][:250, :250])  # any size: padded to F's multiple
    assert darkfield.shape == (250, 250, 3) and darkfield.dtype == np.uint8
    by_f = translate(model, images[0], (1.0, 1.0, 1.0), seed=0, translator="reverse")
    by_enhancer = translate(model, images[0], (1.0, 1.0, 1.0), seed=0, translator="enhancer")
    assert by_f.shape == by_enhancer.shape == images[0].shape[:2] and not np.allclose(by_f, by_enhancer)
    net, _ = train_segmenter(model, *he_with_masks, NucleiConfig(**{**TINY, "steps": 2}))  # auto: by F
    assert net is not None
