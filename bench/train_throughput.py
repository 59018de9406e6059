"""Training images/s of the EDM CIFAR-10 DDPM++ denoiser (55.7M) under edm_teacher's --precision x --compile.

    OMP_NUM_THREADS=1 python bench/train_throughput.py --configs fp32,bf16 --batch 1 --steps 1 --loss-steps 2
    python bench/train_throughput.py --batch 128 --steps 20 --loss-steps 200 --out train_gpu.json  # GPU: all

One step is edm_teacher.train's (one process, no lr ramp-up): seed from SeedSequence([seed, step]), batch
(batch_indices of 256 random images), EDM augmentation (p 0.12), EDM loss, backward of loss.sum() / batch,
nan_to_num of the gradients, Adam (fused on CUDA), EMA lerp with EDM's beta; bf16: autocast around the loss;
tf32: the two CUDA switches; +compile: torch.compile(net). Every config (--configs; default all: fp32, tf32
on CUDA only, bf16, each eager and +compile) starts from the same weights with the same draws at every step,
so its loss after --loss-steps steps differs from fp32's only by arithmetic (noise scale: fp32, seed 1).
Images/s over the last --steps steps (the first ones warm up: compile, autotuning), as ratios to fp32 eager:
GPU wall time (also absolute images/s, peak memory); CPU: this process's CPU time, all threads (images per
CPU-second, robust to other jobs on a shared machine). Writes JSON (--out).
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_teacher as E  # noqa: E402

CIFAR10_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13)


def run(config, init, images, args, device, seed=0):
    """`args.loss_steps` training steps from `init` under config "fp32|tf32|bf16[+compile]" -> one row."""
    precision, compiled = config.removesuffix("+compile"), config.endswith("+compile")
    torch._dynamo.reset()  # a fresh compile per config
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    net = copy.deepcopy(init).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), args.lr, betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    model = torch.compile(net) if compiled else net  # what is called; net is what is stepped
    cuda, losses, times, first_wall = device.type == "cuda", [], [], None
    torch.cuda.reset_peak_memory_stats() if cuda else None
    for step in range(args.loss_steps):
        s0, s1 = np.random.SeedSequence([seed, step]).generate_state(2)
        torch.manual_seed(int(s0) << 32 | int(s1))
        y = images[E.batch_indices(len(images), args.batch, step, seed).to(device)]
        torch.cuda.synchronize() if cuda else None
        t, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        y, aug = E.edm_augment(y, 0.12)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            loss = E.edm_loss(model, y, augment_labels=aug)
            loss.sum().mul(1 / args.batch).backward()
        for p in (p for p in net.parameters() if p.grad is not None):
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        beta = 0.5 ** (args.batch / max(min(500e3, step * args.batch * 0.05), 1e-8))  # EDM, nimg before step
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        losses.append(loss.detach().mean().item())  # .item() syncs: the step is over
        times.append(time.perf_counter() - t if cuda else time.process_time() - cpu)
        first_wall = first_wall if step else time.perf_counter() - t  # with the compile and its workers
    step_s = sum(times[-args.steps :]) / args.steps
    return dict(config=config, img_s=args.batch / step_s, step_s=step_s, first_step_wall_s=first_wall,
                loss=losses[-1], losses=losses,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="images per step (EDM CIFAR-10 per GPU: 64)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (the last ones of each run)")
    p.add_argument("--loss-steps", type=int, default=4, help="steps per run; the loss is read at the last")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (EDM CIFAR-10, no ramp-up)")
    p.add_argument("--configs", help="comma-separated, e.g. fp32,bf16,fp32+compile (default: all)")
    p.add_argument("--out", default="train_throughput.json", help="JSON output")
    args = p.parse_args(argv)
    if not 0 < args.steps < args.loss_steps:
        p.error("need 0 < --steps < --loss-steps (the first steps are warm-up)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # as edm_teacher.train
    precisions = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]  # tf32: CUDA only
    configs = args.configs.split(",") if args.configs else precisions + [f"{q}+compile" for q in precisions]
    configs = ["fp32"] + [c for c in configs if c != "fp32"]  # the baseline first
    if bad := [c for c in configs if c.removesuffix("+compile") not in ("fp32", "tf32", "bf16")]:
        p.error(f"unknown --configs {bad}: fp32, tf32, bf16, each optionally +compile")
    torch.manual_seed(0)
    init = E.build_net(CIFAR10_DDPMPP)  # the initial weights of every run
    images = (torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    rows, gpu = [], device.type == "cuda"
    for config in configs:
        rows.append(run(config, init, images, args, device))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    noise = abs(run("fp32", init, images, args, device, seed=1)["loss"] - rows[0]["loss"])  # other draws
    print("\nconfig | x fp32 eager | loss (diff) | 1st step wall s" + (" | img/s | peak GiB" if gpu else ""))
    for r in rows:
        r.update(speedup=r["img_s"] / rows[0]["img_s"], loss_diff=r["loss"] - rows[0]["loss"])
        line = f"{r['config']:>12} | {r['speedup']:.2f}x | {r['loss']:.4f} ({r['loss_diff']:+.4f}) | "
        line += f"{r['first_step_wall_s']:.1f}"
        print(line + (f" | {r['img_s']:.0f} | {r['peak_gib']:.2f}" if gpu else ""))
    print(f"loss noise (fp32 eager, seed 1 vs seed 0, step {args.loss_steps}): {noise:.4f}")
    info = dict(device=torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                params=sum(t.numel() for t in init.state_dict().values()), net=CIFAR10_DDPMPP,
                args=vars(args), loss_noise=noise, results=rows)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
