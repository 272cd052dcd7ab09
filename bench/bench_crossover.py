"""Shared vs independent contexts: which estimator reaches a statistic's standard error with
fewer forwards, as a function of the number of pairs. The measured crossover is what
`context_sharing = auto` uses (analysis/sampled.py: SHARED_SIGNED_MEAN_MAX_PAIRS).

Run from the repository root: `python bench/bench_crossover.py [--images 4] [--samples 20]`.
Both estimators run side by side in this process on the same onnxruntime session, on the demo
digits CNN, an 8 x 8 grid (64 players), the first P neighbor pairs, twelve orders.

Efficiency at equal standard error: (forwards_independent * se_independent^2) /
(forwards_shared * se_shared^2), > 1 when shared contexts win. Samples ~ 1/se^2, so this is
the ratio of forwards each needs to reach the same se. Averaged over images (se^2 first).
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_engine import CHUNK, ROOT, Evaluate, evaluator

from interscope_server.analysis.baselines import ZeroBaseline
from interscope_server.analysis.game import ModelGame
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.sampled import SampledEstimator, estimate, orders_from_ratios
from interscope_server.analysis.values import ValueFunction
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
#: (name, OrderStats attribute) of each statistic whose SE we compare.
STATISTICS = (
    ("per-pair I", "pair_se"),
    ("strength mean|I|", "mean_abs_stderr"),
    ("signed mean", "mean_stderr"),
)


def run(
    evaluate: Evaluate,
    x: np.ndarray,
    y: int,
    pairs: np.ndarray,
    orders: np.ndarray,
    samples: int,
    independent: bool,
    seed: int,
) -> tuple[int, dict[str, float]]:
    """Forwards spent and, per statistic, the mean squared standard error over orders."""
    grid = GridPlayers(8, 8)
    game = ModelGame(evaluate, x, grid, ZeroBaseline(), ValueFunction.LOG_PROB, y, chunk_size=CHUNK)
    plan = SampledEstimator(pairs, orders, samples, seed=seed, independent=independent).plan(64)
    stats = estimate(game, plan, CHUNK)
    se2: dict[str, float] = {}
    for name, attr in STATISTICS:
        values = [np.nanmean(np.asarray(getattr(s, attr), dtype=float) ** 2) for s in stats]
        se2[name] = float(np.nanmean(values))
    return game.forwards, se2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--pairs", default="1,2,4,8,16,32,64,112")
    args = parser.parse_args()
    repo = build_demo_repository(ROOT / ".cache" / "demo-repository")
    evaluate = evaluator(repo / "digits-cnn", 1)
    with np.load(repo / TEST_DATA_FILE) as data:
        xs, ys = data["x"][: args.images], data["y"][: args.images]
    all_pairs = GridPlayers(8, 8).neighbor_pairs(1)
    rng = np.random.default_rng(0)
    orders = orders_from_ratios(RATIOS, 64)
    print(
        f"{len(all_pairs)} neighbor pairs on 8 x 8; {len(orders)} orders; "
        f"~{args.samples} contexts per pair and order; {args.images} images"
    )
    print("pairs  " + "  ".join(f"{name:>18}" for name, _ in STATISTICS) + "   fwd shared/indep")
    for p in (int(s) for s in args.pairs.split(",")):
        pairs = all_pairs[np.sort(rng.choice(len(all_pairs), size=p, replace=False))]
        ratio: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n, _ in STATISTICS}
        fwd = []
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            fs, ss = run(evaluate, x, int(y), pairs, orders, args.samples, False, k)
            fi, si = run(evaluate, x, int(y), pairs, orders, args.samples, True, k)
            fwd.append(fs / fi)
            for name, _ in STATISTICS:
                ratio[name].append((fi, si[name], fs, ss[name]))
        cells = []
        for name, _ in STATISTICS:
            fi, si, fs, ss = (np.mean([r[i] for r in ratio[name]]) for i in range(4))
            cells.append(f"{fi * si / (fs * ss):>17.2f}x")
        print(f"{p:>5}  " + "  ".join(cells) + f"   {np.mean(fwd):.2f}", flush=True)


if __name__ == "__main__":
    main()
