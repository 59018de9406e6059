"""Seconds per lmm.py training step for each ingredient of LMM Table 7, as ratios to the L2 step of one run.

    python bench/lmm_step.py --out bench/lmm_step_cpu.json          # CPU: tiny and full net, batch 8
    python bench/lmm_step.py --batch 128 --steps 6 --out lmm_step_gpu.json   # GPU

Each configuration runs lmm.py's own training loop (`main`) on CIFAR-10 shapes (3 x 32 x 32 pairs, 10 classes,
synthetic real images) and the median `sec_per_step` of its log after --warmup steps is kept:
  l2          Eq. 3 with the squared L2 distance
  lpips       Eq. 3 with LPIPS-VGG at 224 px (the paper's adversarial phase; 64 px before it)
  lpips+adv   + the adversarial loss: projected discriminator (EfficientNet-B0 + ViT-B/16 at 224 px), the
              adaptive weight, DiffAugment, and the discriminator step
The feature networks run with random weights (no download; the same arithmetic as the pretrained ones).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lmm  # noqa: E402

NETS = {
    "tiny": ["--tiny"],
    "full": [],  # DDPM++ CIFAR-10: 128 channels, (2, 2, 2), 4 blocks, attention at 16
}
CONFIGS = {
    "l2": ["--loss", "l2", "--adv-start", "off"],
    "lpips": ["--adv-start", "off", "--lpips-res", "224"],
    "lpips+adv": ["--adv-start", "0", "--lpips-res", "224", "--disc", "projected", "--disc-random-weights"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--steps", type=int, default=4, help="steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--nets", default="tiny,full")
    p.add_argument("--out", default="lmm_step_bench.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    n = max(64, args.batch)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs, data = os.path.join(tmp, "pairs.npz"), os.path.join(tmp, "data.npz")
        x0 = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        np.savez(pairs, noise=x0, data=np.tanh(x0), label=np.arange(n) % 10)
        np.savez(data, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
        for net in args.nets.split(","):
            for name, flags in CONFIGS.items():
                outdir = os.path.join(tmp, f"{net}-{name}")
                t0 = time.time()
                lmm.main(
                    [
                        "--pairs", pairs, "--data", data, "--outdir", outdir, "--batch", str(args.batch),
                        "--duration", str(args.batch * args.steps / 1e6), "--log-every", "1", "--grid", "0",
                        "--lpips-random-trunk", *NETS[net], *flags,
                    ]
                )  # fmt: skip
                with open(os.path.join(outdir, "log.jsonl")) as f:
                    log = [json.loads(line) for line in f]
                sec = statistics.median(r["sec_per_step"] for r in log[args.warmup :])
                results[f"{net}/{name}"] = dict(sec_per_step=sec, wall_s=time.time() - t0)
                print(f"{net}/{name}: {sec:.3f} s/step", flush=True)
            base = results[f"{net}/l2"]["sec_per_step"]
            for name in CONFIGS:
                results[f"{net}/{name}"]["ratio_to_l2"] = results[f"{net}/{name}"]["sec_per_step"] / base
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = dict(
        device=device,
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        batch=args.batch,
        steps=args.steps,
        results=results,
    )
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
