"""Out-of-memory fallback: smaller tiles first, then the CPU; other errors pass through."""

import numpy as np
import pytest
import torch

from digital_stain.stain.oom import is_out_of_memory, stain_with_fallback


class _FailsOverTiles(torch.nn.Module):
    """Fault injection around a real network: inputs over ``limit`` px raise the CUDA OOM error."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit
        self.size_multiple, self.min_size, self.config = net.size_multiple, net.min_size, net.config

    def forward(self, x):
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (test)")
        return self.net(x)


def test_recognises_cuda_and_mps_out_of_memory_only():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_tiles_are_halved_until_they_fit(tiny_model, darkfield_tile):
    image = np.tile(darkfield_tile, (3, 3, 1))
    expected = tiny_model.stain(image, ["teacher"], tile=256, precision="fp32")["teacher"]
    tiny_model.teacher = _FailsOverTiles(tiny_model.teacher, 256)
    said = []
    results, used = stain_with_fallback(tiny_model, image, ["teacher"], tile=1024, precision="fp32",
                                        notify=said.append)
    assert used["tile"] == 256 and used["device"] == "cpu" and used["fallbacks"] == said
    assert said[0].endswith("retrying with 512-px tiles.") and "1024-px" in said[0]
    np.testing.assert_allclose(results["teacher"], expected, atol=1e-6)


def test_out_of_memory_at_the_smallest_cpu_tile_is_a_clear_error(tiny_model, darkfield_tile):
    tiny_model.teacher = _FailsOverTiles(tiny_model.teacher, 64)
    with pytest.raises(MemoryError, match="ran out of memory while staining"):
        stain_with_fallback(tiny_model, np.tile(darkfield_tile, (2, 2, 1)), ["teacher"], tile=512, min_tile=256)


def test_other_errors_are_not_swallowed(tiny_model, darkfield_tile):
    class Broken(_FailsOverTiles):
        def forward(self, x):
            raise RuntimeError("a real bug")

    tiny_model.teacher = Broken(tiny_model.teacher, 0)
    with pytest.raises(RuntimeError, match="a real bug"):
        stain_with_fallback(tiny_model, darkfield_tile, ["teacher"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_that_cannot_fit_the_smallest_tile_hands_over_to_the_cpu(tiny_model, darkfield_tile):
    class FailsOnTheGpu(_FailsOverTiles):
        def forward(self, x):
            if x.is_cuda:
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return self.net(x)

    tiny_model.teacher = FailsOnTheGpu(tiny_model.teacher, 0)
    tiny_model.to("cuda")
    said = []
    _, used = stain_with_fallback(tiny_model, darkfield_tile, ["teacher"], tile=256, device="cuda", notify=said.append)
    assert used["device"] == "cpu" and "on the CPU instead" in said[-1]
