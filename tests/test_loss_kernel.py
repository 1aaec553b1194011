"""The fused Triton kernel of the feature-mixing loss against its PyTorch formulation.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton decorates the
kernels, so the check runs in a subprocess); on a GPU the compiled kernels are checked in bf16 and inside
a captured CUDA graph, as the bundle trains.
"""

import pytest
import torch

from conftest import HAVE_TRITON, needs_triton, run_in_triton_interpreter, triton_interpreter_check
from fias_monai.losses import FeatureMixingLoss
from fias_monai.triton_support import interpreting

# impl="fused" (float32 maps) against impl="torch" (the same maps in float64): loss and map gradients,
# over mixed memory formats, pixel counts that are not a multiple of the tile (and maps of several
# tiles), 1-3 maps, class counts that are not a power of two, the options the stacked pass supports, and
# the border weighting's cross-entropy weight map.
_INTERPRETED_CHECK = triton_interpreter_check("test_loss_kernel: the fused loss against PyTorch", r"""
import json, torch
from fias_monai.losses import FeatureMixingLoss
torch.manual_seed(0)
rows = []
cases = [  # B, C, H, W, maps, channels_last per map, loss options
    (2, 4, 9, 7, 3, (False, True, False), {}),
    (3, 9, 16, 16, 3, (True, True, True), {"include_background": False}),
    (2, 5, 11, 13, 2, (False, False), {"batch": True, "smooth_nr": 0.0, "smooth_dr": 1e-6}),
    (2, 3, 8, 8, 3, (False, False, False), {"mixing": "separate"}),
    (2, 3, 8, 8, 3, (False, False, False), {"mixing": "final"}),
    (2, 6, 130, 3, 1, (False,), {}),
    (2, 4, 40, 30, 3, (True, False, True), {}),  # 1,200 pixels: two forward programs of several sub-tiles
    (2, 4, 40, 30, 3, (True, False, True), {"border_weight": 2.0}),  # the cross-entropy weight map
    (2, 5, 11, 13, 2, (False, True), {"border_weight": 0.5, "border_width": 2, "batch": True}),
]
for b, c, h, w, n, cl, kw in cases:
    maps = [torch.randn(b, c, h, w) * 3 for _ in range(n)]
    maps = [m.contiguous(memory_format=torch.channels_last) if f else m for m, f in zip(maps, cl)]
    y = torch.randint(0, c, (b, 1, h, w)).float()
    y[..., : h // 2, : w // 2] = 0  # a uniform block: voxels off every border, so the weights differ
    fused = [m.clone().requires_grad_() for m in maps]
    ref = [m.double().requires_grad_() for m in maps]
    got = FeatureMixingLoss(impl="fused", **kw)(fused if n > 1 else fused[0], y)
    want = FeatureMixingLoss(impl="torch", **kw)(ref if n > 1 else ref[0], y)
    got.backward()
    want.backward()
    rows.append(dict(case=[b, c, h, w, n], loss=want.item(), loss_err=abs(got.item() - want.item()),
                     grad_err=max((x.grad.double() - z.grad).abs().max().item() for x, z in zip(fused, ref)),
                     grad_scale=max(z.grad.abs().max().item() for z in ref),
                     strides_kept=all(x.grad.stride() == x.stride() for x in fused)))
print(json.dumps(rows))
""")


@needs_triton
def test_fused_loss_matches_pytorch_in_triton_interpreter():
    rows = run_in_triton_interpreter(_INTERPRETED_CHECK)
    assert len(rows) == 9
    for row in rows:
        assert row["loss_err"] < 1e-5 * max(1.0, row["loss"]), row  # float32 rounding
        assert row["grad_err"] < 1e-4 * row["grad_scale"], row  # a missing or wrong term is O(grad_scale)
        assert row["strides_kept"], row  # each gradient keeps its map's memory format


def test_loss_impl_choice_and_errors():
    maps = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    y = torch.randint(0, 3, (2, 1, 8, 8)).float()
    with pytest.raises(ValueError, match="impl must be one of"):
        FeatureMixingLoss(impl="triton")
    if not interpreting():
        loss = FeatureMixingLoss()
        assert not loss._use_kernel(maps)  # auto: PyTorch on CPU
        assert torch.allclose(loss(maps, y), FeatureMixingLoss(impl="torch")(maps, y))
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            FeatureMixingLoss(impl="fused")(maps, y)
    with pytest.raises(ValueError, match="stacked options"):  # e.g. class weights: per-combination DiceCELoss only
        FeatureMixingLoss(impl="fused", weight=torch.ones(3))(maps, y)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="the compiled kernel needs a GPU")
@pytest.mark.parametrize("border_weight", [0.0, 2.0])
def test_fused_loss_on_gpu_bf16_and_in_a_cuda_graph(border_weight):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    b, c, h, w = 4, 9, 256, 224  # FIAS's training maps, channels_last as the network writes them
    maps = [torch.randn(b, c, h, w, device=dev).mul(4).bfloat16().contiguous(memory_format=torch.channels_last)
            for _ in range(3)]
    y = torch.randint(0, c, (b, 1, h, w), device=dev).float()
    y[..., :128, :] = 0  # voxels off every border, so that a border weight changes the loss
    fused = [m.clone().requires_grad_() for m in maps]
    ref = [m.float().requires_grad_() for m in maps]  # the kernel mixes in float32
    got = FeatureMixingLoss(border_weight=border_weight)(fused, y)
    want = FeatureMixingLoss(impl="torch", border_weight=border_weight)(ref, y)
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) < 1e-4 * want.item()
    for x, z in zip(fused, ref):
        scale = z.grad.abs().max().item()
        assert (x.grad.float() - z.grad).abs().max().item() < 0.01 * scale  # bf16 gradients
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    # one captured training step, replayed
    loss_fn = FeatureMixingLoss(border_weight=border_weight)  # the border map is made inside the graph too
    static = [m.clone().requires_grad_() for m in maps]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loss_fn(static, y).backward()  # warm-up: compiles the kernels and makes the mixing table
    torch.cuda.current_stream().wait_stream(s)
    for m in static:
        m.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn(static, y)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert abs(loss.item() - want.item()) < 1e-4 * want.item()
    assert (static[0].grad.float() - ref[0].grad).abs().max().item() < 0.01 * ref[0].grad.abs().max().item()
