"""Command line: ``digital-stain stain|train-teacher|train|evaluate|synth|export``. A thin layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

# The command line owns its process, so it asks PyTorch for huge pages (hostmem.py); `import digital_stain`
# does not, as inside napari the process is shared. PyTorch reads the variable at its
# first CPU allocation, and the imports below already allocate (color.py makes tensors on import), so
# it is set here, on importing this module (what the `digital-stain` script does first), not in main().
from digital_stain.hostmem import own_process

own_process()

from digital_stain import options  # noqa: E402
from digital_stain.core.adapt import ADAPT_MODES  # noqa: E402
from digital_stain.core.arrays import InputError  # noqa: E402
from digital_stain.core.devices import DEVICES, PRECISIONS  # noqa: E402
from digital_stain.core.nets.generator import UPSAMPLING  # noqa: E402

STEPS = options.integer(1, what="a number of steps")
BATCH = options.integer(1, 1024, "a batch size")
CROP = options.integer(32, 4096, "a crop side in pixels")
SEED = options.integer(0, 2**32 - 1, "a seed")


class _UsageError(Exception):
    """A command line argparse refuses: ``main`` prints the message (with a pointer to --help) and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2); main returns 2 instead, as for every refusal
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

EPILOG = "Docs: docs/usage.md. Models: shipped names ({models}) or a path to a .safetensors model file."


def _models_text() -> str:
    from digital_stain.stain.model import available_models

    return ", ".join(available_models()) or "none shipped"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="digital-stain",
        description="Digitally stain dark-field microscopy as H&E (Xu et al., knowledge distillation).",
    )
    from digital_stain import __version__

    parser.add_argument("--version", action="version", version=f"napari-digital-stain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    stain = sub.add_parser("stain", help="stain an image or a folder of images",
                           epilog=EPILOG.format(models=_models_text()))
    stain.add_argument("input", type=Path, help="image file (PNG, TIFF/BigTIFF, OME-Zarr) or a folder of them")
    stain.add_argument("--output", "-o", type=Path, required=True,
                       help="output folder (or an image file when staining one file to one output); a name ending "
                            "in .zarr (e.g. OUT.ome.zarr) writes one OME-Zarr store with a pyramid, chunk by chunk "
                            "(whole slides: bounded memory, resumable)")
    stain.add_argument("--model", "-m", type=options.model, default="dsd-unpaired", help="shipped model name or model file path")
    stain.add_argument("--device", default="auto", choices=DEVICES)
    stain.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 only where the hardware is fast at it (CUDA, CPUs with AMX or AVX512-BF16), else fp32")
    stain.add_argument("--tile", type=options.tile, default=1024, help="tile side in pixels (memory vs speed)")
    stain.add_argument("--overlap", type=options.overlap, default=128,
                       help="tile overlap in pixels (smaller is faster, less exact at tile borders)")
    stain.add_argument("--outputs", default=None,
                       help="comma-separated: student,teacher,enhanced (default: all the model has)")
    stain.add_argument("--format", choices=("png", "tif"), default=None, help="output format (default png)")
    stain.add_argument("--compile", action="store_true",
                       help="torch.compile the networks (compiles once, 15-60 s; faster on large images and "
                            "whole slides: about 2x per inner chunk on the development CPU)")
    stain.add_argument("--overwrite", action="store_true", help="replace an existing output")
    stain.add_argument("--resume", action="store_true",
                       help="OME-Zarr output: finish an interrupted run, redoing only unfinished chunks "
                            "(same model and settings)")
    stain.add_argument("--chunk", type=options.integer(256, 4096, "a chunk side in pixels"), default=None,
                       help="OME-Zarr output: chunk side in pixels, 256..4096 (default 1024; memory grows with it)")
    stain.add_argument("--scheduler", type=options.scheduler, default=None, metavar="ADDRESS",
                       help="OME-Zarr output: run the chunks on this dask.distributed scheduler (tcp://host:8786); "
                            "every worker needs the package and the model file")
    stain.add_argument("--workers", type=options.integer(1, 256, "a number of worker processes"), default=None, metavar="N",
                       help="OME-Zarr output: run the chunks on a local dask.distributed cluster of N processes")
    stain.add_argument("--ngff", choices=("0.4", "0.5"), default=None,
                       help="OME-Zarr output: the NGFF version, 0.4 on Zarr format 2 (default: every OME-Zarr "
                            "reader opens it) or 0.5 on Zarr format 3; --resume keeps the store's")
    stain.add_argument("--view", action="store_true",
                       help="open the input and outputs in napari when a display is present "
                            "(OME-Zarr output: once finished, as pyramids)")
    stain.add_argument("--adapt", choices=ADAPT_MODES, default=None,
                       help="adapt to another microscope's dark-field: auto (default) when the input (a folder: "
                            "all its images together; a slide: the whole slide) is far from the model's, on, or "
                            "off. Adapting refits the enhancer's dark-field CDF on the input and maps the "
                            "student's input channels onto the model's (docs/usage.md). --resume keeps the "
                            "store's setting")
    stain.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    teach = sub.add_parser("train-teacher", help="train the teacher colouriser on H&E images and write a model file")
    teach.add_argument("--stained", type=Path, required=True, help="folder of RGB H&E images")
    teach.add_argument("--darkfield", type=Path, default=None,
                       help="folder of dark-field images for the enhancer's CDF (default: keep --init's enhancer)")
    teach.add_argument("--output", "-o", type=Path, required=True, help="model file to write (.safetensors)")
    teach.add_argument("--init", type=options.model, default=None, help="model to start from (its teacher, enhancer and student)")
    teach.add_argument("--steps", type=STEPS, default=None)
    teach.add_argument("--batch", type=BATCH, default=None)
    teach.add_argument("--crop", type=CROP, default=None)
    teach.add_argument("--width", type=options.integer(1, 512, "a channel width"), default=None)
    teach.add_argument("--depth", type=options.integer(1, 8, "a depth"), default=None)
    teach.add_argument("--input-noise", type=options.number(0, 1, what="a noise std"), default=None,
                       help="largest std of Gaussian noise added to the gray input (default 0.04; 0 = paper)")
    _add_run_options(teach)
    train = sub.add_parser("train", help="adapt a model to your microscope and H&E (refit the enhancer, fine-tune the "
                           "teacher, distil the student, check it against --init), or train a new student; unpaired "
                           "(or paired-but-misaligned with --paired)")
    train.add_argument("--darkfield", type=Path, required=True, help="folder of dark-field images")
    train.add_argument("--stained", type=Path, required=True,
                       help="folder of RGB H&E images: unpaired, or with --paired the stained adjacent section of "
                            "each dark-field image, with the same file name and pixel size")
    pairing = train.add_mutually_exclusive_group()
    pairing.add_argument("--paired", dest="paired", action="store_const", const=True, default="auto",
                         help="paired-but-misaligned training (the paper's Learning to Align): pairs --darkfield and "
                              "--stained images by file name; a registration network aligns the output with each "
                              "section during training (losses 2 kd, 10 cyc, 20 con, 10 smooth). Default: paired when "
                              "the two folders are found to hold adjacent sections (same names and sizes, and tissue "
                              "that agrees), else unpaired; a line says which")
    pairing.add_argument("--unpaired", dest="paired", action="store_const", const=False,
                         help="train unpaired even if --stained holds the adjacent sections of --darkfield")
    train.add_argument("--output", "-o", type=Path, required=True, help="model file to write (.safetensors)")
    train.add_argument("--init", type=options.model, default="dsd-unpaired", help="model whose enhancer and teacher are used "
                       "(and whose student is fine-tuned if it has one); default dsd-unpaired")
    train.add_argument("--size", choices=("full", "small", "fast", "tiny"), default=None,
                       help="student size: full = the paper's (default on a CUDA GPU), small = CPU-friendly "
                            "(default otherwise), fast = for staining on a CPU, tiny = tests")
    train.add_argument("--steps", type=STEPS, default=None,
                       help="student steps (default 500 when fine-tuning --init's student, which with every stage "
                            "takes minutes on a 2-core CPU (docs/usage.md); 20000 for a new student)")
    train.add_argument("--crop", type=CROP, default=None)
    train.add_argument("--batch", type=BATCH, default=None)
    train.add_argument("--lambda-kd", type=options.number(0, what="a loss weight"), default=None,
                       help="weight of the distillation loss (default the paper's: 5, or 2 with --paired; "
                            "0 = CycleGAN, the ablation)")
    train.add_argument("--lambda-structure", type=options.number(0, what="a loss weight"), default=None, metavar="W",
                       help="weight of a structure loss: the stain's gray keeps the enhanced gray's gradients "
                            "(default 0, the paper's losses; docs/models.md)")
    train.add_argument("--teacher-steps", type=options.integer(0, what="a number of steps"), default=None, metavar="N",
                       help="first fine-tune the teacher for N steps: on --stained alone (default 300) or, trained "
                            "paired, on the adjacent sections (default 1000); 0 keeps --init's teacher as it is")
    train.add_argument("--refit", choices=ADAPT_MODES, default="auto",
                       help="refit the enhancer's CDFs: auto (default) the dark-field one on --darkfield when it is "
                            "far from --init's (as staining adapts), the bright-field one on --stained when the "
                            "teacher is fine-tuned on it; on: both; off: keep --init's")
    train.add_argument("--no-check", action="store_true",
                       help="skip the final check that the tuned model is not broken and not worse than --init on "
                            "the held-out dark-field images (default: checked; a failing model is not written)")
    train.add_argument("--from-scratch", action="store_true",
                       help="start a new student even if --init has one (default: fine-tune its student)")
    train.add_argument("--ema", type=options.number(0, 0.99999, what="an EMA decay, 0 for none"), default=None, metavar="DECAY",
                       help="validate, choose and save a moving average of the student's weights with this decay "
                            "(default 0.99 when fine-tuning --init's student, 0.999 for a new student; 0 = off, the "
                            "paper's training): steadier than the live weights")
    train.add_argument("--upsample", choices=UPSAMPLING, default=None,
                       help="how a new student upsamples: bilinear (default) or nearest = resize then convolve, no "
                            "checkerboard; transpose = the paper's transposed convolutions (a fine-tuned student keeps "
                            "its own)")
    train.add_argument("--reg-warmup", type=options.integer(0, what="a number of steps"), default=None, metavar="STEPS",
                       help="with --paired: first train the registration network for STEPS steps to recover known "
                            "random warps of the training sections (e.g. 3000; default 0 = the paper's training)")
    train.add_argument("--lambda-smooth", type=options.number(0, what="a loss weight"), default=None,
                       help="with --paired: weight of the field's smoothness loss (default the paper's 10; 1 lets "
                            "the registration network follow deformations of a few pixels, docs/benchmarks.md)")
    train.add_argument("--reg-lr-scale", type=options.number(0, above=True, what="a learning-rate factor"), default=None,
                       help="with --paired: the registration network's learning rate as a multiple of the "
                            "student's (default the paper's 1; 10 with --lambda-smooth 1 made it learn the alignment)")
    _add_run_options(train)
    evaluate = sub.add_parser("evaluate", help="score a model's outputs (PSNR/SSIM/nuclei Dice with references; "
                              "NIQE, structure and stain style without)")
    evaluate.add_argument("--darkfield", type=Path, required=True, help="folder of dark-field images to stain")
    evaluate.add_argument("--model", "-m", type=options.model, default="dsd-unpaired", help="shipped model name or model file path")
    evaluate.add_argument("--reference", type=Path, default=None,
                          help="folder of H&E of the same tissue, pixel-aligned, with the same file names")
    evaluate.add_argument("--stained", type=Path, default=None,
                          help="folder of real H&E (any tissue) whose colours the stain-style score compares with")
    evaluate.add_argument("--outputs", default=None, help="comma-separated (default: all the model has)")
    evaluate.add_argument("--device", default="auto", choices=DEVICES)
    evaluate.add_argument("--adapt", choices=ADAPT_MODES, default="auto",
                          help="adaptation to another microscope, decided once for the whole folder (as stain does)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a --json file this tool wrote before")
    evaluate.add_argument("--quiet", "-q", action="store_true")
    synth = sub.add_parser("synth", help="make synthetic dark-field images from H&E by the enhancer's inverse "
                           "(paired data with a known answer)")
    synth.add_argument("--stained", type=Path, required=True, help="folder of RGB H&E images")
    synth.add_argument("--output", "-o", type=Path, required=True, help="folder to write (PNG, same names)")
    synth.add_argument("--model", "-m", type=options.model, default="dsd-unpaired",
                       help="model whose enhancer histograms are inverted")
    synth.add_argument("--tint-from", type=Path, default=None,
                       help="folder of real dark-field images whose mean colour to give the output (default gray)")
    synth.add_argument("--blur", type=options.number(0, 100, what="a blur sigma in pixels"), default=1.0,
                       help="Gaussian blur sigma in pixels (default 1)")
    synth.add_argument("--noise", type=options.number(0, 1, what="a noise std"), default=0.003,
                       help="Gaussian noise std on the [0, 1] scale (default 0.003)")
    synth.add_argument("--seed", type=SEED, default=0)
    synth.add_argument("--overwrite", action="store_true")
    export = sub.add_parser("export", help="write a model's student or teacher as ONNX or TorchScript "
                            "(frozen norm statistics, for tiled use in other runtimes)")
    export.add_argument("model", type=options.model, help="a shipped model name or a .safetensors model file")
    export.add_argument("--output", "-o", type=Path, required=True, help="the file to write (.onnx or .pt)")
    export.add_argument("--format", choices=["onnx", "torchscript"], default=None,
                        help="default: torchscript for .pt/.ts outputs, else onnx")
    export.add_argument("--part", choices=["student", "teacher"], default="student")
    export.add_argument("--statistics-from", type=Path, default=None,
                        help="for the student (required): the dark-field image to record its norm statistics on, "
                             "the one it will stain or one like it")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--quiet", "-q", action="store_true")

    tutor = sub.add_parser("train-nuclei", help="train a nuclei segmenter by tutorship (H&E with masks, translated "
                           "into dark-field) into a copy of a model file")
    tutor.add_argument("--stained", type=Path, required=True, help="folder of RGB H&E images")
    tutor.add_argument("--masks", type=Path, required=True,
                       help="folder of nuclei instance label images (0 = background), one per H&E image, same name "
                            "(any image suffix: NAME.tif for NAME.png)")
    tutor.add_argument("--init", type=options.model, default="dsd-unpaired",
                       help="the model whose enhancer translates the H&E and that the segmenter joins")
    tutor.add_argument("--output", "-o", type=Path, required=True,
                       help="model file to write (.safetensors): --init's parts and the segmenter")
    tutor.add_argument("--tint-from", type=Path, default=None,
                       help="dark-field images of your microscope, for the colour of the translated dark-field "
                            "(default: the package's sample tiles)")
    tutor.add_argument("--translate", choices=("auto", "reverse", "enhancer"), default="auto",
                       help="H&E -> dark-field by the model's reverse generator F (kept in files trained or fine-tuned "
                            "since) or by its enhancer's inverse; auto: F where the file keeps it")
    tutor.add_argument("--steps", type=STEPS, default=None, help="training steps (default 1500: 4-6 min on 2 CPU cores)")
    tutor.add_argument("--batch", type=BATCH, default=None)
    tutor.add_argument("--crop", type=CROP, default=None)
    tutor.add_argument("--seed", type=SEED, default=0)
    tutor.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: OUTPUT.ckpt.safetensors)")
    tutor.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    tutor.add_argument("--half", action="store_true", help="store weights as float16 (half the file size)")
    tutor.add_argument("--name", default=None, help="model name recorded in the file")
    tutor.add_argument("--overwrite", action="store_true")
    tutor.add_argument("--quiet", "-q", action="store_true")

    nuclei = sub.add_parser("nuclei", help="find the nuclei of dark-field images: one uint16 label image per input",
                            description="Nuclei as instance labels, by translation: each image is stained and the "
                                        "virtual H&E segmented (colour deconvolution and a watershed; nothing is "
                                        "downloaded). Labels are 0 for background, 1..N for the N nuclei.")
    nuclei.add_argument("input", type=Path, help="dark-field image file or a folder of them")
    nuclei.add_argument("--output", "-o", type=Path, required=True,
                        help="folder to write: <input name>.tif per input (uint16 labels, the input's size and pixel "
                             "size); a name ending in .zarr (OUT.ome.zarr) stains one whole slide into an OME-Zarr "
                             "store and writes its labels there, as the NGFF label image labels/nuclei")
    nuclei.add_argument("--model", "-m", type=options.model, default="dsd-unpaired", help="shipped model name or model file path")
    nuclei.add_argument("--method", choices=("auto", "adaptation", "tutorship"), default="auto",
                        help="adaptation: stain, then segment the virtual H&E; tutorship: a segmenter held in the model "
                             "file (no shipped model has one yet); auto: tutorship when the model has a segmenter")
    nuclei.add_argument("--stain", choices=("auto", "teacher", "student"), default="auto",
                        help="the stain to segment; auto: the teacher where the model has one (its nuclei measured "
                             "better for the DSD_U models: docs/benchmarks.md), else the student")
    nuclei.add_argument("--device", default="auto", choices=DEVICES)
    nuclei.add_argument("--precision", default="auto", choices=PRECISIONS)
    nuclei.add_argument("--adapt", choices=ADAPT_MODES, default="auto",
                        help="adaptation to another microscope, decided once for all the inputs (as stain does)")
    nuclei.add_argument("--min-area", type=options.integer(0, 100000, "an area in pixels"), default=None,
                        help="smallest nucleus kept, in pixels (default 20)")
    nuclei.add_argument("--min-distance", type=options.integer(1, 1000, "a distance in pixels"), default=None,
                        help="least distance between the centres of two touching nuclei, in pixels (default 4)")
    nuclei.add_argument("--chunk", type=options.integer(256, 4096, "a chunk side in pixels"), default=None,
                        help="OME-Zarr output: chunk side in pixels, 256..4096 (default 1024)")
    nuclei.add_argument("--resume", action="store_true",
                        help="OME-Zarr output: finish an interrupted run (staining, then labels)")
    nuclei.add_argument("--ngff", choices=("0.4", "0.5"), default=None,
                        help="OME-Zarr output: the NGFF version (default 0.4; --resume keeps the store's)")
    nuclei.add_argument("--overwrite", action="store_true", help="replace an output this tool wrote")
    nuclei.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every training command shares."""
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    # fp16 training would need loss scaling, which we do not do: not offered (devices.resolve_training_precision)
    parser.add_argument("--precision", default="auto", choices=[p for p in PRECISIONS if p != "fp16"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: OUTPUT.ckpt.safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--half", action="store_true", help="store weights as float16 (half the file size)")
    parser.add_argument("--name", default=None, help="model name recorded in the file")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", "-q", action="store_true")


# -- stain ---------------------------------------------------------------
def _inputs(path: Path) -> list[Path]:
    from digital_stain.io.images import broken_links, is_image_path, list_images

    if path.is_dir() and not path.name.lower().endswith(".zarr"):
        found = list_images(path)
        broken = broken_links(path)
        if broken:
            print(f"note: skipping {len(broken)} link(s) in {path} that lead nowhere (a missing target or a loop): "
                  f"{', '.join(broken[:10])}{' ...' if len(broken) > 10 else ''}", file=sys.stderr)
        if not found:
            raise InputError(f"{path} has no image files (PNG, TIFF, OME-Zarr).")
        return found
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if not is_image_path(path):
        raise InputError(f"{path} is not an image file this tool reads (PNG, JPEG, BMP, TIFF and BigTIFF, SVS, NDPI, OME-Zarr).")
    return [path]


def _is_zarr_output(path: Path) -> bool:
    return path.name.lower().endswith(".zarr")


def cmd_stain(args) -> int:
    from tqdm import tqdm

    from digital_stain.io.outputs import check_not_input, check_replaceable
    from digital_stain.stain.folder import stain_files
    from digital_stain.stain.model import StainModel
    from digital_stain.stain.tiling import check_tiling

    if _is_zarr_output(args.output):
        return cmd_stain_slide(args)
    for option, given in (("--resume", args.resume), ("--chunk", args.chunk is not None),
                          ("--ngff", args.ngff is not None),
                          ("--scheduler", args.scheduler is not None), ("--workers", args.workers is not None)):
        if given:
            raise InputError(f"{option} is for OME-Zarr output; give an output ending in .zarr (e.g. -o OUT.ome.zarr).")
    check_tiling(args.tile, args.overlap)  # each is checked at parse time; here, the two together
    inputs = _inputs(args.input)
    check_not_input(args.output, [args.input, *inputs])
    check_replaceable(args.output, overwrite=args.overwrite)  # before the model loads and the images are read
    model = StainModel.load(args.model, device=args.device)
    wanted = model.check_outputs(args.outputs.split(",") if args.outputs else None)
    single_file = (len(inputs) == 1 and not args.input.is_dir() and len(wanted) == 1
                   and args.output.suffix.lower() in (".png", ".tif", ".tiff"))
    fmt = args.format or ("tif" if single_file and args.output.suffix.lower().startswith(".tif") else "png")
    print(f"model {model.name} ({', '.join(model.outputs)}) on {model._device}; outputs: {', '.join(wanted)}",
          file=sys.stderr)
    for path in inputs:
        _note_whole_slide(path)
    shown = []
    bars: list = []

    def on_image(path, index, count):  # one bar of tiles per image; the folder's bar is below
        if bars:
            bars.pop().close()
        bar = tqdm(total=100, desc=path.name, disable=args.quiet, unit="%", leave=False)
        bars.append(bar)
        done = [0]

        def progress(d, t, bar=bar, done=done):
            bar.update(d - done[0])
            done[0] = d

        return progress

    with tqdm(total=len(inputs), desc="images", disable=args.quiet or len(inputs) == 1, unit="image") as folder_bar:
        result = stain_files(
            model, inputs, args.output, wanted, single_file=single_file, fmt=fmt, tile=args.tile, overlap=args.overlap,
            precision=args.precision, compile=args.compile, adapt=args.adapt or "auto", overwrite=args.overwrite,
            progress=lambda done, total: folder_bar.update(done - folder_bar.n), on_image=on_image,
            notify=lambda message: tqdm.write(message, file=sys.stderr),
            on_stained=(lambda path, image, results: shown.append((path.name, image, results))) if args.view else None)
    for bar in bars:
        bar.close()
    failed, adaptation = result.skipped, result.adaptation
    print(f"wrote {args.output}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(inputs)} file(s) were skipped:\n  " + "\n  ".join(failed), file=sys.stderr)
    if args.view:
        _view(shown, model, adaptation)
    return 1 if failed else 0


# Planes above this many pixels are better written as OME-Zarr than stained in memory (a note says so).
WHOLE_SLIDE_PIXELS = 8192 * 8192


def _note_whole_slide(path: Path) -> None:
    """Before a large TIFF or OME-Zarr is loaded whole, say that OME-Zarr output would stain it in bounded memory."""
    from digital_stain.io.images import read_image

    if not path.name.lower().endswith((".tif", ".tiff", ".zarr")):
        return
    shape = read_image(path, lazy=True).shape  # metadata only
    plane = shape[-3:-1] if len(shape) >= 3 and shape[-1] in (3, 4) else shape[-2:]
    if plane[0] * plane[1] > WHOLE_SLIDE_PIXELS:
        stem = path.name[: -len(".ome.zarr")] if path.name.lower().endswith(".ome.zarr") else path.stem
        print(f"note: {path.name} is {plane[0]} x {plane[1]} px and is stained in memory (several GB). For whole "
              f"slides write OME-Zarr instead (chunk by chunk, bounded memory, resumable): "
              f"-o {stem}-stained.ome.zarr", file=sys.stderr)


@contextlib.contextmanager
def _maybe_cluster(args):
    """A dask.distributed client for ``--scheduler``/``--workers``, else None (this process does the work)."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    from digital_stain.slide.cluster import cluster_client

    with cluster_client(args.scheduler, args.workers) as client:
        where = args.scheduler or f"a local cluster of {args.workers} worker process(es)"
        print(f"running the chunks on {where} ({len(client.scheduler_info()['workers'])} worker(s) now)",
              file=sys.stderr)
        yield client


def cmd_stain_slide(args) -> int:
    """``stain INPUT -o OUT.ome.zarr``: :func:`digital_stain.slide.run.stain_to_zarr`, with a progress bar and Ctrl-C."""
    from tqdm import tqdm

    from digital_stain.stain.model import StainModel
    from digital_stain.slide.store import looks_like_zarr
    from digital_stain.slide.run import open_source, stain_to_zarr

    path = args.input
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir() and not path.name.lower().endswith(".zarr") and not looks_like_zarr(path):
        raise InputError(f"{path} is a folder of images; an OME-Zarr output holds one image (a whole slide). "
                         "Give one image or OME-Zarr store as INPUT, or write the folder to a folder (-o OUT/).")
    if args.format is not None:
        raise InputError(f"--format {args.format} does not apply to an OME-Zarr output ({args.output}); "
                         "leave it out, or give an output folder or image file.")
    chunk = args.chunk or 1024
    source = open_source(path, chunk=chunk)
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    model = StainModel.load(args.model, device=args.device)
    wanted = model.check_outputs(args.outputs.split(",") if args.outputs else None)
    print(f"model {model.name} ({', '.join(model.outputs)}) on {model._device}; outputs: {', '.join(wanted)}; "
          f"{source.array.shape[0]} x {source.array.shape[1]} px in {chunk}-px chunks", file=sys.stderr)
    bar = tqdm(total=None, disable=args.quiet, unit="chunk", desc=path.name)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    stop = threading.Event()
    try:
        with _ctrl_c_sets(stop), _maybe_cluster(args) as client:
            result = stain_to_zarr(model, source, args.output, wanted, chunk=chunk, overlap=args.overlap,
                                   device=None, precision=args.precision, resume=args.resume,
                                   overwrite=args.overwrite, progress=progress, stop=stop, client=client,
                                   compile=args.compile, adapt=args.adapt, ngff=args.ngff)
    except KeyboardInterrupt:
        print(f"aborted. {args.output} can be finished with the same command and --resume.", file=sys.stderr)
        return 130
    finally:
        bar.close()
    for note in result.notes[len(source.notes):]:
        print(f"note: {note}", file=sys.stderr)
    print(f"slide: {result.adaptation.message(model.name)}", file=sys.stderr)
    if result.stopped:
        print(f"stopped: {result.units_skipped + result.units_done} of {result.units_total} chunks are written. "
              f"Finish with the same command and --resume.", file=sys.stderr)
        return 130
    if result.units_done == 0 and result.units_skipped:
        print(f"{args.output} is already complete; nothing to do.", file=sys.stderr)
    else:
        kept = f", {result.units_skipped} were done before" if result.units_skipped else ""
        levels = " ".join(f"{y}x{x}" for y, x in result.levels)
        print(f"wrote {args.output} ({', '.join(result.outputs)}; levels {levels}; {result.units_done} chunks "
              f"in {result.seconds:.0f} s{kept})", file=sys.stderr)
    if args.view:
        _view_slide(path, args.output)
    return 0


@contextlib.contextmanager
def _ctrl_c_sets(stop: threading.Event,
                 message: str = "stopping after the current chunk (the store stays resumable)"):
    """Inside the block, a first Ctrl-C (or SIGTERM) sets ``stop`` and prints ``message`` (the work ends
    cleanly); a second raises KeyboardInterrupt."""
    import signal

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{message} (Ctrl-C again aborts)...", file=sys.stderr)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


@contextlib.contextmanager
def _terminate_interrupts():
    """SIGTERM (a job scheduler, ``kill``) ends the command as Ctrl-C does: the ``finally`` blocks run, so
    staged files are removed and locks released (the default would end the process on the spot)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _napari_or_none():
    """napari, when there is a display to show it on and it is installed; else None, saying why."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")):
        print("no display: not opening napari (the outputs are on disk).", file=sys.stderr)
        return None
    try:
        import napari
    except ImportError:
        print("napari is not installed: pip install 'napari-digital-stain[napari]' to view.", file=sys.stderr)
        return None
    return napari


def _view_slide(darkfield: Path, stained: Path) -> None:
    """The finished store's outputs (and the dark-field slide, when it is OME-Zarr) side by side, as pyramids."""
    napari = _napari_or_none()
    if napari is None:
        return
    from digital_stain._napari.layers import show_slide

    viewer = napari.Viewer(title="napari-digital-stain")
    if not show_slide(viewer, darkfield, stained):
        print(f"note: {darkfield.name} is not OME-Zarr, so it is not shown beside the outputs (it has no "
              "pyramid to show it by).", file=sys.stderr)
    napari.run()


def _view(shown, model, adaptation) -> None:
    napari = _napari_or_none()
    if napari is None:
        return
    from digital_stain._napari.layers import set_side_by_side, show_output

    viewer = napari.Viewer(title="napari-digital-stain")
    for name, image, results in shown[:8]:
        source = viewer.add_image(image, name=name, rgb=image.ndim == 3 and image.shape[-1] in (3, 4))
        for position, (out, array) in enumerate(results.items()):
            show_output(viewer, source, out, array, {"digital_stain": {**model.describe(), "output": out,
                                                                       "adaptation": adaptation.describe()}},
                        multiscale=False, position=position)
    set_side_by_side(viewer, True, columns=1 + len(shown[0][2]) if shown else None)  # a row per image
    viewer.window.add_plugin_dock_widget("napari-digital-stain", "Digitally stain")
    napari.run()


# -- train-teacher ---------------------------------------------------------
def cmd_train_teacher(args) -> int:
    from digital_stain.core.enhance import Enhancer
    from digital_stain.stain.model import StainModel, provenance
    from digital_stain.train.data import skipped_note
    from digital_stain.train.teacher import TeacherConfig, train_teacher

    _refuse_existing(args, resuming=args.resume)
    init = StainModel.load(args.init) if args.init else None
    if args.darkfield is None and init is None:
        raise InputError("give --darkfield (a folder of dark-field images for the enhancer) or --init MODEL.")
    enhancer = Enhancer.from_folders(args.darkfield, args.stained) if args.darkfield else init.enhancer
    cfg = TeacherConfig(seed=args.seed, device=args.device, precision=args.precision)
    for key in ("steps", "batch", "crop", "width", "depth", "input_noise"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if init is not None and init.teacher is not None:
        cfg.width, cfg.depth = init.teacher.config["width"], init.teacher.config["depth"]
    init_state = init.teacher.state_dict() if init is not None and init.teacher is not None else None
    (net, result), seconds = _run_training(args, "teacher", lambda checkpoint, progress, stop: train_teacher(
        args.stained, cfg, checkpoint=checkpoint, resume=args.resume, progress=progress, stop=stop,
        init_state=init_state))
    meta = {
        "name": args.name or args.output.stem,
        "description": "histogram-matching enhancer + colorization teacher" + (" + student" if init and init.student else ""),
        "provenance": provenance(
            command=_command(args),
            stained=str(args.stained), darkfield=str(args.darkfield) if args.darkfield else None,
            init=str(args.init) if args.init else None,
            teacher=dict(steps=result.steps_done, best_step=result.best_step,
                         val_l1_ab=result.best_score, seconds=seconds,
                         cancelled=result.cancelled, config=vars(cfg), skipped=result.skipped),
        ),
    }
    if result.skipped:
        print(f"note: {skipped_note(result.skipped, 'H&E', args.stained)}", file=sys.stderr)
    model = StainModel(enhancer, net, init.student if init is not None else None, meta)
    return _save_trained(args, model, result, f"best validation L1(ab) {result.best_score}")


def _default_size(device: str) -> str:
    """The paper's student on a CUDA GPU; the CPU preset elsewhere (see ``train.finetune.default_size``)."""
    from digital_stain.train.finetune import default_size

    return default_size(device)


def cmd_train(args) -> int:
    """``digital-stain train``: :func:`digital_stain.train.finetune.fine_tune` (as the napari widget), then save."""
    from digital_stain.train.finetune import fine_tune, rejected_path

    _refuse_existing(args, resuming=args.resume)
    paired_only = {"--reg-warmup": args.reg_warmup, "--lambda-smooth": args.lambda_smooth,
                   "--reg-lr-scale": args.reg_lr_scale}
    given = [flag for flag, value in paired_only.items() if value is not None]
    if given and args.paired is not True:
        raise InputError(f"{', '.join(given)} set the registration network of paired training: add --paired "
                         f"(with a folder of adjacent sections as --stained), or leave {', '.join(given)} out.")
    overrides = {k: v for k, v in dict(ema_decay=args.ema, upsample=args.upsample, reg_warmup=args.reg_warmup,
                                       lambda_smooth=args.lambda_smooth, reg_lr_scale=args.reg_lr_scale,
                                       lambda_structure=args.lambda_structure).items()
                 if v is not None}
    tuned, _ = _run_training(args, "student", lambda checkpoint, progress, stop: fine_tune(
        args.init, args.darkfield, args.stained, size=args.size, steps=args.steps, crop=args.crop, batch=args.batch,
        lambda_kd=args.lambda_kd, seed=args.seed, device=args.device, precision=args.precision,
        from_scratch=args.from_scratch, checkpoint=checkpoint, resume=args.resume,
        name=args.name or args.output.stem, command=_command(args), progress=progress, stop=stop,
        on_note=lambda text: print(text, file=sys.stderr), paired=args.paired,
        config_overrides=overrides, teacher_steps=args.teacher_steps, refit=args.refit,
        check=not args.no_check))
    result = tuned.result
    if tuned.model is None:
        print(f"{tuned.summary}; nothing written. Continue with the same command and --resume.", file=sys.stderr)
        return 130
    if not tuned.accepted:
        rejected = rejected_path(args.output)
        tuned.model.save(rejected, half=args.half, overwrite=True)
        raise InputError(
            f"the fine-tuned model is not better than {tuned.model.metadata['provenance']['student']['init']} on "
            f"your held-out images, so {args.output} was not written. {tuned.check.summary()}. Check that "
            f"--stained holds H&E images and --darkfield the matching dark-field (not swapped, not bright-field), "
            f"or train longer (--steps). The rejected model is in {rejected} for a look (not for use).")
    return _save_trained(args, tuned.model, result, tuned.summary)


# -- evaluate / synth ------------------------------------------------------
def _paired(images, reference_dir: Path):
    """Reference images matched to ``images`` by file stem; refused when any is missing."""
    from digital_stain.train.data import load_rgb_folder

    references = load_rgb_folder(reference_dir, min_side=1, kind="H&E")
    by_stem = {Path(n).stem: im for n, im in zip(references.names, references.images)}
    missing = [n for n in images.names if Path(n).stem not in by_stem]
    if missing:
        raise InputError(f"{len(missing)} dark-field image(s) have no reference of the same name in {reference_dir} "
                         f"(e.g. {', '.join(missing[:3])}); references are paired by file name.")
    paired = [by_stem[Path(n).stem] for n in images.names]
    for name, image, reference in zip(images.names, images.images, paired):
        if image.shape[:2] != reference.shape[:2]:
            raise InputError(f"{name}: dark-field {image.shape[:2]} and reference {reference.shape[:2]} differ in size.")
    return paired


def cmd_evaluate(args) -> int:
    import json

    from tqdm import tqdm

    from digital_stain.quality.evaluate import evaluate_model, format_table
    from digital_stain.quality.metrics import lab_pixels
    from digital_stain.stain.model import StainModel
    from digital_stain.io.outputs import check_not_input, check_replaceable
    from digital_stain.train.data import load_rgb_folder

    if args.json:  # before the work, so that it never ends in a refused write
        check_not_input(args.json, [p for p in (args.darkfield, args.reference, args.stained) if p is not None])
        check_replaceable(args.json, overwrite=args.overwrite)
    darkfield = load_rgb_folder(args.darkfield, min_side=1, kind="dark-field")
    references = _paired(darkfield, args.reference) if args.reference else None
    style = None
    if args.stained:
        stained = load_rgb_folder(args.stained, min_side=1, kind="H&E")
        style = lab_pixels(np.concatenate([im.reshape(-1, 3) for im in stained.images])[None])
    model = StainModel.load(args.model, device=args.device)
    outputs = model.check_outputs(args.outputs.split(",") if args.outputs else None)
    adaptation = model.adaptation(darkfield.images, args.adapt)
    print(f"folder: {adaptation.message(model.name)}", file=sys.stderr)
    bar = tqdm(total=len(darkfield.images), disable=args.quiet, unit="image", desc="staining")
    results = evaluate_model(model, darkfield.images, outputs, references, style, adapt=adaptation,
                             progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    print(f"model {model.name}, {darkfield.summary()}")
    print(format_table(results))
    if args.json:
        from digital_stain.io.images import atomic_path
        from digital_stain.io.outputs import software

        with atomic_path(args.json, overwrite=args.overwrite) as staging:
            staging.write_text(json.dumps({"written_by": software(), **model.describe(), "darkfield": str(args.darkfield),
                                           "adaptation": adaptation.describe(), "scores": results}, indent=2))
    return 0


def cmd_synth(args) -> int:
    from digital_stain.io.images import atomic_path, write_image
    from digital_stain.stain.model import StainModel
    from digital_stain.io.outputs import check_not_input, check_replaceable
    from digital_stain.quality.synth import darkfield_tint, synthesize_darkfield
    from digital_stain.train.data import load_rgb_folder

    check_not_input(args.output, [p for p in (args.stained, args.tint_from) if p is not None])
    check_replaceable(args.output, overwrite=args.overwrite)
    stained = load_rgb_folder(args.stained, min_side=1, kind="H&E")
    tint = (1.0, 1.0, 1.0)
    if args.tint_from:
        tint = darkfield_tint(load_rgb_folder(args.tint_from, min_side=1, kind="dark-field").images)
    enhancer = StainModel.load(args.model, device="cpu").enhancer
    with atomic_path(args.output, overwrite=args.overwrite) as staging:
        staging.mkdir(parents=True)
        for i, (name, image) in enumerate(zip(stained.names, stained.images)):
            rng = np.random.default_rng([args.seed, i])
            darkfield = synthesize_darkfield(image, enhancer, tint, blur_sigma=args.blur, noise_std=args.noise, rng=rng)
            write_image(staging / f"{Path(name).stem}.png", darkfield, rgb=True)
    print(f"wrote {len(stained.images)} synthetic dark-field image(s) to {args.output}", file=sys.stderr)
    return 0


def cmd_nuclei(args) -> int:
    from tqdm import tqdm

    from digital_stain.nuclei.files import find_nuclei_files
    from digital_stain.nuclei.find import choose_method
    from digital_stain.stain.model import StainModel
    from digital_stain.stain.settings import StainSettings

    if _is_zarr_output(args.output):
        return cmd_nuclei_slide(args)
    for option, given in (("--resume", args.resume), ("--chunk", args.chunk is not None),
                          ("--ngff", args.ngff is not None)):
        if given:
            raise InputError(f"{option} is for OME-Zarr output; give an output ending in .zarr (e.g. -o OUT.ome.zarr).")
    if args.output.suffix.lower() in (".tif", ".tiff", ".png"):
        raise InputError(f"--output {args.output}: give a folder; each input's labels are written into it as "
                         "<name>.tif (or an OME-Zarr store, -o OUT.ome.zarr, for one whole slide).")
    inputs = _inputs(args.input)
    nuclei = _nuclei_settings(args)
    model = StainModel.load(args.model, device=args.device)
    method = choose_method(model, args.method)  # before any image is read
    print(f"model {model.name} on {model._device}; nuclei by {method} ({len(inputs)} image(s))", file=sys.stderr)
    bar = tqdm(total=len(inputs), disable=args.quiet, unit="image")
    try:
        result = find_nuclei_files(model, inputs, args.output, method=method, stain=args.stain, nuclei=nuclei,
                                   settings=StainSettings(precision=args.precision), adapt=args.adapt,
                                   overwrite=args.overwrite, progress=lambda done, total: bar.update(done - bar.n),
                                   notify=lambda message: print(message, file=sys.stderr))
    finally:
        bar.close()
    for reason in result.skipped:
        print(f"skipped {reason}", file=sys.stderr)
    total = sum(result.counts.values())
    print(f"wrote {len(result.written)} label image(s) to {args.output}: {total} nuclei "
          f"({', '.join(f'{name} {count}' for name, count in list(result.counts.items())[:5])}"
          f"{' ...' if len(result.counts) > 5 else ''})", file=sys.stderr)
    return 1 if result.skipped else 0


def cmd_train_nuclei(args) -> int:
    from digital_stain._sample_data import sample_paths
    from digital_stain.io.images import list_images, read_image
    from digital_stain.quality.synth import darkfield_tint
    from digital_stain.stain.model import StainModel, provenance
    from digital_stain.train.nuclei import NucleiConfig, train_segmenter

    _refuse_existing(args, resuming=args.resume)
    init = StainModel.load(args.init, device="cpu")
    stained, masks, names = _images_with_masks(args.stained, args.masks)
    tint_images = list_images(args.tint_from) if args.tint_from else sample_paths("darkfield")
    if not tint_images:
        raise InputError(f"--tint-from {args.tint_from} has no images; give a folder of your dark-field images.")
    tint = darkfield_tint(np.asarray(read_image(path)) for path in tint_images[:40])
    cfg = NucleiConfig(seed=args.seed, translator=args.translate)
    for key in ("steps", "batch", "crop"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    from digital_stain.nuclei.tutor import translator_of

    how = {"reverse": "reverse generator F", "enhancer": "enhancer's inverse"}[translator_of(init, args.translate)]
    print(f"tutorship on {len(names)} H&E image(s) with masks, translated by {init.name}'s {how}", file=sys.stderr)
    (net, result), seconds = _run_training(args, "segmenter", lambda checkpoint, progress, stop: train_segmenter(
        init, stained, masks, names, cfg, tint=tint, checkpoint=checkpoint, resume=args.resume, progress=progress,
        stop=stop))
    meta = {**init.metadata, "name": args.name or args.output.stem,
            "description": init.metadata.get("description", "") + " + nuclei segmenter (tutorship)",
            "segmenter_provenance": provenance(
                command=_command(args), stained=str(args.stained), masks=str(args.masks), init=str(args.init),
                tint=[float(v) for v in tint], steps=result.steps_done, best_step=result.best_step,
                val_dice=result.best_score, seconds=seconds, cancelled=result.cancelled, config=vars(cfg))}
    model = StainModel(init.enhancer, init.teacher, init.student, meta, segmenter=net, reverse=init.reverse)
    return _save_trained(args, model, result, f"best validation nuclei Dice {result.best_score}")


def _images_with_masks(stained: Path, masks: Path) -> tuple[list, list, list]:
    """H&E images and their masks, paired by name; a folder that is missing or an image without a mask is refused."""
    from digital_stain.io.images import list_images, read_image

    for folder, what in ((stained, "--stained"), (masks, "--masks")):
        if not folder.is_dir():
            raise InputError(f"{what} {folder} is not a folder.")
    by_stem = {path.stem: path for path in list_images(masks)}
    images, labels, names, missing = [], [], [], []
    for path in list_images(stained):
        if path.stem not in by_stem:
            missing.append(path.name)
            continue
        images.append(np.asarray(read_image(path))[..., :3])
        labels.append(np.asarray(read_image(by_stem[path.stem])))
        names.append(path.name)
    if missing:
        raise InputError(f"{len(missing)} H&E image(s) in {stained} have no mask of the same name in {masks} "
                         f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); give a mask for each.")
    if not names:
        raise InputError(f"{stained} has no H&E images (PNG, TIFF).")
    return images, labels, names


def _nuclei_settings(args):
    from digital_stain.nuclei.segment import NucleiSettings

    return NucleiSettings(**{key: value for key, value in (("min_area", args.min_area),
                                                          ("min_distance", args.min_distance)) if value is not None})


def cmd_nuclei_slide(args) -> int:
    from tqdm import tqdm

    from digital_stain.io.images import open_source
    from digital_stain.nuclei.find import choose_method
    from digital_stain.nuclei.slide import check_slide_input, find_nuclei_slide
    from digital_stain.stain.model import StainModel

    check_slide_input(args.input)
    chunk = args.chunk or 1024
    source = open_source(args.input, chunk=chunk)
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    model = StainModel.load(args.model, device=args.device)
    method = choose_method(model, args.method)
    print(f"model {model.name} on {model._device}; nuclei by {method}; {source.array.shape[0]} x "
          f"{source.array.shape[1]} px in {chunk}-px chunks", file=sys.stderr)
    bar = tqdm(total=None, disable=args.quiet, unit="chunk", desc=args.input.name)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    stop = threading.Event()
    try:
        with _ctrl_c_sets(stop):
            result = find_nuclei_slide(model, source, args.output, method=method, stain=args.stain,
                                       nuclei=_nuclei_settings(args),
                                       resume=args.resume, overwrite=args.overwrite, progress=progress, stop=stop,
                                       chunk=chunk, device=None, precision=args.precision, adapt=args.adapt,
                                       ngff=args.ngff)
    finally:
        bar.close()
    print(f"slide: {result.stained.adaptation.message(model.name)}", file=sys.stderr)
    if result.stopped:
        print("stopped; finish with the same command and --resume.", file=sys.stderr)
        return 130
    how = "the model's segmenter" if result.threshold is None else f"threshold {result.threshold:.3f}"
    print(f"wrote {args.output}: {result.count} nuclei, labels in {args.output / 'labels' / 'nuclei'} ({how})",
          file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from digital_stain.io.export import export_model
    from digital_stain.io.images import read_image
    from digital_stain.io.outputs import check_not_input, check_replaceable
    from digital_stain.stain.model import StainModel

    fmt = args.format or ("torchscript" if args.output.suffix.lower() in (".pt", ".ts") else "onnx")
    if args.part == "student" and args.statistics_from is None:
        raise InputError("exporting the student needs --statistics-from IMAGE: its norm statistics are frozen into "
                         "the file, and must come from a dark-field image like the ones it will stain.")
    check_not_input(args.output, [p for p in (args.statistics_from,) if p is not None])
    check_replaceable(args.output, overwrite=args.overwrite)
    image = np.asarray(read_image(args.statistics_from)) if args.statistics_from is not None else None
    model = StainModel.load(args.model, device="cpu")
    export_model(model, args.output, format=fmt, part=args.part, statistics_from=image, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.output}: the {args.part} of {model.name} as {fmt} "
              "(docs/usage.md, 'Export', shows how to run it tiled)", file=sys.stderr)
    return 0


def _command(args) -> str:
    """The command line as given, for a model's provenance."""
    return "digital-stain " + " ".join(shlex.quote(a) for a in args.argv)


def _refuse_existing(args, resuming: bool = False) -> None:
    """Checked before any work, so a long training never ends in a refused write.

    A resumed run may replace the model file its stopped run wrote.
    """
    from digital_stain.io.outputs import check_replaceable

    from digital_stain.train.finetune import teacher_checkpoint

    if resuming:
        checkpoint = _checkpoint_path(args)
        if not checkpoint.exists() and not teacher_checkpoint(checkpoint).exists():
            raise InputError(f"--resume: there is no checkpoint at {checkpoint}, so there is nothing to resume. "
                             "Leave out --resume to start a new training (or give --checkpoint PATH).")
        return
    check_replaceable(args.output, overwrite=args.overwrite)


def _checkpoint_path(args) -> Path:
    return args.checkpoint or args.output.with_name(args.output.name + ".ckpt.safetensors")


def _run_training(args, desc: str, work):
    """Run ``work(checkpoint, progress, stop)`` with a progress bar per stage and clean Ctrl-C; return (its result, seconds)."""
    from tqdm import tqdm

    checkpoint = _checkpoint_path(args)
    stop = threading.Event()
    bars: dict = {}  # stage -> its bar, made at its first report with a total

    def progress(p):
        stage = p.stage or desc
        if p.total and stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=p.total, disable=args.quiet, unit="step", desc=stage)
        bar = bars.get(stage)
        if p.total and bar is not None:
            bar.total, bar.n = p.total, p.step
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in p.losses.items()}, "img/s": f"{p.images_per_s:.1f}"})
        if p.message:
            text = f"{stage} step {p.step}: {p.message}" if p.total and stage in ("teacher", "student") else p.message
            (bar.write if bar is not None else tqdm.write)(text, file=sys.stderr)

    started = time.time()
    try:
        with _ctrl_c_sets(stop, "stopping: finishing the current step and keeping the best state"):
            result = work(checkpoint, progress, stop)
    finally:
        for bar in bars.values():
            bar.close()
    return result, round(time.time() - started, 1)


def _save_trained(args, model, result, summary: str) -> int:
    """Write the trained model (also after a stop: the best state so far) and report; 130 if stopped."""
    try:
        model.save(args.output, half=args.half, overwrite=args.overwrite or args.resume)
    except OSError as err:  # after the training: say where its state is kept
        raise InputError(f"cannot write {args.output} ({err.strerror or err}). The training's checkpoint is kept "
                         f"in {_checkpoint_path(args)}: fix the cause (space, permissions), then run the same "
                         "command with --resume to write the model without training again.") from err
    state = "stopped early; wrote the best state so far to" if result.cancelled else "wrote"
    print(f"{state} {args.output} (step {result.steps_done}, {summary})", file=sys.stderr)
    return 130 if result.cancelled else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in model provenance
    try:
        with _terminate_interrupts():
            return _dispatch(args)
    except InputError as err:
        print(f"digital-stain: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk, a vanished file: say which path and why
        where = f" {err.filename}" if err.filename else ""
        print(f"digital-stain: error: cannot access{where}: {err.strerror or err}. Nothing half-written was left; "
              "check the path, its permissions and the free space, then run the command again.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        output = getattr(args, "json", None) or getattr(args, "output", None)
        print(f"\ndigital-stain: interrupted; {output} was not written (nothing half-written is left)."
              if output is not None else "\ndigital-stain: interrupted.", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "stain":
        return cmd_stain(args)  # locks its output itself (a whole slide: stain_to_zarr does)
    if args.command == "nuclei":
        return cmd_nuclei(args)  # locks its output itself (find_nuclei_files)
    from digital_stain.io.outputs import output_lock

    if args.command == "evaluate":
        with output_lock(args.json) if args.json else contextlib.nullcontext():  # taken first: fails early
            return cmd_evaluate(args)

    with output_lock(args.output):  # one writer at a time (a model file and its checkpoints, a folder)
        if args.command == "train-teacher":
            return cmd_train_teacher(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "train-nuclei":
            return cmd_train_nuclei(args)
        if args.command == "export":
            return cmd_export(args)
        return cmd_synth(args)


if __name__ == "__main__":
    sys.exit(main())
