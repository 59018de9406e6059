"""Seconds per lmm.py training step for each ingredient of LMM Table 7, as ratios to the L2 step of one run.

    python bench/lmm_step.py --out bench/lmm_step_cpu.json          # CPU: tiny and full net, batch 8
    python bench/lmm_step.py --batch 128 --steps 7 --warmup 3 --out bench/lmm_step_gpu.json   # GPU

Each configuration runs lmm.py's own training loop (`main`) on CIFAR-10 shapes (3 x 32 x 32 pairs, 10 classes,
synthetic real images). Each step is timed from its start (its first batch_indices call) to the next step's,
in wall-clock seconds and in CPU seconds of this process (all threads: less skewed when other processes share
the machine); the means after --warmup steps are kept:
  l2          Eq. 3 with the squared L2 distance (the L2 column; also the 80k pre-training steps' loop)
  lpips       Eq. 3 with LPIPS-VGG at 224 px (the distance of the adversarial phase; 64 px before it)
  lpips+adv   the adversarial phase as run: --disc ctm (DeiT-B + EfficientNet-lite0 at 224 px, CTM's heads),
              the adaptive weight, DiffAugment per network, --g-period 2: generator steps (LPIPS + L_G +
              lambda_adapt) alternate with discriminator steps (N_theta forward, D on fakes and reals)
For lpips+adv the G steps and D steps are also timed apart; `per_g_update` = G + D step (what one update of
N_theta costs in that phase). The feature networks run with random weights (no download; the same
arithmetic as the pretrained ones).
"""

import argparse
import contextlib
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
    "lpips+adv": ["--adv-start", "0", "--lpips-res", "224", "--disc", "ctm", "--disc-random-weights"],
}


@contextlib.contextmanager
def step_timer(out):
    """Append (wall s, CPU s) for each training step lmm.main runs inside: from the step's first batch_indices
    call (the pairs' order, seed 0; the real images' order uses seed 1) to the next step's, the last step to
    its checkpoint's atomic_save."""
    batch_indices, atomic_save, marks = lmm.batch_indices, lmm.atomic_save, []

    def timed_batch_indices(n, batch, step, seed):
        if seed == 0:
            marks.append((time.perf_counter(), time.process_time()))
        return batch_indices(n, batch, step, seed)

    def timed_save(obj, path):
        marks.append((time.perf_counter(), time.process_time()))
        return atomic_save(obj, path)

    lmm.batch_indices, lmm.atomic_save = timed_batch_indices, timed_save
    try:
        yield
    finally:
        lmm.batch_indices, lmm.atomic_save = batch_indices, atomic_save
        out.extend((b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:], strict=False))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--steps", type=int, default=3, help="steps per configuration (odd: as many G as D steps)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the means")
    p.add_argument("--nets", default="tiny,full")
    p.add_argument("--out", default="lmm_step_bench.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    n, load = max(64, args.batch), [os.getloadavg()[0]]  # other processes on the machine skew the times
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs, data = os.path.join(tmp, "pairs.npz"), os.path.join(tmp, "data.npz")
        x0 = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        np.savez(pairs, noise=x0, data=np.tanh(x0), label=np.arange(n) % 10)
        np.savez(data, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
        for net in args.nets.split(","):
            for name, flags in CONFIGS.items():
                outdir = os.path.join(tmp, f"{net}-{name}")
                t0, steps = time.time(), []
                with step_timer(steps):
                    lmm.main(
                        [
                            "--pairs", pairs, "--data", data, "--outdir", outdir, "--batch", str(args.batch),
                            "--duration", str(args.batch * args.steps / 1e6), "--log-every", "1",
                            "--grid", "0", "--lpips-random-trunk", "--cond", *NETS[net], *flags,
                        ]
                    )  # fmt: skip
                with open(os.path.join(outdir, "log.jsonl")) as f:  # generator steps log L_lines
                    steps = [(*t, "L_lines" in json.loads(r)) for t, r in zip(steps, f, strict=True)]
                steps = steps[args.warmup :]
                r = dict(wall_s=time.time() - t0)
                for i, pre in enumerate(("", "cpu_")):
                    r[f"{pre}sec_per_step"] = statistics.mean(x[i] for x in steps)
                    if name == "lpips+adv":  # generator steps log L_lines, discriminator-only steps do not
                        g = statistics.mean(x[i] for x in steps if x[2])
                        d = statistics.mean(x[i] for x in steps if not x[2])
                        r.update({f"{pre}g_step": g, f"{pre}d_step": d, f"{pre}per_g_update": g + d})
                results[f"{net}/{name}"] = r
                print(f"{net}/{name}: {r['sec_per_step']:.3f} s, {r['cpu_sec_per_step']:.3f} CPU s per step")
            base = results[f"{net}/l2"]
            for name in CONFIGS:
                r = results[f"{net}/{name}"]
                for k in ("sec_per_step", "g_step", "d_step", "per_g_update"):
                    for pre in ("", "cpu_"):
                        if pre + k in r:
                            r[f"{pre}{k}_ratio_to_l2"] = r[pre + k] / base[f"{pre}sec_per_step"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = dict(
        device=device,
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        load_avg_1min_start_end=[*load, os.getloadavg()[0]],
        results=results,
    )
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
