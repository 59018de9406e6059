"""gen_pairs.py throughput against its forward-only bound, as a ratio measured in one run.

    python bench/gen_pairs.py --out bench/gen_pairs_cpu.json                      # CPU, tiny net
    python bench/gen_pairs.py --config cifar10 --num 4096 --batch 512 --out g.json # GPU, EDM DDPM++

bound = the time of nfe x (num / batch) forward passes of the same network at the same batch, with no
sampler arithmetic, noise generation or I/O. ratio = bound / (gen_pairs wall time, teacher loading
excluded); 1.0 means the tool adds nothing to the network's own cost. The goal is >= 0.9.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edm_teacher as E  # noqa: E402
import gen_pairs as G  # noqa: E402

CONFIGS = {
    "tiny": dict(
        img_resolution=16,
        img_channels=3,
        label_dim=0,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
    ),
    "cifar10": dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--num", type=int, default=512, help="pairs")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nfe", type=int, default=35)
    p.add_argument("--out", default="gen_pairs_bench.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = CONFIGS[args.config]
    torch.manual_seed(0)
    net = E.build_net(kw).eval().requires_grad_(False)
    sd = net.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher.pt")
        torch.save(
            dict(
                method="edm_teacher",
                version=1,
                args={},
                net_kwargs=kw,
                net=sd,
                ema=sd,
                opt=None,
                step=0,
                kimg=0.0,
                state={},
            ),
            teacher,
        )
        out = os.path.join(tmp, "pairs.npz")
        flags = [
            "--ckpt",
            teacher,
            "--num-pairs",
            str(args.num),
            "--out",
            out,
            "--batch",
            str(args.batch),
            "--nfe",
            str(args.nfe),
        ]
        G.main([*flags, "--out", os.path.join(tmp, "warmup.npz"), "--num-pairs", str(args.batch)])
        t_load = time.perf_counter()
        G.load_model(teacher, device)  # what gen_pairs spends before generating (excluded below)
        t_load = time.perf_counter() - t_load
        t = time.perf_counter()
        G.main(flags)
        t_gen = time.perf_counter() - t - t_load
        size = os.path.getsize(out)
    net = net.to(device)
    x = torch.randn(args.batch, 3, kw["img_resolution"], kw["img_resolution"], device=device)
    sigma = torch.full([args.batch], 1.0, device=device)
    calls = args.nfe * -(-args.num // args.batch)
    with torch.no_grad():
        net(x, sigma)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            net(x, sigma)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_bound = time.perf_counter() - t
    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        config=args.config,
        num=args.num,
        batch=args.batch,
        nfe=args.nfe,
        file_bytes=size,
        gen_pairs_s=t_gen,
        forward_bound_s=t_bound,
        pairs_per_s=args.num / t_gen,
        bound_pairs_per_s=args.num / t_bound,
        ratio=t_bound / t_gen,
    )
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
