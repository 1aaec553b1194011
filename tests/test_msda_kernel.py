"""The fused Triton MSDA kernel against the reference formulation.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads when it
decorates the kernels, so those checks run in a subprocess); on a GPU the compiled kernels are checked
too, in bf16 autocast and inside a CUDA graph as the bundle trains.
"""

import pytest
import torch

from conftest import HAVE_TRITON, TINY_NET, needs_triton, run_in_triton_interpreter, triton_interpreter_check
from fias_monai.networks import FIAS
from fias_monai.networks.blocks import MultiScaleDilatedAttention, msda_reference
from fias_monai.triton_support import interpreting

# Run in the interpreter: max |fused - reference| for the output and the qkv gradient, float32 kernel
# against a float64 reference, over layouts, non-square maps, 1 and 2 heads per group, a head width
# that is not a power of two, and dilations in any order.
_INTERPRETED_CHECK = triton_interpreter_check("test_msda_kernel: the fused MSDA kernel against the reference", r"""
import json, torch
from fias_monai.networks.blocks.msda_kernel import msda_fused
from fias_monai.networks.blocks import MultiScaleDilatedAttention, msda_reference
torch.manual_seed(0)
cases = [  # B, C, heads, H, W, dilations, channels_last
    (2, 12, 3, 9, 7, (1, 2, 3), False),
    (1, 24, 6, 8, 8, (1, 2, 3), True),
    (1, 9, 3, 5, 6, (2, 3, 1), False),
]
rows = []
for b, c, heads, h, w, dil, cl in cases:
    qkv = torch.randn(b, 3 * c, h, w, dtype=torch.float64)
    if cl:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    n, hd = len(dil), c // heads
    def reference(t):
        t = t.reshape(b, 3, n, c // n, h, w)
        outs = [msda_reference(t[:, 0, i], t[:, 1, i], t[:, 2, i], hd, d) for i, d in enumerate(dil)]
        return torch.cat(outs, 1).permute(0, 2, 3, 1)
    x32 = qkv.float().requires_grad_()
    x64 = qkv.clone().requires_grad_()
    out, ref = msda_fused(x32, heads, dil), reference(x64)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    rows.append(dict(shape=list(out.shape), out_err=(out.double() - ref).abs().max().item(),
                     grad_err=(x32.grad.double() - x64.grad).abs().max().item(),
                     grad_scale=x64.grad.abs().max().item(), strides_kept=x32.grad.stride() == x32.stride()))
# the module: impl="fused" against impl="unfold" with the same weights
torch.manual_seed(1)
fused, ref = MultiScaleDilatedAttention(24, 6, impl="fused"), MultiScaleDilatedAttention(24, 6, impl="unfold")
ref.load_state_dict(fused.state_dict())
x = torch.randn(2, 8, 12, 24)
rows.append(dict(module_err=(fused(x) - ref(x)).abs().max().item()))
print(json.dumps(rows))
""")


@needs_triton
def test_fused_kernel_matches_reference_in_triton_interpreter():
    rows = run_in_triton_interpreter(_INTERPRETED_CHECK)
    for row in rows[:-1]:
        assert row["out_err"] < 1e-5, row  # float32 rounding; a wrong neighbour or padding is O(1)
        assert row["grad_err"] < 1e-5 * max(1.0, row["grad_scale"]), row
        assert row["strides_kept"], row  # the qkv gradient keeps the input's memory format
    assert rows[-1]["module_err"] < 1e-5, rows[-1]


def test_auto_picks_plain_pytorch_on_cpu_and_the_buffer_stays_out_of_checkpoints():
    attn = MultiScaleDilatedAttention(24, 6)
    x = torch.randn(1, 4, 4, 24)
    if not interpreting():
        assert attn.resolved_impl(x) == "gather"
    assert MultiScaleDilatedAttention(24, 6, impl="fused").resolved_impl(x) == "fused"
    # the dilation table is a non-persistent buffer: checkpoints of the earlier versions still load
    assert not any("dilation_table" in k for k in FIAS(1, 4, **TINY_NET).state_dict())
    with pytest.raises(ValueError, match="impl must be one of"):
        MultiScaleDilatedAttention(24, 6, impl="triton")
    if HAVE_TRITON and not interpreting():  # forcing the kernel on CPU is a clear error, not a Triton trace
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            MultiScaleDilatedAttention(24, 6, impl="fused")(x)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="the compiled kernel needs a GPU")
def test_fused_kernel_on_gpu_bf16_and_in_a_cuda_graph():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    # float32 against the float64 reference, the stage-1 shape of FIAS-tiny (3 groups of 24 channels)
    b, c, heads, h, w = 4, 72, 3, 64, 48
    qkv = torch.randn(b, 3 * c, h, w, device=dev, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    t = qkv.reshape(b, 3, 3, c // 3, h, w)
    ref = torch.cat([msda_reference(t[:, 0, i], t[:, 1, i], t[:, 2, i], c // heads, d) for i, d in enumerate((1, 2, 3))],
                    1).permute(0, 2, 3, 1)
    from fias_monai.networks.blocks import msda_fused

    assert (msda_fused(qkv.float(), heads, (1, 2, 3)).double() - ref).abs().max().item() < 1e-5
    # the whole network: fused against unfold in bf16 autocast, then one captured training step
    fused = FIAS(1, 4, **TINY_NET).to(dev).train()
    assert fused.encoder.stages[0].blocks[0].attn.resolved_impl(torch.empty(1, device=dev)) == "fused"
    plain = FIAS(1, 4, **TINY_NET, attention_impl="unfold").to(dev).train()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 1, 64, 96, device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, r = fused.eval()(x).float(), plain.eval()(x).float()
    assert (a - r).abs().max().item() < 0.05 * r.abs().max().item()
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.0)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up compiles the kernels outside the capture
            opt.zero_grad(set_to_none=False)
            sum(o.float().square().mean() for o in fused(static_x)).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = sum(o.float().square().mean() for o in fused(static_x))
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    qkv_grad = fused.encoder.stages[0].blocks[0].attn.qkv.weight.grad
    assert torch.isfinite(loss).item() and qkv_grad.abs().sum().item() > 0
