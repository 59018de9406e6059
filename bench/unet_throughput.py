"""Images/s of the EDM CIFAR-10 DDPM++ denoiser (55.7M parameters): forward and forward+backward.

    python bench/unet_throughput.py --out bench/unet_throughput_cpu.json          # CPU (a few minutes)
    python bench/unet_throughput.py --batches 64,128,256 --out unet_gpu.json       # GPU, fp32 and bf16

Writes JSON with the machine, software versions and, per (batch, precision): forward images/s (eval,
no_grad) and training images/s (forward + backward of the EDM loss, no optimiser step). Ratios between rows
are measured in the same run; absolute figures depend on the machine.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_teacher as E  # noqa: E402

CIFAR10_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13)


def timed(fn, fn_args, iters, device):
    fn(*fn_args)  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn(*fn_args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward(net, x, sigma, precision):
    with torch.no_grad(), autocast(x.device, precision):
        net.eval()(x, sigma)


def train_step(net, x, sigma, precision):
    with autocast(x.device, precision):
        net.train()
        E.edm_loss(net, x, sigma=sigma.view(-1, 1, 1, 1)).sum().backward()
    net.zero_grad(set_to_none=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--out", default="unet_throughput.json", help="JSON output")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = E.build_net(CIFAR10_DDPMPP).to(device)
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, 3, 32, 32, device=device)
        sigma = torch.full([batch], 1.0, device=device)
        for prec in precisions:
            fwd = timed(forward, (net, x, sigma, prec), args.iters, device)
            trn = timed(train_step, (net, x, sigma, prec), args.iters, device)
            rows.append(
                dict(
                    batch=batch,
                    precision=prec,
                    forward_img_s=batch / fwd,
                    train_img_s=batch / trn,
                    train_over_forward_time=trn / fwd,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    info = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        params=sum(p.numel() for p in net.parameters()),
        config=CIFAR10_DDPMPP,
        results=rows,
    )
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
