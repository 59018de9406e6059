"""Our exact minibatch OT against torchcfm's OTPlanSampler (method="exact") on CIFAR-10-sized batches, and our
Sinkhorn at its default against POT's log-domain ot.sinkhorn at the same eps, in one run; JSON out.

    pip install --no-deps torchcfm==1.0.7 pot    # the references only (not in requirements.txt)
    python bench/ot_vs_torchcfm.py --out bench/ot_vs_torchcfm_cpu.json

Each batch: noise x0 ~ N(0, I) and images x1 with CIFAR-10's pixel statistics (N(-0.05, 0.5^2) clipped to
[-1, 1]), 3 x 32 x 32, squared L2 cost. Exact OT: `cfm_couplings.ot_permutation` (float32 cdist, scipy's
linear_sum_assignment), the same with a float64 cost matrix (the code before issue 33), and torchcfm's
`OTPlanSampler.get_map` (float32 cdist, POT's emd); the rows report the median time per solve, and how often
the float32 permutation differs from float64's and from torchcfm's plan. Sinkhorn (`--sinkhorn`): ours
(`sinkhorn_log_plan`, eps = 1e-3 x mean cost, eps-scaling, row-marginal L1 error < 1e-4) vs POT's
`ot.sinkhorn(method="sinkhorn_log")` at the same eps with stopThr 1e-4 and 1e-5 (it tests the L2 norm of its
column error, a looser test): time, iterations, the marginal L1 error reached and the plan's mass on the
optimal permutation (sharpness).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cfm_couplings as C  # noqa: E402


def batch(n, g):  # noise, and images with CIFAR-10's pixel mean and std
    return torch.randn(n, 3, 32, 32, generator=g), (
        torch.randn(n, 3, 32, 32, generator=g) * 0.5 - 0.05
    ).clamp(-1, 1)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def exact_rows(sizes, repeats, seed):
    from scipy.optimize import linear_sum_assignment
    from torchcfm.optimal_transport import OTPlanSampler

    theirs, rows = OTPlanSampler(method="exact"), []
    for n in sizes:
        g, t32, t64, tcfm, diff64, difftcfm = torch.Generator().manual_seed(seed + n), [], [], [], 0, 0
        for _ in range(repeats):  # interleaved, so that machine load hits all three alike
            x0, x1 = batch(n, g)
            perm, dt = timed(C.ot_permutation, x0, x1)
            t32.append(dt)
            p64, dt = timed(lambda a, b: linear_sum_assignment(C.pair_cost(a, b).numpy())[1], x0, x1)
            t64.append(dt)
            plan, dt = timed(theirs.get_map, x0, x1)  # plan[noise i, image j], as torchcfm calls it
            tcfm.append(dt)
            diff64 += not np.array_equal(perm.numpy(), p64)
            difftcfm += not np.array_equal(perm.numpy(), plan.argmax(0))
        ms = lambda v: round(1e3 * statistics.median(v), 2)  # noqa: E731
        rows.append(dict(n=n, batches=repeats, ours_float32_ms=ms(t32), ours_float64_ms=ms(t64),
                         torchcfm_ms=ms(tcfm), torchcfm_over_ours=round(ms(tcfm) / ms(t32), 2),
                         float64_over_float32=round(ms(t64) / ms(t32), 2),
                         perm_differs_from_float64=diff64, perm_differs_from_torchcfm=difftcfm))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sinkhorn_rows(sizes, repeats, seed, reg=C.SINKHORN_REG, tol=1e-4):
    import ot

    rows = []
    for n in sizes:
        g, r = torch.Generator().manual_seed(seed + n), dict(n=n, batches=repeats, reg=reg)
        for _ in range(repeats):
            x0, x1 = batch(n, g)
            c, perm = C.pair_cost(x0, x1), C.ot_permutation(x0, x1)  # ours: L1 row error < tol, columns exact
            eps, u = reg * c.mean().item(), torch.full((n,), 1 / n, dtype=torch.float64)
            ours, dt = timed(lambda cc: C.sinkhorn_log_plan(cc, reg, tol=tol).exp(), c)
            stats = dict(s=dt, mass_on_optimal=ours[torch.arange(n), perm].sum().item())
            for k, v in stats.items():
                r.setdefault(f"ours_{k}", []).append(v)
            r.setdefault("ours_marginal_l1", []).append((ours.sum(1) - 1 / n).abs().sum().item())
            for thr in (tol, tol / 10):  # POT stops on the L2 norm of its column error: a looser test
                kw = dict(method="sinkhorn_log", numItermax=100_000, stopThr=thr, log=True)
                (pot, log), dt = timed(ot.sinkhorn, u, u, c, eps, **kw)
                stats = dict(
                    s=dt, mass_on_optimal=pot[torch.arange(n), perm].sum().item(), iterations=log["niter"]
                )
                stats["marginal_l1"] = (pot.sum(0) - 1 / n).abs().sum().item()
                for k, v in stats.items():
                    r.setdefault(f"pot_stopthr{thr:g}_{k}", []).append(v)
        rows.append(
            {k: float(f"{statistics.median(v):.4g}") if isinstance(v, list) else v for k, v in r.items()}
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,256,512", help="batch sizes")
    p.add_argument("--repeats", type=int, default=10, help="batches per size (median time)")
    p.add_argument("--sinkhorn", default="128", help="sizes for the Sinkhorn comparison ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ot_vs_torchcfm.json", help="JSON output")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sizes = [int(s) for s in args.sizes.split(",")]
    info = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads())  # fmt: skip
    info["exact"] = exact_rows(sizes, args.repeats, args.seed)
    if args.sinkhorn:
        info["sinkhorn"] = sinkhorn_rows([int(s) for s in args.sinkhorn.split(",")], 3, args.seed)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
