"""Where FIAS-tiny's training step spends its GPU time (a diagnosis aid behind benchmark_network.py).

    python scripts/profile_network.py --out profile.json
"""

from __future__ import annotations

import json
import statistics

import fire
import torch
from torch.profiler import ProfilerActivity, profile

from fias_monai.losses import FeatureMixingLoss
from fias_monai.networks import FIAS

try:
    from benchmark_network import cuda_time
except ImportError:  # run from the repo root
    from scripts.benchmark_network import cuda_time


def step_fn(net, loss_fn, x, y, opt, part="all"):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if part == "encoder":
                out = net.encoder(x)
                loss = sum(o.float().mean() for o in out)
            elif part == "dmk":
                out = net.dmk(x)
                loss = sum(o.float().mean() for o in out)
            else:
                out = net(x)
                loss = loss_fn([o.float() for o in out], y)
        loss.backward()
        opt.step()
    return step


def main(out: str = "profile.json", batch: int = 16, size: int = 256, classes: int = 9, compile: bool = True) -> None:
    torch.backends.cudnn.benchmark = True
    x = torch.rand(batch, 1, size, size, device="cuda")
    y = torch.randint(0, classes, (batch, 1, size, size), device="cuda")
    loss_fn = FeatureMixingLoss()
    rows = {}
    configs = {
        "full_shift": dict(), "full_unfold": dict(attention_impl="unfold"),
        "no_mixatt": dict(decoder="conv", attention_impl="unfold"), "no_dmk": dict(use_dmk=False, attention_impl="unfold"),
        "sum_fusion": dict(fusion="sum", attention_impl="unfold"),
    }
    for name, kw in configs.items():
        net = FIAS(1, classes, **kw).cuda().train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        t = cuda_time(step_fn(net, loss_fn, x, y, opt), 15, 5)
        rows[name] = 1000 * statistics.median(t)
        print(name, rows[name], flush=True)
    net = FIAS(1, classes, attention_impl="unfold").cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for part in ("encoder", "dmk"):
        rows[part] = 1000 * statistics.median(cuda_time(step_fn(net, loss_fn, x, y, opt, part), 15, 5))
        print(part, rows[part], flush=True)
    outs = [torch.randn(batch, classes, size, size, device="cuda", requires_grad=True) for _ in range(3)]

    def loss_only():
        loss_fn(outs, y).backward()

    rows["loss_only"] = 1000 * statistics.median(cuda_time(loss_only, 15, 5))
    step = step_fn(net, loss_fn, x, y, opt)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    print(table)
    if compile:
        cnet = torch.compile(net)
        t = cuda_time(step_fn(cnet, loss_fn, x, y, opt), 15, 3)
        rows["compiled_unfold"] = 1000 * statistics.median(t)
        net2 = FIAS(1, classes).cuda().train()
        opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-4)
        t = cuda_time(step_fn(torch.compile(net2), loss_fn, x, y, opt2), 15, 3)
        rows["compiled_shift"] = 1000 * statistics.median(t)
    print(json.dumps(rows, indent=1))
    with open(out, "w") as f:
        json.dump({"step_ms": rows, "profile": table}, f, indent=1)


if __name__ == "__main__":
    fire.Fire(main)
