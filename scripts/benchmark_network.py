"""GPU speed of FIAS against MONAI peers, measured in ONE process (issue: network speed).

Times, at 256x256 with 9 classes and bf16 autocast:
  * training throughput (images/s) at batch 16: forward, loss, backward, optimizer step;
  * inference latency at batch 1 (median of CUDA-event timings);
  * peak GPU memory of the training step; parameters; forward FLOPs at batch 1.
Models: FIAS-tiny (each MSDA formulation: "unfold" reference, "gather", "shift", "fused" Triton kernel), MONAI
SwinUNETR(spatial_dims=2, feature_size=48, use_v2=True) and MONAI BasicUNet, every one with the same
fused Adam optimizer, in two execution modes applied alike to all models:
  * eager: plain PyTorch;
  * compile+graph (optional, ``--compiled``): torch.compile (inductor kernel fusion), then the graph capture;
  * graph: the whole training step (forward, loss, backward, optimizer step) and the inference forward
    captured once in a CUDA graph and replayed (removes the per-kernel CPU launch cost, which dominates
    networks made of many small kernels).
Also micro-benchmarks of the MSDA formulations with their error against an fp64 run of the unfold
reference: one dilation group at the stage-1 shape, and a whole MSDA layer (qkv projection, the three
groups, output projection) at the stage-1 and stage-2 shapes, where the fused kernel takes part.

    python scripts/benchmark_network.py --out results.json

Any model name takes a ``+cl`` suffix: weights and inputs in channels_last memory (``swinunetr+cl``).
A FIAS name takes ``-v025`` before it: bundle 0.2.5's step (PyTorch LayerNorm, unpadded MixAtt heads, the
loss in PyTorch), e.g. ``fias_tiny_fused-v025+cl``, to compare versions in one run.

FIAS ablations (``:no_dmk``, ``:sum``, ``:conv_decoder`` after a FIAS name) show what each block costs;
``:full_res_head`` adds the full-resolution head (beyond the paper):

    python scripts/benchmark_network.py --eager "" --msda false \
        --graph fias_tiny_gather,fias_tiny_gather:no_dmk,fias_tiny_gather:sum,fias_tiny_gather:conv_decoder,swinunetr

Ratios in the printed table are against SwinUNETR-2D measured in the same run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import types

import fire
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet, SwinUNETR
from torch.utils.flop_counter import FlopCounterMode

from fias_monai.losses import FeatureMixingLoss
from fias_monai.networks import FIAS
from fias_monai.networks.blocks import (
    ATTENTION_IMPLS,
    FusedLayerNorm,
    MultiScaleDilatedAttention,
    PaddedHeadSABlock,
    msda_gathered,
    msda_reference,
    msda_shifted,
)
from fias_monai.params import ABLATIONS
from fias_monai.transforms import as_bool


# FIAS ablations of the paper's Table 3 (fias_monai.params.ABLATIONS), as a ":<ablation>" suffix
# (``fias_tiny_gather:no_dmk``): their graph-mode cost against the full network shows where FIAS's step time goes
ABLATION_SUFFIXES = {"no_dmk": "no DMK", "sum": "Summation fusion", "conv_decoder": "no MixAtt"}
# FIAS keyword arguments per ":<suffix>": the ablations, and the switches beyond the paper
# (``fias_tiny_fused:full_res_head+cl``)
SUFFIX_KWARGS = {**{suffix: ABLATIONS[row] for suffix, row in ABLATION_SUFFIXES.items()},
                 "full_res_head": {"full_res_head": True}}


def as_bundle_0_2_5(net: torch.nn.Module) -> torch.nn.Module:
    """FIAS with PyTorch's LayerNorm and MONAI's unpadded SABlock instead of the 0.2.6 kernels (same
    parameters), for the ``-v025`` rows: what each version's step costs, measured in one run."""
    for m in net.modules():
        if isinstance(m, FusedLayerNorm):
            m.forward = types.MethodType(torch.nn.LayerNorm.forward, m)
        if isinstance(m, PaddedHeadSABlock):
            m.pad_heads = False
    return net


def build(name: str, classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    if name.startswith("fias"):
        base, _, ablation = name.partition(":")
        # "-v025": the 0.2.5 step (PyTorch LayerNorm, unpadded attention heads, loss in PyTorch)
        legacy = base.endswith("-v025")
        base = base.removesuffix("-v025")
        impl = base.split("_")[-1] if base.split("_")[-1] in ATTENTION_IMPLS else "shift"
        kwargs = SUFFIX_KWARGS[ablation] if ablation else {}
        net = FIAS(1, classes, "tiny", attention_impl=impl, **kwargs)
        if legacy:
            return as_bundle_0_2_5(net), FeatureMixingLoss(impl="torch")
        return net, FeatureMixingLoss()
    loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.4, lambda_ce=0.6)
    if name.startswith("swinunetr"):
        return SwinUNETR(spatial_dims=2, in_channels=1, out_channels=classes, feature_size=48, use_v2=True), loss
    if name.startswith("basicunet"):
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=classes), loss
    raise ValueError(name)


def cuda_time(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def bench_model(name: str, classes: int, batch: int, size: int, iters: int, warmup: int, mode: str) -> dict:
    torch.manual_seed(0)
    # "+cl": weights and inputs in channels_last (NHWC) memory, which cuDNN's convolutions and
    # batch norms prefer and which makes the DilateFormer's NCHW <-> NHWC permutes free views
    fmt = torch.channels_last if name.endswith("+cl") else torch.contiguous_format
    net, loss_fn = build(name.removesuffix("+cl"), classes)
    params = sum(p.numel() for p in net.parameters())
    net = net.cuda().to(memory_format=fmt)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(torch.randn(1, 1, size, size, device="cuda"))
    flops = counter.get_total_flops()
    graph = mode in ("graph", "compile+graph")
    model = torch.compile(net) if mode.startswith("compile") else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-4, fused=True, capturable=graph)
    # several input sets so repeated steps do not replay one cached batch
    xs = [torch.rand(batch, 1, size, size, device="cuda").contiguous(memory_format=fmt) for _ in range(4)]
    ys = [torch.randint(0, classes, (batch, 1, size, size), device="cuda") for _ in range(4)]
    static_x, static_y = xs[0].clone(), ys[0].clone()

    def fwd_bwd_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            out = model(static_x)
            loss = loss_fn(out, static_y)  # as the bundle's engine: the maps in their autocast dtype
        loss.backward()
        opt.step()

    net.train()
    t0 = time.time()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and cuDNN autotuning) off the capture stream
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            fwd_bwd_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    first_step_s = time.time() - t0
    if graph:
        train_graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(train_graph):
            fwd_bwd_step()
    state = {"i": 0}

    def train_step():
        i = state["i"] = (state["i"] + 1) % 4
        static_x.copy_(xs[i])
        static_y.copy_(ys[i])
        if graph:
            train_graph.replay()
        else:
            opt.zero_grad(set_to_none=True)
            fwd_bwd_step()

    torch.cuda.reset_peak_memory_stats()
    step_times = cuda_time(train_step, iters, warmup)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30

    net.eval()
    x1 = torch.rand(1, 1, size, size, device="cuda").contiguous(memory_format=fmt)

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            return model(x1)

    if graph:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        infer_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(infer_graph):
            forward()
        infer = infer_graph.replay
    else:
        infer = forward
    infer_times = cuda_time(infer, max(iters, 50), warmup)
    return {
        "model": name, "mode": mode, "params": params, "gflops_fwd_b1": flops / 1e9,
        "train_images_per_s": batch / statistics.median(step_times),
        "train_step_ms_median": 1000 * statistics.median(step_times),
        "infer_latency_ms_b1": 1000 * statistics.median(infer_times),
        "peak_train_mem_gib": peak_gib, "warmup_s": first_step_s,
    }


def bench_msda(batch: int = 16, channels: int = 24, size: int = 64, head_dim: int = 24) -> list[dict]:
    """Forward+backward of one dilation group at the stage-1 shape (B, C/3, H/4, W/4), bf16."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, channels, size, size, device="cuda", generator=gen) for _ in range(3))
    ref = msda_reference(q.double(), k.double(), v.double(), head_dim, 2)
    impls = {"unfold": msda_reference, "gather": msda_gathered, "shift": msda_shifted,
             "shift+compile": torch.compile(msda_shifted, dynamic=False)}
    for name, fn in impls.items():
        qq, kk, vv = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, head_dim, 2)
        rel = ((out.double() - ref).norm() / ref.norm()).item()

        def step():
            o = fn(qq, kk, vv, head_dim, 2)
            o.float().sum().backward()

        times = cuda_time(step, 50, 10)
        rows.append({"impl": name, "fwd_bwd_ms": 1000 * statistics.median(times), "rel_err_vs_fp64_ref": rel})
    return rows


def bench_msda_layer(batch: int = 16) -> list[dict]:
    """Forward+backward of a whole MSDA layer of FIAS-tiny (stage 1: 64x64, 72 channels, 3 heads; stage 2:
    32x32, 144 channels, 6 heads) in bf16 autocast, for every formulation with the same weights."""
    rows = []
    for stage, (size, dim, heads) in enumerate(((64, 72, 3), (32, 144, 6)), start=1):
        torch.manual_seed(stage)
        layers = {impl: MultiScaleDilatedAttention(dim, heads, impl=impl).cuda()
                  for impl in ("unfold", "gather", "shift", "fused")}
        for layer in layers.values():
            layer.load_state_dict(layers["unfold"].state_dict())
        x = torch.randn(batch, size, size, dim, device="cuda")
        with torch.no_grad():
            ref = layers["unfold"].double()(x.double())
            layers["unfold"].float()
        for impl, layer in layers.items():
            xx = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(xx)
            rel = ((out.double() - ref).norm() / ref.norm()).item()

            def step(layer=layer, xx=xx):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    o = layer(xx)
                o.float().sum().backward()

            times = cuda_time(step, 50, 10)
            rows.append({"stage": stage, "shape": [batch, size, size, dim], "heads": heads, "impl": impl,
                         "fwd_bwd_ms": 1000 * statistics.median(times), "rel_err_vs_fp64_ref": rel})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(out: str = "benchmark_results.json", batch: int = 16, size: int = 256, classes: int = 9,
         iters: int = 30, warmup: int = 10,
         eager: str = "fias_tiny_unfold,fias_tiny_gather,fias_tiny_shift,swinunetr,basicunet",
         graph: str = "fias_tiny_gather,fias_tiny_unfold,swinunetr,basicunet", compiled: str = "",
         msda: bool | str = True) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "batch": batch, "size": size, "classes": classes, "amp": "bf16",
           "optimizer": "Adam(fused=True)"}
    results = {"env": env, "models": [], "msda": [], "msda_layer": []}

    def save():
        with open(out, "w") as f:
            json.dump(results, f, indent=2)

    def names(arg):  # fire turns "" into an empty tuple and "a,b" into a tuple
        return [m for m in (arg.split(",") if isinstance(arg, str) else list(arg or ())) if m]

    runs = [(m, "eager") for m in names(eager)] + [(m, "graph") for m in names(graph)] + \
           [(m, "compile+graph") for m in names(compiled)]
    for name, mode in runs:
        try:
            results["models"].append(bench_model(name, classes, batch, size, iters, warmup, mode))
        except Exception as e:  # keep the other rows; report the failure
            results["models"].append({"model": name, "mode": mode, "error": repr(e)[:500]})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        save()
        print(json.dumps(results["models"][-1]), flush=True)
    layer_only = str(msda).lower() == "layer"  # "--msda layer": only the whole-layer table (no torch.compile)
    if layer_only or as_bool(msda, "msda"):  # fire passes "--msda false" as the string "false"
        if not layer_only:
            results["msda"] = bench_msda()
            save()
        results["msda_layer"] = bench_msda_layer()
        save()
    print_tables(results)


def print_tables(results: dict) -> None:
    env = results["env"]

    def ref(mode):
        return next((r for r in results["models"] if r["model"] == "swinunetr" and r["mode"] == mode
                     and "error" not in r), None)

    print(f"\n{env['gpu']}, torch {env['torch']}, {env['size']}x{env['size']}, {env['classes']} classes, "
          f"bf16 autocast, train batch {env['batch']}, {env['optimizer']}")
    print("| model | mode | params (M) | GFLOPs fwd (b=1) | train img/s | x SwinUNETR | infer ms (b=1) | "
          "x SwinUNETR | peak train GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["models"]:
        if "error" in r:
            print(f"| {r['model']} | {r['mode']} | error: {r['error'][:120]} |")
            continue
        s = ref(r["mode"])
        tr = f"{r['train_images_per_s'] / s['train_images_per_s']:.2f}" if s else "-"
        inf = f"{r['infer_latency_ms_b1'] / s['infer_latency_ms_b1']:.2f}" if s else "-"
        print(f"| {r['model']} | {r['mode']} | {r['params'] / 1e6:.1f} | {r['gflops_fwd_b1']:.1f} | "
              f"{r['train_images_per_s']:.0f} | {tr} | {r['infer_latency_ms_b1']:.2f} | {inf} | "
              f"{r['peak_train_mem_gib']:.1f} |")
    if results["msda"]:
        print("\n| MSDA impl (B=16, 24 ch, 64x64, dilation 2, bf16) | fwd+bwd ms | rel. error vs fp64 unfold |")
        print("|---|---:|---:|")
        for r in results["msda"]:
            print(f"| {r['impl']} | {r['fwd_bwd_ms']:.3f} | {r['rel_err_vs_fp64_ref']:.2e} |")
    if results.get("msda_layer"):
        print("\n| MSDA layer (B=16, bf16) | impl | fwd+bwd ms | rel. error vs fp64 unfold |")
        print("|---|---|---:|---:|")
        for r in results["msda_layer"]:
            print(f"| stage {r['stage']} {r['shape'][1]}x{r['shape'][2]}x{r['shape'][3]} | {r['impl']} | "
                  f"{r['fwd_bwd_ms']:.3f} | {r['rel_err_vs_fp64_ref']:.2e} |")


if __name__ == "__main__":
    fire.Fire(main)
