"""The official DilateFormer ImageNet checkpoint layout loads into the encoder with nothing skipped."""

import pytest
import torch

from fias_monai.networks import FIAS, load_dilateformer_checkpoint
from fias_monai.networks.blocks import DilateFormer, checkpoint_filter_fn

SMALL = dict(embed_dims=(24, 48, 96, 192), depths=(1, 2, 1, 1), num_heads=(3, 6, 12, 24))


def _bn(prefix, c):
    return {f"{prefix}.weight": torch.rand(c) + 0.5, f"{prefix}.bias": torch.randn(c),
            f"{prefix}.running_mean": torch.randn(c), f"{prefix}.running_var": torch.rand(c) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(1000)}


def official_state_dict(embed_dims, depths, num_heads, dilated=(True, True, False, False), in_chans=3,
                        num_classes=1000):
    """Keys and shapes of JIAOJIAYUASD/dilateformer's `Dilateformer` (written out from its code)."""
    sd = {"patch_embed.proj.0.weight": torch.randn(16, in_chans, 3, 3), **_bn("patch_embed.proj.1", 16),
          "patch_embed.proj.3.weight": torch.randn(32, 16, 3, 3), **_bn("patch_embed.proj.4", 32),
          "patch_embed.proj.6.weight": torch.randn(64, 32, 3, 3), **_bn("patch_embed.proj.7", 64),
          "patch_embed.proj.9.weight": torch.randn(embed_dims[0], 64, 3, 3)}
    for i, (c, depth) in enumerate(zip(embed_dims, depths)):
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            sd.update({f"{p}.pos_embed.weight": torch.randn(c, 1, 3, 3), f"{p}.pos_embed.bias": torch.randn(c),
                       f"{p}.norm1.weight": torch.randn(c), f"{p}.norm1.bias": torch.randn(c),
                       f"{p}.attn.qkv.weight": torch.randn(3 * c, c, 1, 1) if dilated[i] else torch.randn(3 * c, c),
                       f"{p}.attn.qkv.bias": torch.randn(3 * c),
                       f"{p}.attn.proj.weight": torch.randn(c, c), f"{p}.attn.proj.bias": torch.randn(c),
                       f"{p}.norm2.weight": torch.randn(c), f"{p}.norm2.bias": torch.randn(c),
                       f"{p}.mlp.fc1.weight": torch.randn(4 * c, c), f"{p}.mlp.fc1.bias": torch.randn(4 * c),
                       f"{p}.mlp.fc2.weight": torch.randn(c, 4 * c), f"{p}.mlp.fc2.bias": torch.randn(c)})
        if i + 1 < len(embed_dims):
            sd[f"stages.{i}.downsample.proj.0.weight"] = torch.randn(2 * c, c, 3, 3)
            sd[f"stages.{i}.downsample.proj.0.bias"] = torch.randn(2 * c)
            sd.update(_bn(f"stages.{i}.downsample.proj.1", 2 * c))
    sd.update({"norm.weight": torch.randn(embed_dims[-1]), "norm.bias": torch.randn(embed_dims[-1]),
               "head.weight": torch.randn(num_classes, embed_dims[-1]), "head.bias": torch.randn(num_classes)})
    return sd


def test_official_layout_loads_every_encoder_tensor():
    enc = DilateFormer(1, **SMALL)
    official = official_state_dict(**SMALL)
    mapped = checkpoint_filter_fn({"model": official}, enc)  # the DeiT-style training checkpoint wrapper
    enc.load_state_dict(mapped, strict=True)
    own = enc.state_dict()
    assert set(mapped) == set(own), "every encoder tensor comes from the checkpoint, none is left out"
    # values really landed, with the renames right
    assert torch.equal(own["stages.2.blocks.0.attn.attn.qkv.weight"], official["stages.2.blocks.0.attn.qkv.weight"])
    assert torch.equal(own["stages.2.blocks.0.attn.attn.out_proj.bias"], official["stages.2.blocks.0.attn.proj.bias"])
    assert torch.equal(own["stages.0.blocks.0.attn.qkv.weight"], official["stages.0.blocks.0.attn.qkv.weight"])
    assert torch.equal(own["stages.1.downsample.adn.N.running_var"], official["stages.1.downsample.proj.1.running_var"])
    assert torch.equal(own["stem.3.conv.weight"], official["patch_embed.proj.9.weight"])
    assert torch.equal(own["stages.3.blocks.0.mlp.linear2.weight"], official["stages.3.blocks.0.mlp.fc2.weight"])
    # RGB stem adapted to one channel by timm's adapt_input_conv: the sum over RGB
    assert own["stem.0.conv.weight"].shape == (16, 1, 3, 3)
    assert torch.allclose(own["stem.0.conv.weight"], official["patch_embed.proj.0.weight"].sum(1, keepdim=True))


def test_loaded_encoder_computes_the_official_msda():
    """The official MSDA layout (qkv conv -> (3, groups, C/3) channels) gives the same features."""
    enc = DilateFormer(1, **SMALL).eval()
    enc.load_state_dict(checkpoint_filter_fn(official_state_dict(**SMALL), enc))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref = DilateFormer(1, **SMALL, attention_impl="unfold").eval()
        ref.load_state_dict(enc.state_dict())
        assert torch.allclose(enc(x)[0], ref(x)[0], atol=1e-4)


def test_load_from_local_file_into_fias_and_wrong_variant_raises(tmp_path):
    path = tmp_path / "dilateformer_official.pth"
    torch.save({"model": official_state_dict(**SMALL)}, path)
    net = FIAS(1, 4, **SMALL, decoder_heads=(8, 6, 4, 2), pretrained_encoder=path)
    assert torch.allclose(net.encoder.state_dict()["stages.0.blocks.0.norm1.weight"],
                          torch.load(path)["model"]["stages.0.blocks.0.norm1.weight"])
    wrong = DilateFormer(1, embed_dims=(48, 96, 192, 384), depths=(1, 2, 1, 1), num_heads=(3, 6, 12, 24))
    with pytest.raises(ValueError, match="same DilateFormer variant"):
        load_dilateformer_checkpoint(wrong, path)
    deeper = DilateFormer(1, embed_dims=SMALL["embed_dims"], depths=(2, 2, 1, 1), num_heads=SMALL["num_heads"])
    with pytest.raises(RuntimeError, match="Missing key"):
        load_dilateformer_checkpoint(deeper, path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_dilateformer_checkpoint(deeper, tmp_path / "absent.pth")
