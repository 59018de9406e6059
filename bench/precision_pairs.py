"""What --precision bf16 (and --compile) do to gen_pairs' pairs: the same pairs in fp32 and under the flag.

    python bench/precision_pairs.py --out bench/precision_pairs_cpu.json

Pairs are ODE solutions (EDM Heun, 18 steps = 35 NFE; a flow's Euler), so a change of arithmetic moves the
endpoint x1 for the same noise x0. Teachers: the tests' tiny 16x16 EDM denoiser and CFM velocity net with
random weights perturbed by N(0, 0.05^2) (visibly non-trivial outputs, no training needed). Prints max / mean
|x1(bf16) - x1(fp32)| over --num pairs, next to the data's own scale (mean |x1|); writes JSON.
"""

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cfm_couplings  # noqa: E402
import edm_teacher  # noqa: E402
import gen_pairs  # noqa: E402

TINY = dict(img_resolution=16, img_channels=3, label_dim=0, dropout=0.0, model_channels=16)
TINY.update(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


def teacher(module):
    torch.manual_seed(0)
    net = module.build_net(TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=64, help="pairs per teacher")
    p.add_argument("--precisions", default="bf16", help="compared with fp32")
    p.add_argument("--out", default="precision_pairs.json", help="JSON output")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for module, nfe in ((edm_teacher, 35), (cfm_couplings, 8)):
        net = teacher(module).to(device)
        ref = gen_pairs.make_pairs(module, net, 0, args.num, 0, (3, 16, 16), 0, nfe, args.num, device)[1]
        for precision in args.precisions.split(","):
            # --precision as the method files run it: bf16 autocast around the network calls, tf32 a switch
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                x1 = gen_pairs.make_pairs(module, net, 0, args.num, 0, (3, 16, 16), 0, nfe, args.num, device)
            d = (x1[1] - ref).abs()
            rows.append(
                dict(
                    teacher=module.METHOD,
                    nfe=nfe,
                    precision=precision,
                    max_abs_diff=d.max().item(),
                    mean_abs_diff=d.mean().item(),
                    data_mean_abs=ref.abs().mean().item(),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    info = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        num=args.num,
        results=rows,
    )
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
