"""Training images/s of the EDM CIFAR-10 DDPM++ denoiser (55.7M) under every combination of the speed flags.

    python bench/train_throughput.py --out bench/train_throughput_cpu.json     # CPU: each flag alone, short
    python bench/train_throughput.py --batch 128 --steps 20 --loss-steps 200 --out train_gpu.json  # GPU, all

One training step is edm_teacher.train's: EDM loss (fp32), backward, nan_to_num of the gradients, Adam step,
EMA update. Every combination (--grid full, the default on a GPU; --grid axes, the CPU default: each flag
alone, bf16 + compile, and all together) of --precision (fp32, tf32 on CUDA only, bf16), --compile,
--channels-last and --fused-adam starts from the same weights and sees the same images, noise levels and
noise at every step, so the loss after --loss-steps steps differs between them only by arithmetic. The loss
scale that counts as noise is printed beside it: the same fp32 eager run with another seed (other draws).
Images/s are timed (wall time on a GPU; on a CPU this process's CPU time, all threads: images per CPU-
second, robust to other jobs on a shared machine) over the last --steps steps (the first ones warm up:
compile, autotuning) and printed as ratios to fp32 eager; on a GPU also absolute images/s and peak memory.
Writes JSON with the machine and the table.
"""

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_teacher as E  # noqa: E402

CIFAR10_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(config, init, images, args, device, seed=0):
    """Train `args.loss_steps` steps from `init` under one flag combination -> (losses, step times)."""
    torch._dynamo.reset()  # a fresh compile per combination (and no recompile limit across them)
    speed = argparse.Namespace(compile_backend=args.compile_backend, **config)
    net = E.build_net(CIFAR10_DDPMPP).to(device).train()
    net.load_state_dict(init)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(
        net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **E.optimizer_kwargs(speed, device)
    )
    call = E.prepare_net(net, speed, device)
    losses, times, first_wall = [], [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.loss_steps):
        E.seed_step(seed, 0, 1, step)
        y = images[torch.randint(len(images), (args.batch,), device=images.device)]
        sync(device)
        t, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = E.edm_loss(call, y)
        loss.sum().mul(1 / args.batch).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        E.ema_update(ema, net, E.edm_ema_beta(args.batch, step * args.batch, 500, 0.05))
        losses.append(loss.detach().mean().item())  # .item() syncs: the step is over
        # a GPU: wall time; a CPU (often shared): this process's CPU time, which other jobs do not inflate
        times.append(time.perf_counter() - t if device.type == "cuda" else time.process_time() - cpu)
        first_wall = first_wall or time.perf_counter() - t  # with the compile (and its workers' time)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # tf32 is global: undo
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return losses, times, first_wall, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="images per step (EDM CIFAR-10 per GPU: 64)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (the last ones of each run)")
    p.add_argument("--loss-steps", type=int, default=4, help="steps per run; the loss is read at the last")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (EDM CIFAR-10, no ramp-up)")
    p.add_argument("--precisions", default=None, help="default: fp32,tf32,bf16 on CUDA, fp32,bf16 on CPU")
    p.add_argument("--compile", default="off,on", help="off,on | off | on")
    p.add_argument("--channels-last", default="off,on", help="off,on | off | on")
    p.add_argument("--fused-adam", default="off,on", help="off,on | off | on")
    p.add_argument(
        "--grid", choices=["full", "axes"], default=None, help="default: full on CUDA, axes on CPU"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--out", default="train_throughput.json", help="JSON output")
    args = p.parse_args(argv)
    if args.steps >= args.loss_steps:
        p.error("--steps must be smaller than --loss-steps (the first steps are warm-up)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # as edm_teacher.train
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # tf32 changes CUDA matmuls/convs only: on a CPU it is fp32 by construction, so not measured there
    precisions = (args.precisions or ("fp32,tf32,bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    onoff = {
        k: [v == "on" for v in getattr(args, k).split(",")]
        for k in ("compile", "channels_last", "fused_adam")
    }
    torch.manual_seed(0)
    init = E.build_net(CIFAR10_DDPMPP).state_dict()
    images = (torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    rows, base = [], None
    combos = list(
        itertools.product(precisions, onoff["compile"], onoff["channels_last"], onoff["fused_adam"])
    )
    if (args.grid or ("full" if device.type == "cuda" else "axes")) == "axes":  # one flag at a time, then all
        top = (precisions[-1], max(onoff["compile"]), max(onoff["channels_last"]), max(onoff["fused_adam"]))
        keep = {("fp32", False, False, False), (top[0], top[1], False, False), top}
        combos = [c for c in combos if sum(map(bool, (c[0] != "fp32", *c[1:]))) <= 1 or c in keep]
    for precision, comp, cl, fused in combos:
        config = dict(precision=precision, compile=comp, channels_last=cl, fused_adam=fused)
        losses, times, first_wall, peak = run(config, init, images, args, device)
        step_s = sum(times[-args.steps :]) / args.steps
        row = dict(
            **config, img_s=args.batch / step_s, first_step_wall_s=first_wall, loss=losses[-1], losses=losses
        )
        row["step_s"] = step_s
        row["peak_gib"] = peak
        if base is None and not (comp or cl or fused) and precision == "fp32":
            base = row
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    noise = None
    if base is not None:  # the loss's own noise: fp32 eager with other draws (seed 1)
        config = dict(precision="fp32", compile=False, channels_last=False, fused_adam=False)
        noise = abs(run(config, init, images, args, device, seed=1)[0][-1] - base["loss"])
    for row in rows:
        row["speedup"] = row["img_s"] / base["img_s"] if base else None
        row["loss_diff"] = row["loss"] - base["loss"] if base else None
    gpu = device.type == "cuda"
    head = "precision compile channels_last fused_adam | x fp32 eager | loss (diff) | 1st step s (compile)"
    print(f"\n{head}" + (" | img/s | peak GiB" if gpu else ""))
    for r in rows:
        flags = " ".join(f"{str(r[k]):>5}" for k in ("compile", "channels_last", "fused_adam"))
        line = f"{r['precision']:>5} {flags} | {r['speedup']:.2f}x | {r['loss']:.4f} ({r['loss_diff']:+.4f})"
        line += f" | {r['first_step_wall_s']:.1f}"
        print(line + (f" | {r['img_s']:.0f} | {r['peak_gib']:.2f}" if gpu else ""))
    if noise is not None:
        print(f"loss noise (fp32 eager, seed 1 vs seed 0, step {args.loss_steps}): {noise:.4f}")
    info = dict(
        device=torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        params=sum(t.numel() for t in init.values() if t.is_floating_point()),
        config=CIFAR10_DDPMPP,
        args=vars(args),
        loss_noise=noise,
        results=rows,
    )
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
