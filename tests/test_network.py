import pytest
import torch

from conftest import TINY_NET, overfit
from fias_monai.networks import FIAS, FIAS_VARIANTS, fias_base, fias_small, fias_tiny
from fias_monai.networks.blocks import (
    ContextAwareFusion,
    DilateFormer,
    DMKEncoder,
    MonteCarloAttention,
    msda_gathered,
    msda_reference,
    msda_shifted,
)

ABLATIONS = [
    dict(),
    dict(use_dmk=False),
    dict(fusion="sum"),
    dict(decoder="conv"),
    dict(attention_impl="unfold"),
    dict(attention_impl="gather"),
    dict(full_res_head=True),  # beyond the paper: the finest output decoded to full resolution
]

# Parameters at in_channels=1, out_channels=9 (the README's table; scripts/count_parameters.py).
PARAMS_9_CLASSES = {"tiny": 37_802_647, "small": 44_621_407, "base": 84_193_587}


def tiny(**kw):
    return FIAS(in_channels=1, out_channels=4, **{**TINY_NET, **kw})


@pytest.mark.parametrize("factory,variant", [(fias_tiny, "tiny"), (fias_small, "small"), (fias_base, "base")])
def test_variants_build_with_their_tables(factory, variant):
    net = factory(in_channels=1, out_channels=9)
    assert net.encoder.embed_dims == FIAS_VARIANTS[variant]["embed_dims"]
    depths = [len(s.blocks) for s in net.encoder.stages]
    assert tuple(depths) == FIAS_VARIANTS[variant]["depths"]
    assert sum(p.numel() for p in net.parameters()) == PARAMS_9_CLASSES[variant]


@pytest.mark.parametrize("kw", ABLATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "full")
def test_forward_backward_every_parameter_gets_gradient(kw):
    net = tiny(**kw).train()
    x = torch.randn(2, 1, 64, 96)  # non-square
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 4, 64, 96) for o in outs)
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert all(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "heads" in n)


def test_ablation_switches_change_the_modules():
    assert tiny(use_dmk=False).dmk is None
    assert type(tiny(fusion="sum").fusions[0]).__name__ == "SumFusion"
    assert type(tiny().fusions[0]).__name__ == "ContextAwareFusion"
    assert type(tiny(decoder="conv").decoder_blocks[0]).__name__ == "ConvDecoderBlock"
    assert type(tiny().decoder_blocks[0]).__name__ == "MixAttBlock"
    with pytest.raises(ValueError, match="fusion"):
        tiny(fusion="concat")
    with pytest.raises(ValueError, match="decoder"):
        tiny(decoder="unet")
    with pytest.raises(ValueError, match="variant"):
        FIAS(variant="huge")


def _heads_as_in_eval(net, x):
    """The three deep-supervision outputs as eval mode computes them: train mode with the stochastic parts
    frozen (BN statistics, MCA's global pool). Leaves ``net`` in that state."""
    net.train()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, MonteCarloAttention)):
            m.eval()
    with torch.no_grad():
        return net(x)


def test_eval_returns_sum_of_heads_and_is_deterministic():
    net = tiny(drop_path_rate=0.0, decoder_dropout=0.0).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (1, 4, 64, 64)
    assert torch.equal(a, b)
    heads = _heads_as_in_eval(net, x)
    assert torch.allclose(sum(heads), a, atol=1e-5)


@pytest.mark.parametrize("heads", [(0,), (0, 1), (2, 0)])
@pytest.mark.parametrize("full_res_head", [False, True])
def test_inference_heads_sum_only_the_chosen_outputs_from_the_same_weights(heads, full_res_head):
    torch.manual_seed(0)
    net = tiny(drop_path_rate=0.0, decoder_dropout=0.0, full_res_head=full_res_head)
    chosen = tiny(drop_path_rate=0.0, decoder_dropout=0.0, full_res_head=full_res_head, inference_heads=heads)
    chosen.load_state_dict(net.state_dict(), strict=True)  # the option adds no weights
    x = torch.randn(2, 1, 64, 64)
    outputs = _heads_as_in_eval(net, x)
    with torch.no_grad():
        got = chosen.eval()(x)
    torch.testing.assert_close(got, sum(outputs[i] for i in heads), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, sum(outputs), atol=1e-3)  # not the paper's sum of all three


@pytest.mark.parametrize("heads", [(), (0, 0), (3,), (-1,)])
def test_inference_heads_outside_the_three_outputs_raise(heads):
    with pytest.raises(ValueError, match="inference_heads"):
        tiny(inference_heads=heads)


@pytest.mark.parametrize("shape", [(1, 1, 64, 48), (1, 1, 65, 64), (1, 1, 20, 20)])
def test_sizes_not_divisible_by_32_raise(shape):
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny().eval()(torch.randn(*shape))


def test_wrong_channel_count_and_rank_raise():
    net = tiny().eval()
    with pytest.raises(ValueError, match="1 input channel"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="2D slices"):
        net(torch.randn(1, 1, 64, 64, 8))


def test_loss_falls_when_overfitting_one_batch():
    net = tiny(decoder_dropout=0.0)
    x = torch.rand(2, 1, 64, 64)
    y = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    y[:, :, 16:40, 20:44] = 1
    y[:, :, 44:56, 8:20] = 2
    y[:, :, 4:8, 50:56] = 3
    x = x + y.float()  # make the classes visible
    losses = overfit(net, x, y, steps=25, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_trace_and_state_dict_round_trip_reproduce_eager():
    net = tiny().eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref = net(x)
        traced = torch.jit.trace(net, x, check_trace=False)
        assert torch.allclose(traced(x), ref, atol=1e-5)
        other = tiny().eval()
        assert not torch.allclose(other(x), ref)
        other.load_state_dict(net.state_dict())
        assert torch.equal(other(x), ref)


def test_channels_last_memory_gives_the_same_output_and_its_checkpoint_loads_into_nchw():
    # the bundle trains in channels_last on a GPU (faster for FIAS); its weights must serve an NCHW network
    net = FIAS(2, 4, **TINY_NET).double().eval()
    x = torch.randn(2, 2, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        cl = FIAS(2, 4, **TINY_NET).double().eval().to(memory_format=torch.channels_last)
        cl.load_state_dict(net.state_dict())
        assert cl.encoder.stem[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, ref, atol=1e-12)
        back = FIAS(2, 4, **TINY_NET).double().eval()
        back.load_state_dict(cl.state_dict())
        assert torch.equal(back(x), ref)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_shifted_msda_matches_unfold_reference(dilation):
    q, k, v = (torch.randn(2, 16, 11, 13, dtype=torch.float64) for _ in range(3))
    ref = msda_reference(q, k, v, head_dim=8, dilation=dilation)
    for fn in (msda_shifted, msda_gathered):
        assert torch.allclose(fn(q, k, v, head_dim=8, dilation=dilation), ref, atol=1e-12)
    # a hand check of one border pixel: zero-padded keys still take part in the softmax
    qh, kh, vh = q[0, :8, 0, 0], k[0, :8], v[0, :8]
    logits, values = [], []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = di * dilation, dj * dilation
            inside = 0 <= i < 11 and 0 <= j < 13
            logits.append((qh * kh[:, i, j]).sum() * 8**-0.5 if inside else torch.zeros((), dtype=q.dtype))
            values.append(vh[:, i, j] if inside else torch.zeros(8, dtype=q.dtype))
    w = torch.stack(logits).softmax(0)
    assert torch.allclose((w[:, None] * torch.stack(values)).sum(0), ref[0, :8, 0, 0], atol=1e-12)


@pytest.mark.parametrize("impl", ["shift", "gather"])
def test_attention_impls_give_the_same_network_output(impl):
    a = tiny(attention_impl=impl).eval()
    b = tiny(attention_impl="unfold").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_encoder_pyramid_and_dmk_match_strides_and_channels():
    enc = DilateFormer(1, TINY_NET["embed_dims"], TINY_NET["depths"], TINY_NET["num_heads"])
    dmk = DMKEncoder(2, 1, TINY_NET["embed_dims"])
    x = torch.randn(1, 1, 64, 128)
    feats, cnn = enc(x), dmk(x)
    assert enc.strides == (4, 8, 16, 32)
    for f, c, s, ch in zip(feats, cnn, enc.strides, TINY_NET["embed_dims"]):
        assert f.shape == c.shape == (1, ch, 64 // s, 128 // s)


def test_caf_weights_and_shape():
    caf = ContextAwareFusion(2, 8)
    f1, f2 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    out = caf(f1, f2)
    assert out.shape == (2, 8, 6, 6)
    # zero features: F' = ReLU(BN(0)) and w_sp in (0, 1) keep the output finite and bounded
    assert torch.isfinite(caf(torch.zeros_like(f1), torch.zeros_like(f2))).all()


def test_monte_carlo_attention_eval_is_global_and_train_samples_a_cell():
    mca = MonteCarloAttention(2, 16)
    x = torch.randn(2, 16, 6, 6)
    mca.eval()
    assert torch.equal(mca.sample(x), x.mean((2, 3), keepdim=True))
    mca.train()
    candidates = [torch.nn.functional.adaptive_avg_pool2d(x, k) for k in (1, 2, 3)]
    cells = [c[:, :, i:i + 1, j:j + 1] for c in candidates for i in range(c.shape[2]) for j in range(c.shape[3])]
    seen = set()
    for _ in range(60):
        s = mca.sample(x)
        match = [n for n, c in enumerate(cells) if torch.allclose(s, c)]
        assert match, "training sample is not one pooled cell"
        seen.add(match[0])
    assert len(seen) > 3  # random over pool sizes and cells
    w = mca(x)
    assert w.shape == (2, 16, 1, 1) and ((w > 0) & (w < 1)).all()


def test_padded_head_attention_is_sablock_with_the_same_weights():
    from monai.networks.blocks import SABlock

    from fias_monai.networks.blocks import PaddedHeadSABlock

    torch.manual_seed(0)
    for width, heads in ((72, 2), (20, 4), (48, 6)):  # 36- and 5-channel heads are padded, 8 is not
        padded = PaddedHeadSABlock(width, heads, qkv_bias=True, use_flash_attention=True, pad_heads=True).double()
        plain = SABlock(width, heads, qkv_bias=True, use_flash_attention=True).double()
        plain.load_state_dict(padded.state_dict())  # same keys and shapes
        x = torch.randn(2, 37, width, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        out, ref = padded(x), plain(x2)
        assert out.shape == (2, 37, width)
        assert (out - ref).abs().max().item() < 1e-12
        out.square().sum().backward()
        ref.square().sum().backward()
        assert (x.grad - x2.grad).abs().max().item() < 1e-10
        assert (padded.qkv.weight.grad - plain.qkv.weight.grad).abs().max().item() < 1e-10
    assert isinstance(tiny().decoder_blocks[-1].mhsa, PaddedHeadSABlock)
    assert tiny().decoder_blocks[-1].mhsa.pad_heads is None  # auto: padded on CUDA only
