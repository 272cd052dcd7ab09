"""The `interscope` command line: serve, demo, models, profile, attack, audit, report, health."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interscope._client import Client
from interscope._exceptions import InterscopeError
from interscope._models import AttackResult, ExampleResult, ModelInfo, ProfileResult, Progress
from interscope._options import (
    ATTACKS,
    CLASS_CHOICES,
    ESTIMATORS,
    NORMS,
    PAIR_MODES,
    VALUE_FUNCTIONS,
    AttackOptions,
    ProfileOptions,
)
from interscope._progress import ProgressBar

#: Exit codes: 0 ok, 1 the server said no (or unhealthy), 2 bad usage (argparse's own).
EXIT_ERROR = 1

# `serve` flags -> Settings fields; only flags that were given override the environment.
_SERVE_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--host", "host", str, "address the gRPC server binds"),
    ("--port", "port", int, "gRPC port; 0 picks a free port"),
    ("--metrics-host", "metrics_host", str, "address /metrics binds"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics port; 0 picks a free port"),
    ("--model-repository", "model_repository", Path, "directory with one folder per model"),
    ("--load-models", "load_models", str, "comma-separated models to load at start"),
    ("--device", "device", str, "auto, cpu or cuda"),
    ("--intra-op-threads", "intra_op_threads", int, "threads per forward pass (0: default)"),
    ("--max-batch-delay-ms", "max_batch_delay_ms", float, "batcher wait to fill a batch"),
    ("--max-exact-players", "max_exact_players", int, "most players for the exact estimator"),
    ("--max-concurrent-calls", "max_concurrent_calls", int, "analysis calls running at once"),
    ("--worker-threads", "worker_threads", int, "threads running engine work"),
    ("--auth-tokens", "auth_tokens", str, "comma-separated bearer tokens"),
    ("--tls-cert", "tls_cert", Path, "PEM server certificate"),
    ("--tls-key", "tls_key", Path, "PEM private key of --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", Path, "PEM CA; clients then need certificates"),
    ("--grace-seconds", "grace_seconds", float, "how long in-flight calls may finish on stop"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
)


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 4x4, got {text!r}") from None
    return rows, cols


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--address",
        default="localhost:50051",
        help="host:port, several separated by commas, or a dns:/// target "
        "(default localhost:50051)",
    )
    group.add_argument("--token", help="bearer token (or env INTERSCOPE_TOKEN)")
    group.add_argument("--tls-ca", type=Path, help="PEM CA bundle; turns TLS on")
    group.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    group.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    group.add_argument("--timeout", type=float, help="deadline per call in seconds")
    parent.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    return parent


def _profile_args(parser: argparse.ArgumentParser, *, default_estimator: str = "auto") -> None:
    group = parser.add_argument_group("interaction profile")
    group.add_argument("--grid", type=_grid, default=(4, 4), help="players: RxC grid (4x4)")
    group.add_argument("--mask", type=Path, help="players: .npy of player ids instead of a grid")
    group.add_argument("--baseline", default="zero", help="zero, mean, blur or a number")
    group.add_argument("--value", default="log-prob", choices=VALUE_FUNCTIONS)
    group.add_argument("--orders", type=_ints, help="explicit orders, e.g. 0,1,7,14")
    group.add_argument("--ratios", type=_floats, help="order ratios, e.g. 0.1,0.5,0.9")
    group.add_argument("--estimator", default=default_estimator, choices=ESTIMATORS)
    group.add_argument("--pairs", choices=PAIR_MODES, help="pairs the sampled estimator uses")
    group.add_argument("--num-pairs", type=int, default=0)
    group.add_argument("--neighbor-radius", type=int, default=0)
    group.add_argument("--contexts", type=int, default=0, help="sampled contexts per order")
    group.add_argument(
        "--independent-contexts",
        action="store_true",
        help="separate contexts per pair (the paper's scheme): better per-order signed means",
    )
    group.add_argument("--profile-seed", type=int, default=0)


def _profile_options(args: argparse.Namespace, *, pairwise: bool = False) -> ProfileOptions:
    baseline: Any = args.baseline
    with contextlib.suppress(ValueError):
        baseline = float(baseline)  # a constant baseline
    return ProfileOptions(
        grid=None if args.mask is not None else args.grid,
        mask=np.load(args.mask) if args.mask is not None else None,
        baseline=baseline,
        value=args.value,
        orders=args.orders,
        ratios=args.ratios,
        estimator=args.estimator,
        pairs=args.pairs,
        num_pairs=args.num_pairs,
        neighbor_radius=args.neighbor_radius,
        contexts=args.contexts,
        independent_contexts=args.independent_contexts,
        seed=args.profile_seed,
        pairwise=pairwise,
    )


def _attack_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attack")
    group.add_argument("--attack", default="pgd", choices=ATTACKS)
    group.add_argument("--norm", default="linf", choices=NORMS)
    group.add_argument("--eps", type=float, default=8 / 255, help="radius in raw input units")
    group.add_argument("--steps", type=int, default=0, help="iterations (server default 10)")
    group.add_argument("--step-size", type=float, default=0.0)
    group.add_argument(
        "--random-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start at a random point in the ball (default: the attack's own choice)",
    )
    group.add_argument("--restarts", type=int, default=0)
    group.add_argument("--margin-threshold", type=float, default=0.0)
    group.add_argument("--query-budget", type=int, default=0)
    group.add_argument("--seed", type=int, default=0)


def _attack_options(args: argparse.Namespace) -> AttackOptions:
    return AttackOptions(
        attack=args.attack,
        norm=args.norm,
        eps=args.eps,
        steps=args.steps,
        step_size=args.step_size,
        random_start=args.random_start,
        restarts=args.restarts,
        margin_threshold=args.margin_threshold,
        query_budget=args.query_budget,
        seed=args.seed,
    )


def _load_data(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise SystemExit(f"{path}: needs arrays 'x' (inputs) and 'y' (labels)")
        x, y = data["x"], data["y"]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interscope",
        description="Audit model robustness through multi-order interactions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _client_parent()

    serve = sub.add_parser("serve", help="run a replica until SIGTERM/SIGINT")
    for flag, _field, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    serve.add_argument("--no-metrics", action="store_true", help="disable /metrics")

    demo = sub.add_parser("demo", help="build the demo models, serve them, audit both, report")
    demo.add_argument("--workdir", type=Path, default=Path("demo-out"))
    demo.add_argument("--out", type=Path, help="report directory (default WORKDIR/report)")
    demo.add_argument(
        "--repository", type=Path, help="demo repository (default WORKDIR/repository)"
    )
    demo.add_argument("--samples", type=int, default=48, help="digits audited per model")
    demo.add_argument("--estimator", default="sampled", choices=ESTIMATORS)
    demo.add_argument("--contexts", type=int, default=16)
    demo.add_argument("--eps", type=float, default=0.1)
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--json", action="store_true")

    repo = sub.add_parser("demo-repository", help="write the demo model repository into DIR")
    repo.add_argument("dir", type=Path)
    repo.add_argument("--force", action="store_true", help="rebuild even if up to date")

    models = sub.add_parser("models", help="list, describe, load and unload models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", parents=[conn], help="every model the replica knows")
    get = msub.add_parser("get", parents=[conn], help="one model's metadata")
    get.add_argument("name")
    load = msub.add_parser("load", parents=[conn], help="load from the repository or upload")
    load.add_argument("name")
    load.add_argument("--file", type=Path, help="model file to upload (with --config)")
    load.add_argument("--config", type=Path, help="config.json of the upload")
    load.add_argument("--replace", action="store_true")
    unload = msub.add_parser("unload", parents=[conn], help="unload a model")
    unload.add_argument("name")

    profile = sub.add_parser("profile", parents=[conn], help="interaction profile of inputs")
    profile.add_argument("--model", required=True)
    profile.add_argument("--input", type=Path, required=True, help=".npy: one input or a batch")
    profile.add_argument("--label", type=int, help="class y (default: the prediction)")
    profile.add_argument("--class-choice", choices=CLASS_CHOICES)
    profile.add_argument("--pairwise", action="store_true", help="return I^(m)(i,j) per pair")
    _profile_args(profile)
    profile.add_argument("--seed", type=int, dest="profile_seed", help=argparse.SUPPRESS)

    attack = sub.add_parser("attack", parents=[conn], help="adversarial attack on a batch")
    attack.add_argument("--model", required=True)
    attack.add_argument("--data", type=Path, required=True, help=".npz with arrays x and y")
    attack.add_argument("--limit", type=int, help="first N examples only")
    attack.add_argument("--save", type=Path, help="write adversarial inputs to this .npz")
    _attack_args(attack)

    audit = sub.add_parser("audit", parents=[conn], help="resumable batch audit with a report")
    audit.add_argument("--model", required=True, help="model name; several separated by commas")
    audit.add_argument("--data", type=Path, required=True, help=".npz with arrays x and y")
    audit.add_argument("--limit", type=int, help="first N examples only")
    audit.add_argument("--out", type=Path, help="write report.json, report.html and plots here")
    audit.add_argument(
        "--checkpoint",
        type=Path,
        help="JSON-lines checkpoint (default OUT/checkpoint-MODEL.jsonl with --out)",
    )
    audit.add_argument("--streams-per-address", type=int, default=2)
    audit.add_argument("--no-plots", action="store_true")
    _attack_args(audit)
    _profile_args(audit, default_estimator="sampled")

    report = sub.add_parser("report", help="combine report.json files into one report")
    report.add_argument("reports", nargs="+", type=Path, help="report.json files or dirs")
    report.add_argument("--out", type=Path, required=True)

    health = sub.add_parser("health", parents=[conn], help="exit 0 if the server is SERVING")
    health.add_argument("--service", default="", help="a model name (default: the server)")
    return parser


def _client(args: argparse.Namespace) -> Client:
    import os

    token = args.token or os.environ.get("INTERSCOPE_TOKEN") or None
    return Client(
        args.address,
        token=token,
        tls=True if args.tls else None,
        root_certificates=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        timeout=args.timeout,
    )


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text)


def _cmd_serve(args: argparse.Namespace) -> int:
    from interscope_server.config import Settings
    from interscope_server.server import serve

    given = {field: getattr(args, field) for _, field, _, _ in _SERVE_FLAGS if field in args}
    if args.no_metrics:
        given["metrics_port"] = None
    serve(Settings(**given))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from interscope._demo import DemoOptions, run_demo

    options = DemoOptions(
        workdir=args.workdir,
        repository=args.repository,
        out=args.out,
        samples=args.samples,
        estimator=args.estimator,
        contexts=args.contexts,
        eps=args.eps,
        steps=args.steps,
    )
    reports = run_demo(options, stream=sys.stderr if args.json else sys.stdout)
    if args.json:
        _emit(args, [r.to_dict() for r in reports], "")
    return 0


def _cmd_demo_repository(args: argparse.Namespace) -> int:
    from interscope_server.demo import build_demo_repository

    root = build_demo_repository(Path(args.dir), force=args.force)
    print(f"demo repository ready in {root}")
    return 0


def _model_line(m: ModelInfo) -> str:
    grads = "gradients" if m.gradients_available else "no gradients"
    shape = "x".join(str(d) for d in m.input.shape)
    return (
        f"{m.name:<20} {m.format:<11} {m.state:<8} input {shape:<10} "
        f"{len(m.classes)} classes, {grads}"
    )


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        action = args.models_command
        if action == "list":
            infos = client.list_models()
            _emit(args, [m.to_dict() for m in infos], "\n".join(_model_line(m) for m in infos))
        elif action == "get":
            info = client.get_model(args.name)
            _emit(args, info.to_dict(), json.dumps(info.to_dict(), indent=1))
        elif action == "load":
            data = args.file.read_bytes() if args.file else None
            config = json.loads(args.config.read_text()) if args.config else None
            info = client.load_model(
                args.name, model_bytes=data, config=config, replace=args.replace
            )
            _emit(args, info.to_dict(), f"loaded {_model_line(info)}")
        else:
            client.unload_model(args.name)
            _emit(args, {"unloaded": args.name}, f"unloaded {args.name}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    x = np.load(args.input).astype(np.float32)
    with _client(args) as client:
        bar = ProgressBar("profile")
        result = None
        for event in client.profile_stream(
            model=args.model,
            x=x,
            label=args.label,
            class_choice=args.class_choice,
            options=_profile_options(args, pairwise=args.pairwise),
        ):
            if isinstance(event, Progress) and event.total:
                bar.update(event.done, event.total, event.unit)
            elif isinstance(event, ProfileResult):
                result = event
        bar.close()
    if result is None:
        raise InterscopeError("the Profile stream ended without a result", code="INTERNAL")
    data = result.to_dict()
    lines = [f"{'order':>5} {'mean':>10} {'mean |I|':>10}"]
    lines += [
        f"{int(m):>5} {mean:>10.4f} {mabs:>10.4f}"
        for m, mean, mabs in zip(result.orders, result.mean, result.mean_abs, strict=True)
    ]
    _emit(args, data, f"{result.n_players} players\n" + "\n".join(lines))
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    x, y = _load_data(args.data, args.limit)
    options = _attack_options(args)
    with _client(args) as client, ProgressBar("attack") as bar:
        result = None
        done = 0
        for event in client.attack_stream(
            model=args.model,
            x=x,
            y=y,
            omit_adversarial=args.save is None,
            **{k: getattr(options, k) for k in AttackOptions.__dataclass_fields__},
        ):
            if isinstance(event, ExampleResult):
                done += 1
                bar.update(done, len(x))
            elif isinstance(event, AttackResult):
                result = event
    if result is None:
        raise InterscopeError("the Attack stream ended without a summary", code="INTERNAL")
    if args.save is not None and result.adversarial is not None:
        np.savez_compressed(args.save, x=result.adversarial, y=y)
    summary = result.summary
    data = {
        "model": args.model,
        "n": summary.n,
        "clean_accuracy": summary.clean_accuracy,
        "robust_accuracy": summary.robust_accuracy,
        "success_rate": summary.success_rate,
        "mean_linf": summary.mean_linf,
        "mean_l2": summary.mean_l2,
        "examples": [
            {k: v for k, v in e.to_dict().items() if k not in ("adversarial", "perturbation")}
            for e in result.examples
        ],
    }
    _emit(
        args,
        data,
        f"{args.model}: clean accuracy {summary.clean_accuracy:.3f}, robust "
        f"accuracy {summary.robust_accuracy:.3f}, success rate {summary.success_rate:.3f} "
        f"over {summary.n} inputs",
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from interscope.report import write_report

    x, y = _load_data(args.data, args.limit)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    reports = []
    with _client(args) as client:
        for model in models:
            checkpoint = args.checkpoint
            if checkpoint is None and args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                checkpoint = args.out / f"checkpoint-{model}.jsonl"
            if checkpoint is not None and len(models) > 1 and args.checkpoint is not None:
                checkpoint = checkpoint.with_name(f"{checkpoint.stem}-{model}{checkpoint.suffix}")
            with ProgressBar(f"audit {model}") as bar:
                report = client.audit(
                    model=model,
                    x=x,
                    y=y,
                    attack=_attack_options(args),
                    profile=_profile_options(args),
                    checkpoint=checkpoint,
                    streams_per_address=args.streams_per_address,
                    on_progress=bar.audit_progress,
                )
            reports.append(report)
    if args.out is not None:
        write_report(reports, args.out, plots=not args.no_plots)
    data: Any = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
    text = "\n".join(
        f"{r.model}: {r.summary.n_samples} samples, clean accuracy "
        f"{r.summary.clean_accuracy:.3f}, robust accuracy {r.summary.robust_accuracy:.3f}"
        + (f" ({r.resumed_samples} from the checkpoint)" if r.resumed_samples else "")
        for r in reports
    )
    if args.out is not None:
        text += f"\nreport: {args.out / 'report.html'}"
    _emit(args, data, text)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from interscope.report import load_report, write_report

    written = write_report([load_report(p) for p in args.reports], args.out)
    print(f"report: {written['report.html']}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    _emit(args, {"service": args.service, "status": status}, status)
    return 0 if status == "SERVING" else EXIT_ERROR


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "demo-repository": _cmd_demo_repository,
    "models": _cmd_models,
    "profile": _cmd_profile,
    "attack": _cmd_attack,
    "audit": _cmd_audit,
    "report": _cmd_report,
    "health": _cmd_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `interscope` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except InterscopeError as error:
        print(f"interscope {args.command}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as error:
        print(f"interscope {args.command}: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
