"""Cost of the coupling: training seconds per step with each coupling divided by its baseline's, and the
solve time of each matcher against problem size. Shared by the coupling methods: cfm_couplings and loom_cfm
against independent CFM, dansm against plain rectified flow, aot_edm against edm_teacher.py.

    # CPU: the full UNet at batch 8 (about 7 s per step)
    python bench/coupling_overhead.py --full-batch 8 --steps 3 --warmup 1 --hungarian-max 2000 \\
        --out bench/coupling_overhead_cpu.json
    # GPU: batch 128 everywhere
    python bench/coupling_overhead.py --steps 20 --warmup 3 --out bench/coupling_overhead_gpu.json

Part 1 runs each method's own training loop (`main`) on CIFAR-10 shapes (10,240 synthetic 3 x 32 x 32
images, unconditional) and keeps the median `sec_per_step` of its log after --warmup steps; everything a
coupling costs is inside it (noise, cost matrix, solve, reordering). Where the solve falls on one step in
several (AOT's rounds, DANSM's pools), its amortised share (the mean logged solve_s / match_s)
is added to the median. Part 2 times the solvers alone on the training device: exact OT, Sinkhorn and DANSM's
greedy matching for n = 128 .. 2048, then DANSM greedy vs Hungarian for pools of 1,000 .. 10,000.

Part 3 (AOT's solve overlap, issue 20): edm_teacher.py, then aot_edm.py with --overlap off (the solve in the
training thread) and on (round r + 1 solved in a background thread while round r trains), for N = 512 and
2048, with the tiny UNet at --aot-batch 128 on one process. It times whole rounds: the mean `sec_per_step` of
two rounds after a first round of warm-up (whose solve nothing can hide), so every wait and every slowdown by
the solver thread is inside the figure; ratios are to edm_teacher.py's mean. `--aot-only` runs just this part:

    python bench/coupling_overhead.py --aot-only --aot-res 16 --aot-repeats 2 --aot-threads 1 \\
        --out bench/aot_overlap_cpu.json
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
import aot_edm  # noqa: E402
import cfm_couplings  # noqa: E402
import dansm  # noqa: E402
import edm_teacher  # noqa: E402
import loom_cfm  # noqa: E402

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--num-blocks", "1", "--attn-res", "8"]
NETS = {"tiny": TINY, "full": ["--channel-mult", "2,2,2", "--num-blocks", "4"]}  # full: DDPM++ 55.7M
# Groups of (name: (method module, flags, pooled)); ratios are to the first row of the group. pooled: the
# coupling is solved on one step in several, so its amortised share (mean solve_s) is added to the median.
GROUPS = {
    "flow": {
        "independent": (cfm_couplings, ["--coupling", "independent"], False),
        "ot": (cfm_couplings, ["--coupling", "ot"], False),
        "sinkhorn": (cfm_couplings, ["--coupling", "sinkhorn"], False),  # the default reg (1e-3)
        "loom (4 caches)": (loom_cfm, ["--caches", "4"], False),
    },
    "rfm": {
        "rfm (no matching)": (dansm, ["--matcher", "none"], False),
        "dansm greedy, ms 1000": (dansm, ["--match-size", "1000"], True),
        "dansm greedy, ms 10000": (dansm, ["--match-size", "10000"], True),
        "hungarian, ms 1000": (dansm, ["--matcher", "hungarian", "--match-size", "1000"], True),
    },
    "edm": {
        "edm_teacher": (edm_teacher, [], False),
        "aot (N = 512)": (aot_edm, ["--aot-pairs", "512"], True),
        "aot (N = 2048)": (aot_edm, ["--aot-pairs", "2048"], True),
    },
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_seconds(data, net_flags, config, batch, steps, warmup):
    module, flags, _ = config
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data", data, "--outdir", out, "--batch", str(batch), "--grid", "0"]
        argv += [
            "--duration",
            str((steps + warmup) * batch / 1e6),
            "--log-every",
            "1",
            "--snap-every",
            "100000",
        ]
        module.main(argv + net_flags + flags)
        with open(os.path.join(out, "log.jsonl")) as f:
            recs = [json.loads(line) for line in f][warmup:]
    return statistics.median(r["sec_per_step"] for r in recs), statistics.mean(
        r.get("solve_s", r.get("match_s", 0)) for r in recs
    )


def mean_step_seconds(data, net_flags, module, flags, batch, steps, warmup):
    """Mean sec_per_step of `steps` logged steps after `warmup` (each step is logged: every second counts)."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data", data, "--outdir", out, "--batch", str(batch), "--grid", "0", "--log-every", "1"]
        argv += ["--duration", str((steps + warmup) * batch / 1e6), "--snap-every", "100000"]
        module.main(argv + net_flags + flags)
        with open(os.path.join(out, "log.jsonl")) as f:
            recs = [json.loads(line) for line in f][warmup:]
    return statistics.mean(r["sec_per_step"] for r in recs), statistics.mean(r.get("wait_s", 0) for r in recs)


def wait_ratio(sec, wait):
    """A run's overhead from its own waits: step / (step - wait). Robust to a shared machine's load (both
    terms see it); what a GPU host pays when the solver thread has an otherwise idle CPU core."""
    return sec / (sec - wait)


def aot_overlap(data, sizes, batch, net_flags, repeats=1):
    """Part 3: rows of edm_teacher vs AOT serial vs overlapped at each N, whole rounds timed; the three runs
    alternate --aot-repeats times and each keeps its fastest (load only slows a run down)."""
    rows = []
    configs = {"edm_teacher": (edm_teacher, []), "aot serial": (aot_edm, ["--overlap", "off"]),
               "aot overlapped": (aot_edm, ["--overlap", "on"])}  # fmt: skip
    for n in sizes:
        per_round = n // batch
        steps, warmup = 2 * per_round, per_round
        best = {}
        for _ in range(repeats):
            for name, (module, flags) in configs.items():
                flags = flags + (["--aot-pairs", str(n)] if module is aot_edm else [])
                sec, wait = mean_step_seconds(data, net_flags, module, flags, batch, steps, warmup)
                if name not in best or sec < best[name][0]:
                    best[name] = (sec, wait)
        base = best["edm_teacher"][0]
        for name, (sec, wait) in best.items():
            rows.append(dict(n=n, batch=batch, coupling=name, sec_per_step=sec, ratio=sec / base, wait_s=wait,
                             ratio_from_waits=wait_ratio(sec, wait), steps=steps))  # fmt: skip
            rows[-1]["repeats"] = repeats
        serial, over = rows[-2], rows[-1]
        print(f"AOT N = {n:4d}, batch {batch}, {steps} steps timed: edm {base:.4f} s/step; serial x"
              f"{serial['ratio']:.3f} wall, x{serial['ratio_from_waits']:.3f} from its waits "
              f"({serial['wait_s'] * 1e3:.1f} ms/step); overlapped x{over['ratio']:.3f} wall, "
              f"x{over['ratio_from_waits']:.3f} from its waits ({over['wait_s'] * 1e3:.1f} ms/step)",
              flush=True)  # fmt: skip
    return rows


def solve_seconds(n, device, repeats=3, which=("ot", "sinkhorn", "greedy")):
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, 3, 32, 32, generator=g).to(device)
    x1 = (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).to(device)
    solvers = {
        "ot": lambda: cfm_couplings.ot_permutation(x0, x1),
        "sinkhorn": lambda: cfm_couplings.sinkhorn_pairs(cfm_couplings.sinkhorn_log_plan(
            cfm_couplings.pair_cost(x0, x1)), generator=torch.Generator().manual_seed(0)),  # default reg
        "greedy": lambda: dansm.greedy_match(x1, x0),  # DANSM Alg. 1 (images, noises)
        "hungarian": lambda: dansm.hungarian_match(x1, x0),  # Immiscible Diffusion's, mean squared distance
    }  # fmt: skip
    times = {}
    for name in which:
        fn = solvers[name]
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        times[name] = (time.perf_counter() - t) / repeats
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--tiny-batch", type=int, default=128)
    p.add_argument(
        "--full-batch",
        type=int,
        default=128,
        help="batch of the full-UNet rows (the CPU needs ~1.5 s per image)",
    )
    p.add_argument("--sizes", default="128,256,512,1024,2048", help="problem sizes of the solve timing")
    p.add_argument(
        "--match-sizes", default="1000,2000,5000,10000", help="DANSM pool sizes of the matching curve"
    )
    p.add_argument("--hungarian-max", type=int, default=5000, help="largest pool timed with Hungarian")
    p.add_argument("--aot-sizes", default="512,2048", help="part 3: AOT round sizes N")
    p.add_argument("--aot-batch", type=int, default=128, help="part 3: batch (one process)")
    p.add_argument("--aot-net", default="tiny", choices=sorted(NETS), help="part 3: the UNet")
    p.add_argument("--aot-only", action="store_true", help="run part 3 only")
    p.add_argument("--aot-res", type=int, default=32, help="part 3: image size of the synthetic set")
    p.add_argument("--aot-repeats", type=int, default=1, help="part 3: alternating repeats (fastest kept)")
    p.add_argument(
        "--aot-threads",
        type=int,
        default=0,
        help="part 3: torch threads (1 on a 2-core CPU leaves the solver a core, as a GPU host does; 0: all)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "cifar_shapes.npz")
        rng = np.random.default_rng(0)
        np.savez(data, images=rng.integers(0, 256, (10240, 32, 32, 3), dtype=np.uint8))
        sizes = [int(v) for v in args.aot_sizes.split(",")]
        data3 = os.path.join(tmp, "shapes_aot.npz")
        np.savez(data3, images=rng.integers(0, 256, (10240, args.aot_res, args.aot_res, 3), dtype=np.uint8))
        threads = torch.get_num_threads()
        torch.set_num_threads(args.aot_threads or threads)
        overlap = aot_overlap(data3, sizes, args.aot_batch, NETS[args.aot_net], args.aot_repeats)
        for row in overlap:
            row["torch_threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
        rows = []
        for net, net_flags in [] if args.aot_only else NETS.items():
            batch = args.tiny_batch if net == "tiny" else args.full_batch
            for group, configs in GROUPS.items():
                first = next(iter(configs.values()))
                step_seconds(data, net_flags, first, batch, 1, 1)  # warm caches and allocator
                base = None
                for name, config in configs.items():
                    sec, solve = step_seconds(data, net_flags, config, batch, args.steps, args.warmup)
                    if config[2]:
                        sec += solve
                    base = base or sec
                    rows.append(dict(net=net, batch=batch, group=group, coupling=name,
                                     method=config[0].METHOD, sec_per_step=sec, solve_s=solve,
                                     ratio=sec / base))  # fmt: skip
                    print(f"{net:5s} batch {batch:4d} {name:20s} {sec:8.4f} s/step  x{sec / base:.3f}  "
                          f"(solve {solve * 1e3:.1f} ms/step)", flush=True)  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    solves = []
    for n in [] if args.aot_only else [int(v) for v in args.sizes.split(",")]:
        t = solve_seconds(n, device)
        solves.append(dict(n=n, **t))
        print(
            f"solve n={n:5d}: exact OT {t['ot'] * 1e3:9.1f} ms   sinkhorn {t['sinkhorn'] * 1e3:9.1f} ms   "
            f"DANSM greedy {t['greedy'] * 1e3:9.1f} ms",
            flush=True,
        )
    matching = []
    for n in [] if args.aot_only else [int(v) for v in args.match_sizes.split(",")]:
        t = solve_seconds(n, device, 1, ("greedy", "hungarian") if n <= args.hungarian_max else ("greedy",))
        matching.append(dict(n=n, **t))
        hung = t.get("hungarian", float("nan")) * 1e3
        print(
            f"DANSM pool n={n:6d}: greedy {t['greedy'] * 1e3:9.1f} ms   hungarian {hung:9.1f} ms", flush=True
        )
    n_imagenet = 1_281_167
    tau = torch.arange(n_imagenet)  # LOOM's whole state at ImageNet size, 1 cache
    memory = dict(loom_tau_bytes_imagenet_1cache=tau.numel() * tau.element_size(),
                  loom_noise_store_bytes_cifar10_xflip_4caches=100_000 * 4 * 3 * 32 * 32 * 4)  # fmt: skip
    print(
        f"LOOM assignment at n = {n_imagenet} x 1 cache: "
        f"{memory['loom_tau_bytes_imagenet_1cache'] / 2**20:.1f} MiB"
    )
    result = dict(
        machine=platform.processor() or platform.machine(),
        device=torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu x{torch.get_num_threads()}",
        torch=torch.__version__,
        steps=args.steps,
        training=rows,
        solve=solves,
        matching=matching,
        memory=memory,
        aot_overlap=overlap,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
