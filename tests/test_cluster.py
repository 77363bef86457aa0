"""Whole slides on a dask.distributed LocalCluster of real worker processes (cluster.py)."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from digital_stain._sample_data import sample_paths
from digital_stain.core.arrays import InputError
from digital_stain.cli import main
from digital_stain.slide.cluster import cluster_client
from digital_stain.slide.run import stain_to_zarr
from stores import assert_same_store as _assert_same_store

OUTPUTS = ["enhanced", "student"]
MODEL = "dsd-unpaired-fast"


def _mosaic(height: int, width: int) -> np.ndarray:
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sample_paths("darkfield")]
    rows = []
    for i in range(-(-height // 256)):
        rows.append(np.concatenate([np.rot90(tiles[(i + j) % 3], i + j) for j in range(-(-width // 256))], axis=1))
    return np.ascontiguousarray(np.concatenate(rows)[:height, :width])


@pytest.fixture(scope="module")
def slide_and_reference(tmp_path_factory):
    """A 768 x 1024 BigTIFF slide and its single-process OME-Zarr stain (chunks of 256 px)."""
    folder = tmp_path_factory.mktemp("cluster")
    slide = folder / "slide.tif"
    tifffile.imwrite(slide, _mosaic(768, 1024), bigtiff=True, tile=(256, 256), photometric="rgb")
    reference = folder / "reference.ome.zarr"
    result = stain_to_zarr(MODEL, slide, reference, OUTPUTS, chunk=256, device="cpu")
    assert result.complete
    return slide, reference


def test_a_local_cluster_writes_the_bytes_of_a_single_process_run(slide_and_reference, tmp_path):
    slide, reference = slide_and_reference
    seen = []
    with cluster_client(workers=2) as client:
        result = stain_to_zarr(MODEL, slide, tmp_path / "out.ome.zarr", OUTPUTS, chunk=256, device="cpu",
                               client=client, progress=lambda done, total: seen.append((done, total)))
        # every worker process loaded the model once and kept it
        loaded = client.run(lambda: sorted(__import__("digital_stain.slide.cluster").slide.cluster._MODELS))
    assert result.complete and result.units_done == result.units_total
    assert seen[-1] == (result.units_total, result.units_total)
    assert all(len(models) <= 1 for models in loaded.values()) and any(loaded.values())
    _assert_same_store(reference, tmp_path / "out.ome.zarr")


@pytest.mark.slow
def test_a_killed_worker_s_chunks_are_recomputed(slide_and_reference, tmp_path):
    slide, reference = slide_and_reference
    killed = threading.Event()
    with cluster_client(workers=2) as client:
        pids = client.run(os.getpid)

        def progress(done, total):
            if done == 3 and not killed.is_set():  # mid-run: 9 of 12 level-0 chunks still to do
                os.kill(next(iter(pids.values())), signal.SIGKILL)
                killed.set()

        result = stain_to_zarr(MODEL, slide, tmp_path / "out.ome.zarr", OUTPUTS, chunk=256, device="cpu",
                               client=client, progress=progress)
        deadline = time.time() + 60  # the nanny restarts the killed process
        while len(client.scheduler_info()["workers"]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert set(client.run(os.getpid).values()) != set(pids.values())
    assert killed.is_set() and result.complete
    _assert_same_store(reference, tmp_path / "out.ome.zarr")


def test_a_stopped_cluster_run_resumes_to_the_same_bytes(slide_and_reference, tmp_path):
    slide, reference = slide_and_reference
    stop = threading.Event()
    out = tmp_path / "out.ome.zarr"
    with cluster_client(workers=1) as client:
        first = stain_to_zarr(MODEL, slide, out, OUTPUTS, chunk=256, device="cpu", client=client, stop=stop,
                              progress=lambda done, total: done >= 2 and stop.set())
        assert first.stopped and not first.complete
        second = stain_to_zarr(MODEL, slide, out, OUTPUTS, chunk=256, device="cpu", client=client, resume=True)
    assert second.complete and second.units_skipped >= 2
    _assert_same_store(reference, out)


def test_cli_workers_option(slide_and_reference, tmp_path, capfd):
    slide, reference = slide_and_reference
    out = tmp_path / "cli.ome.zarr"
    code = main(["stain", str(slide), "-o", str(out), "--model", MODEL, "--outputs", ",".join(OUTPUTS),
                 "--chunk", "256", "--device", "cpu", "--workers", "2", "--quiet"])
    assert code == 0
    err = capfd.readouterr().err  # the file descriptors: the workers' own processes print there too
    assert "local cluster of 2 worker" in err
    assert "Traceback" not in err and "heartbeat" not in err, err  # the cluster is closed cleanly
    _assert_same_store(reference, out)


def test_local_workers_ask_for_huge_pages_with_their_thread_count(monkeypatch):
    """The workers are processes of ours: PyTorch's huge pages (hostmem.py) go into their environment,
    while this process's environment is left as it is."""
    from digital_stain import hostmem

    monkeypatch.delenv(hostmem.ENVIRONMENT, raising=False)

    def worker():
        import torch

        block = torch.ones(64 << 20, dtype=torch.uint8)  # page-aligned only when huge pages are asked for
        return os.environ.get(hostmem.ENVIRONMENT), os.environ.get("OMP_NUM_THREADS"), block.data_ptr() % 4096

    with cluster_client(workers=1) as client:
        seen = list(client.run(worker).values())
    assert seen == [("1", str(os.cpu_count() or 1), 0)]
    assert hostmem.ENVIRONMENT not in os.environ


def test_cluster_options_are_checked(tmp_path, capsys):
    with pytest.raises(InputError, match="not both"):
        with cluster_client("tcp://127.0.0.1:1", 2):
            pass
    with pytest.raises(InputError, match="no dask scheduler answered"):
        with cluster_client("tcp://127.0.0.1:9", timeout=2):
            pass
    code = main(["stain", str(sample_paths("darkfield")[0]), "-o", str(tmp_path / "x.png"), "--workers", "2"])
    assert code == 2 and "--workers is for OME-Zarr" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
