"""Engine benchmark: exact vs raw forwards, shared vs per-pair sampling, exact vs shapiq, memory.

Run from the repository root: `python bench/bench_engine.py [--skip-n20] [--skip-shapiq]`.
Every comparison runs side by side in this one process on the same onnxruntime session.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from interscope_server.analysis.baselines import ZeroBaseline
from interscope_server.analysis.game import ModelGame, coalitions_from_bitmasks
from interscope_server.analysis.players import GridPlayers
from interscope_server.analysis.profile import EstimatorChoice, ProfileSpec, run_profile
from interscope_server.analysis.sampled import SampledEstimator, estimate, orders_from_ratios
from interscope_server.analysis.values import ValueFunction
from interscope_server.demo import TEST_DATA_FILE, build_demo_repository

ROOT = Path(__file__).resolve().parent.parent
Evaluate = Callable[[np.ndarray], np.ndarray]
CHUNK = 1024


def evaluator(model_dir: Path, threads: int) -> Evaluate:
    config = json.loads((model_dir / "config.json").read_text())
    mean = np.float32(config["normalization"]["mean"][0])
    std = np.float32(config["normalization"]["std"][0])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model_dir / config["file"]), options, providers=["CPUExecutionProvider"]
    )

    def evaluate(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"input": (x - mean) / std})[0])

    return evaluate


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_exact_vs_raw(evaluate: Evaluate, x: np.ndarray, y: int, repeats: int) -> None:
    n = 16
    spec = ProfileSpec(
        players=GridPlayers(4, 4),
        estimator=EstimatorChoice.EXACT,
        chunk_size=CHUNK,
        return_pairs=True,
    )
    game = ModelGame(evaluate, x, GridPlayers(4, 4), ZeroBaseline(), ValueFunction.LOG_PROB, y)
    masked = np.concatenate(
        [
            game.masked_inputs(coalitions_from_bitmasks(np.arange(s, s + CHUNK), n)).copy()
            for s in range(0, 2**n, CHUNK)
        ]
    )

    def raw() -> None:
        for s in range(0, 2**n, CHUNK):
            evaluate(masked[s : s + CHUNK])

    t_raw = best_of(repeats, raw)
    t_exact = best_of(repeats, lambda: run_profile(evaluate, x, spec, y))
    prof = run_profile(evaluate, x, spec, y)
    print(
        f"(a) exact n=16 profile: {t_exact:.3f} s; raw forwards over the same 65,536 masked "
        f"inputs: {t_raw:.3f} s; ratio {t_exact / t_raw:.3f} (target <= 1.15); "
        f"post-forward numerics {prof.timings.get('compute_s', 0.0):.3f} s; "
        f"efficiency residual {prof.efficiency_residual:.1e}"
    )


def bench_sampling(evaluate: Evaluate, x: np.ndarray, y: int, samples: int) -> None:
    grid = GridPlayers(8, 8)
    n = grid.n_players
    pairs = grid.neighbor_pairs(1)
    orders = orders_from_ratios((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0), n)

    def game() -> ModelGame:
        return ModelGame(
            evaluate, x, grid, ZeroBaseline(), ValueFunction.LOG_PROB, y, chunk_size=CHUNK
        )

    g_ours = game()
    t = time.perf_counter()
    plan = SampledEstimator(pairs, orders, samples, seed=0).plan(n)
    stats = estimate(g_ours, plan, CHUNK)
    t_ours = time.perf_counter() - t
    se_ours = float(np.nanmean([np.nanmean(s.pair_se) for s in stats]))
    agg_ours = float(np.mean([s.mean_stderr for s in stats]))

    # The paper's scheme: every pair its own contexts, 4 forwards per sample.
    g_pp = game()
    t = time.perf_counter()
    plan_pp = SampledEstimator(pairs, orders, samples, seed=0, independent=True).plan(n)
    stats_pp = estimate(g_pp, plan_pp, CHUNK)
    t_pp = time.perf_counter() - t
    se_pp = float(np.nanmean([np.nanmean(s.pair_se) for s in stats_pp]))
    agg_pp = float(np.mean([s.mean_stderr for s in stats_pp]))
    # Time to reach a given SE scales as SE^2 (samples ~ 1/SE^2): compare at equal per-pair SE.
    equal_se = (t_pp * se_pp**2) / (t_ours * se_ours**2)
    # Shared contexts correlate the pairs' errors, so an order's mean over pairs gains less.
    equal_agg = (t_pp * agg_pp**2) / (t_ours * agg_ours**2)
    print(
        f"(b) {n} players, {len(pairs)} neighbor pairs, {len(orders)} orders, ~{samples} "
        f"contexts per pair: shared contexts {g_ours.forwards} forwards for {plan.samples} "
        f"Delta v samples = {g_ours.forwards / plan.samples:.3f} forwards/sample "
        f"(target <= 1.5; per-pair scheme "
        f"{g_pp.forwards / (len(pairs) * len(orders) * samples):.0f})"
        f"; wall {t_ours:.2f} s vs {t_pp:.2f} s; mean per-pair SE {se_ours:.4f} vs {se_pp:.4f}; "
        f"aggregate SE {agg_ours:.5f} vs {agg_pp:.5f}; speed-up at equal per-pair SE "
        f"{equal_se:.2f}x (target >= 2); at equal aggregate (order-mean) SE {equal_agg:.2f}x"
    )
    for op in plan.order_plans:
        print(
            f"    m={op.order:2d} {'inside ' if op.inside else 'outside'} "
            f"{op.forwards / max(op.samples, 1):.3f} forwards/sample"
        )


def bench_shapiq(evaluate: Evaluate, x: np.ndarray, y: int) -> None:
    from shapiq import ExactComputer

    n = 16
    spec = ProfileSpec(players=GridPlayers(4, 4), estimator=EstimatorChoice.EXACT, chunk_size=CHUNK)
    t = time.perf_counter()
    ours = run_profile(evaluate, x, spec, y)
    t_ours = time.perf_counter() - t
    game = ModelGame(
        evaluate, x, GridPlayers(4, 4), ZeroBaseline(), ValueFunction.LOG_PROB, y, chunk_size=CHUNK
    )
    t = time.perf_counter()
    computer = ExactComputer(game, n_players=n)
    sii = computer("SII", order=2)
    t_shapiq = time.perf_counter() - t
    theirs = np.zeros((n, n))
    for (i, j), idx in ((k, v) for k, v in sii.interaction_lookup.items() if len(k) == 2):
        theirs[i, j] = theirs[j, i] = sii.values[idx]
    assert ours.shapley_interaction is not None
    diff = float(np.abs(theirs - ours.shapley_interaction).max())
    print(
        f"(c) exact n=16 (all orders, all pairs, SII, Shapley values): {t_ours:.2f} s; shapiq "
        f"ExactComputer SII order 2: {t_shapiq:.2f} s; speed-up {t_shapiq / t_ours:.1f}x "
        f"(target >= 8); max |SII difference| {diff:.1e}"
    )


def exact_n20_child(model_dir: str, x_index: int) -> None:
    """Run in a subprocess so its peak RSS is this profile's alone."""
    evaluate = evaluator(Path(model_dir), threads=2)
    with np.load(Path(model_dir).parent / TEST_DATA_FILE) as data:
        x, y = data["x"][x_index], int(data["y"][x_index])
    spec = ProfileSpec(
        players=GridPlayers(4, 5),
        estimator=EstimatorChoice.EXACT,
        chunk_size=CHUNK,
        max_forwards=2**21,
    )
    t = time.perf_counter()
    prof = run_profile(evaluate, x, spec, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        f"    exact n=20: {prof.forwards} forwards in {time.perf_counter() - t:.1f} s "
        f"(numerics {prof.timings.get('compute_s', 0.0):.2f} s); peak RSS {peak:.2f} GiB "
        f"(target < 4); efficiency residual {prof.efficiency_residual:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--skip-shapiq", action="store_true")
    parser.add_argument("--skip-n20", action="store_true")
    parser.add_argument("--n20-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n20_child:
        exact_n20_child(args.n20_child, 3)
        return
    repo = build_demo_repository(ROOT / ".cache" / "demo-repository")
    evaluate = evaluator(repo / "digits-cnn", args.threads)
    with np.load(repo / TEST_DATA_FILE) as data:
        x, y = data["x"][3], int(data["y"][3])
    print(f"demo CNN digits-cnn, onnxruntime CPU, {args.threads} thread(s), chunk {CHUNK}")
    bench_exact_vs_raw(evaluate, x, y, args.repeats)
    bench_sampling(evaluate, x, y, args.samples)
    if not args.skip_shapiq:
        bench_shapiq(evaluate, x, y)
    if not args.skip_n20:
        print("(d) memory of an exact n=20 profile (4x5 grid), in a subprocess:")
        subprocess.run(
            [sys.executable, __file__, "--n20-child", str(repo / "digits-cnn")], check=True
        )


if __name__ == "__main__":
    main()
