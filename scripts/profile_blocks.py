"""Where a network's training step spends its GPU time, block by block, in CUDA-graph mode.

Each listed block is run on its own: its inputs are recorded (shape and dtype) during one forward of
the whole network, then the block's forward and backward (gradients for the block's parameters and
its floating-point inputs) are captured in a CUDA graph and replayed, exactly as the bundle's
training step is. The loss is timed the same way on the logits. The whole step (forward, loss,
backward, fused Adam) is timed too, so the table shows what the blocks cover and what is left
(glue between blocks: concatenations, interpolations, the optimizer step).

    python scripts/profile_blocks.py --models fias_tiny_gather,swinunetr --out profile_blocks.json
    python scripts/profile_blocks.py --models fias_tiny_gather --channels_last true

Models are named as in ``benchmark_network.py``. A diagnosis aid, not a benchmark: block times are
measured alone, so a block does not share the GPU's caches with its neighbours as in the full step.
"""

from __future__ import annotations

import json
import platform
import statistics
from typing import NamedTuple

import fire
import torch

try:
    from benchmark_network import build, cuda_time
except ImportError:  # run from the repo root
    from scripts.benchmark_network import build, cuda_time

from fias_monai.transforms import as_bool


def block_paths(name: str, net: torch.nn.Module) -> list[str]:
    """The blocks to time: every paper block of FIAS (each DilateFormer block split into position
    encoding, attention and MLP); SwinUNETR's Swin stages, residual conv encoders and decoders."""
    if name.startswith("fias"):
        paths = ["encoder.stem"]
        for i, stage in enumerate(net.encoder.stages):
            for j in range(len(stage.blocks)):
                paths += [f"encoder.stages.{i}.blocks.{j}.{part}" for part in ("pos_embed", "norm1", "attn", "norm2", "mlp")]
            if stage.downsample is not None:
                paths.append(f"encoder.stages.{i}.downsample")
        if net.dmk is not None:
            paths += ["dmk.stem"] + [f"dmk.stages.{i}" for i in range(len(net.dmk.stages))]
        paths += [f"fusions.{i}" for i in range(len(net.fusions))]
        paths += [f"upsamples.{i}" for i in range(len(net.upsamples))]
        paths += [f"decoder_blocks.{i}" for i in range(len(net.decoder_blocks))]
        return paths + [f"heads.{i}" for i in range(len(net.heads))]
    paths = []
    for child, module in net.named_children():
        if child == "swinViT":
            for c, sub in module.named_children():
                # a ModuleList is never called itself: time its items
                paths += ([f"swinViT.{c}.{i}" for i in range(len(sub))] if isinstance(sub, torch.nn.ModuleList)
                          else [f"swinViT.{c}"])
        else:
            paths.append(child)
    return paths


class TensorSpec(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype


def record_inputs(net: torch.nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple[list, int]]:
    """Each block's first-call arguments (tensors as :class:`TensorSpec`) and its number of calls, in one forward."""
    seen: dict[str, list] = {}
    calls: dict[str, int] = {}
    hooks = []
    for path in paths:
        def hook(module, args, path=path):
            calls[path] = calls.get(path, 0) + 1
            if path not in seen:
                seen[path] = [TensorSpec(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        hooks.append(net.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        net(x)
    for h in hooks:
        h.remove()
    return {p: (seen[p], calls[p]) for p in paths if p in seen}


def graph_time(fn, tensors: list[torch.Tensor], params: list[torch.nn.Parameter], iters: int, warmup: int) -> float:
    """Median ms of ``fn(*tensors)`` forward + backward, captured in a CUDA graph and replayed."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = fn(*tensors)
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in [*tensors, *params]:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return 1000 * statistics.median(cuda_time(graph.replay, iters, warmup))


def random_like_spec(arg, fmt: torch.memory_format):
    """A random leaf tensor (gradient wanted when floating point) for a recorded tensor argument."""
    if not isinstance(arg, TensorSpec):
        return arg
    if arg.dtype.is_floating_point:
        t = torch.randn(arg.shape, dtype=arg.dtype, device="cuda")
    else:
        t = torch.zeros(arg.shape, dtype=arg.dtype, device="cuda")
    t = t.contiguous(memory_format=fmt) if t.ndim == 4 else t
    return t.requires_grad_(t.is_floating_point())


def profile_model(name: str, classes: int, batch: int, size: int, iters: int, warmup: int,
                  channels_last: bool) -> dict:
    torch.manual_seed(0)
    net, loss_fn = build(name, classes)
    net = net.cuda().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.rand(batch, 1, size, size, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch, 1, size, size), device="cuda")
    rows = []
    for path, (specs, calls) in record_inputs(net, block_paths(name, net), x).items():
        module = net.get_submodule(path)
        args = [random_like_spec(a, fmt) for a in specs]
        params = [p for p in module.parameters() if p.requires_grad]
        ms = graph_time(module, args, params, iters, warmup)
        rows.append({"block": path, "calls": calls, "ms": ms,
                     "input": [list(a.shape) for a in specs if isinstance(a, TensorSpec)]})
        print(f"{name} {path:40s} x{calls} {ms:7.3f} ms", flush=True)

    # the loss on logits shaped as the network returns them
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    logits = out if isinstance(out, list) else [out]  # in the autocast dtype, as the engine's loss gets them
    logits = [torch.randn_like(o).requires_grad_() for o in logits]

    def loss_time() -> float:
        return graph_time(lambda *o: loss_fn(list(o) if len(o) > 1 else o[0], y), logits, [], iters, warmup)

    loss_ms = loss_time()
    rows.append({"block": "loss", "calls": 1, "ms": loss_ms, "input": [list(o.shape) for o in logits]})
    print(f"{name} {'loss':40s} x1 {loss_ms:7.3f} ms", flush=True)
    extra = {}
    if getattr(loss_fn, "impl", "torch") != "torch":  # the same loss in PyTorch's stacked pass, as in 0.2.5
        loss_fn.impl = "torch"
        extra["loss_torch_ms"] = loss_time()
        loss_fn.impl = "auto"
        print(f"{name} {'loss, PyTorch stacked pass':40s} x1 {extra['loss_torch_ms']:7.3f} ms", flush=True)
    if getattr(loss_fn, "stacked", False):  # one DiceCELoss per subset, as before 0.2.5
        loss_fn.stacked = False
        extra["loss_per_subset_ms"] = loss_time()
        loss_fn.stacked = True
        print(f"{name} {'loss, one DiceCELoss per subset':40s} x1 {extra['loss_per_subset_ms']:7.3f} ms", flush=True)

    # the whole step but the optimizer (benchmark_network.py times it with the fused Adam step)
    def fwd_loss(inp):
        return loss_fn(net(inp), y)  # as the bundle's engine: the maps in their autocast dtype

    step_ms = graph_time(fwd_loss, [x], list(net.parameters()), iters, warmup)
    blocks_ms = sum(r["ms"] * r["calls"] for r in rows)
    return {"model": name, "channels_last": channels_last, "fwd_bwd_step_ms": step_ms, "blocks_ms": blocks_ms,
            **extra, "rows": rows}


def print_table(result: dict) -> None:
    step = result["fwd_bwd_step_ms"]
    print(f"\n{result['model']} (channels_last={result['channels_last']}): forward+loss+backward "
          f"{step:.1f} ms; listed blocks {result['blocks_ms']:.1f} ms")
    print("| block | input | calls | ms | % of step |")
    print("|---|---|---:|---:|---:|")
    for r in sorted(result["rows"], key=lambda r: -r["ms"] * r["calls"]):
        shape = "x".join(str(v) for v in r["input"][0]) if r["input"] else ""
        print(f"| {r['block']} | {shape} | {r['calls']} | {r['ms']:.3f} | {100 * r['ms'] * r['calls'] / step:.1f} |")


def main(models: str = "fias_tiny_gather,swinunetr", out: str = "profile_blocks.json", batch: int = 16,
         size: int = 256, classes: int = 9, iters: int = 20, warmup: int = 5, channels_last: bool = False) -> None:
    torch.backends.cudnn.benchmark = True
    names = [m for m in (models.split(",") if isinstance(models, str) else list(models)) if m]
    results = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "python": platform.python_version(), "batch": batch, "size": size, "classes": classes,
                       "amp": "bf16"}, "models": []}
    for name in names:
        results["models"].append(profile_model(name, classes, batch, size, iters, warmup,
                                               as_bool(channels_last, "channels_last")))
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print_table(results["models"][-1])


if __name__ == "__main__":
    fire.Fire(main)
