"""What online Adam steps do to a freshly fitted learned inverse, from empty or filled moments.

The pirate of ``l_invadv`` with ``invadv_refit_every`` is replaced by the grid's fit
(:func:`raeg_pl.defenses.pirate.fit_inverse`) to its last pairs, then learns online. This
fits the inverse to ``--pairs`` clean/protected pairs of an exported protected folder, then
takes ``--steps`` online Adam steps on further pairs (batch 64) three ways: from empty
moments at the online rate, from moments filled by rate-0 steps on the fitted pairs (what
:class:`~raeg_pl.losses.inverse_adversary.InverseAdversary` does), and from empty moments at
a tenth of the rate; and prints the PSNR of its output on 1,000 held-out images after 1, 5,
20 and all steps.

    .venv/bin/python benchmarks/inverse_online_steps.py \\
        --protected runs/tables/quick_ablation/methods/inverse_adversary/protected/train \\
        --clean runs/tables/quick_ablation/methods/clean/clean/train
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from raeg_pl.data.cache import default_cache_dir, load_split_cached
from raeg_pl.defenses.pirate import fit_inverse
from raeg_pl.losses.inverse_adversary import fill_moments
from raeg_pl.utils.quantize import from_uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protected", type=Path, required=True, help="exported protected folder")
    ap.add_argument("--clean", type=Path, required=True, help="its clean originals' folder")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--fit-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60, help="online steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="the online rate (invadv_lr)")
    args = ap.parse_args()
    prot, _, _ = load_split_cached(args.protected, default_cache_dir(), "RGB")
    clean, _, _ = load_split_cached(args.clean, default_cache_dir(), "RGB")
    if prot.files != clean.files:
        raise SystemExit(f"{args.protected} and {args.clean} do not hold the same files")
    P, C, Y = prot.images, clean.images, prot.labels
    need = args.pairs + 64 * args.steps + 1000
    if len(Y) < need:
        raise SystemExit(f"{args.protected}: {len(Y)} images, {need} needed")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(Y), generator=g)
    fit_i = perm[: args.pairs]
    online_i = perm[args.pairs : args.pairs + 64 * args.steps]
    held = perm[need - 1000 : need]
    net = fit_inverse(P[fit_i], C[fit_i], Y[fit_i], len(prot.classes), steps=args.fit_steps)

    def psnr(n, idx) -> float:
        with torch.no_grad():
            mse = F.mse_loss(n(from_uint8(P[idx]), Y[idx]), from_uint8(C[idx]))
        return round(-10 * math.log10(float(mse)), 2)

    stored = -10 * math.log10(float(F.mse_loss(from_uint8(P[held]), from_uint8(C[held]))))
    print(f"held-out: stored {stored:.2f} dB, fitted inverse {psnr(net, held)} dB")
    for name, warm, lr in (
        ("empty moments", False, args.lr),
        ("moments filled at rate 0", True, args.lr),
        ("empty moments, a tenth of the rate", False, args.lr / 10),
    ):
        n = copy.deepcopy(net).train()
        opt = torch.optim.Adam(n.parameters(), lr=lr)
        if warm:
            fill_moments(n, opt, from_uint8(P[fit_i]), from_uint8(C[fit_i]), Y[fit_i], seed=1)
        out = {}
        for s in range(args.steps):
            idx = online_i[s * 64 : (s + 1) * 64]
            loss = F.mse_loss(n(from_uint8(P[idx]), Y[idx]), from_uint8(C[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s + 1 in (1, 5, 20, args.steps):
                out[s + 1] = psnr(n, held)
        print(f"{name}: held-out dB after online steps {out}")


if __name__ == "__main__":
    main()
