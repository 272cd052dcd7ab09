"""The `interscope` command line: serve, demo, models, profile, attack, audit, report,
audit-merge, health."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import numpy as np

from interscope._client import Client
from interscope._exceptions import InterscopeError
from interscope._models import AttackResult, ExampleResult, ModelInfo, ProfileResult, Progress
from interscope._options import (
    ATTACKS,
    CLASS_CHOICES,
    CONTEXT_SHARINGS,
    ESTIMATORS,
    LOSSES,
    NORMS,
    PAIR_MODES,
    TARGET_STATISTICS,
    VALUE_FUNCTIONS,
    AttackOptions,
    ProfileOptions,
)
from interscope._progress import ProgressBar

#: Exit codes: 0 ok, 1 a failure (the server said no, a sample failed, unhealthy), 2 bad usage
#: (argparse's own), 130 interrupted (Ctrl-C), as shells report SIGINT.
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

#: Modules that only the server extra brings; a client-only install lacks them.
_SERVER_MODULES = ("interscope_server", "torch", "onnxruntime", "onnx", "pydantic", "sklearn")


class CliError(Exception):
    """A failure the CLI reports as one line: `interscope <command>: <what> (<what to do>)`."""

    def __init__(self, message: str, hint: str = "", *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def _serve_flags() -> list[tuple[str, str, Any]]:
    """(flag, Settings field, field info) for every setting: `serve` mirrors them all, so a new
    setting gets its flag without anyone remembering to add one."""
    from interscope_server.config import Settings

    return [
        ("--" + name.replace("_", "-"), name, info) for name, info in Settings.model_fields.items()
    ]


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (
        get_origin(annotation) is not None and bool in get_args(annotation)
    )


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 4x4, got {text!r}") from None
    return rows, cols


def _count(minimum: int) -> Callable[[str], int]:
    """An integer >= minimum; argparse prefixes the flag to the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _real(*, positive: bool) -> Callable[[str], float]:
    """A finite number, > 0 (positive) or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    return parse


def feature_groups(text: str, names: Sequence[str]) -> list[list[int]]:
    """Groups of feature indices from "0,1;2;3,4", with inclusive ranges ("0-15;16-31") and
    feature names from the model's config ("age,income;height"); "all" means one player per
    feature (an empty list of groups)."""
    if text.strip().lower() == "all":
        return []
    position = {name: i for i, name in enumerate(names)}
    groups: list[list[int]] = []
    for part in text.split(";"):
        group: list[int] = []
        for item in (v.strip() for v in part.split(",")):
            if not item:
                continue
            first, dash, last = item.partition("-")
            if dash and first.isdigit() and last.isdigit():
                if int(last) < int(first):
                    raise CliError(f"--features range {item!r} ends before it starts", "e.g. 0-15")
                group.extend(range(int(first), int(last) + 1))
            elif item.lstrip("-").isdigit():
                group.append(int(item))
            elif item in position:
                group.append(position[item])
            else:
                known = ", ".join(names) if names else "none: the model's config has no names"
                raise CliError(
                    f"--features names {item!r}, which is neither an index nor a feature name "
                    "of the model",
                    f"its feature names: {known}",
                )
        if not group:
            raise CliError(f"--features has an empty group in {text!r}", "use e.g. 0,1;2;3,4")
        groups.append(group)
    return groups


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
    group.add_argument("--timeout", type=_real(positive=True), help="deadline per call in seconds")
    parent.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    return parent


def _profile_args(parser: argparse.ArgumentParser, *, default_estimator: str = "auto") -> None:
    group = parser.add_argument_group("interaction profile")
    group.add_argument("--grid", type=_grid, default=(4, 4), help="players: RxC grid (4x4)")
    group.add_argument("--mask", type=Path, help="players: .npy of player ids instead of a grid")
    group.add_argument(
        "--features",
        help="players: feature groups instead of a grid, e.g. 0,1;2;3,4 or 0-15;16-31, names "
        "from the model's feature_names (age,income;height), or all (one player per feature)",
    )
    group.add_argument("--baseline", default="zero", help="zero, mean, blur or a number")
    group.add_argument(
        "--baseline-reference",
        type=Path,
        help="with --baseline mean: .npy reference set (N, *input) whose means are used",
    )
    group.add_argument("--value", default="log-prob", choices=VALUE_FUNCTIONS)
    group.add_argument("--orders", type=_ints, help="explicit orders, e.g. 0,1,7,14")
    group.add_argument("--ratios", type=_floats, help="order ratios, e.g. 0.1,0.5,0.9")
    group.add_argument("--estimator", default=default_estimator, choices=ESTIMATORS)
    group.add_argument("--pairs", choices=PAIR_MODES, help="pairs the sampled estimator uses")
    group.add_argument("--num-pairs", type=_count(0), default=0)
    group.add_argument("--neighbor-radius", type=_count(0), default=0)
    group.add_argument(
        "--contexts-per-order", type=_count(0), default=0, help="sampled contexts per order"
    )
    group.add_argument(
        "--context-sharing",
        default="auto",
        choices=CONTEXT_SHARINGS,
        help="shared contexts, or separate ones per pair (the paper's scheme); auto picks by "
        "--target-statistic and the number of pairs",
    )
    group.add_argument(
        "--target-statistic",
        default="pairs",
        choices=TARGET_STATISTICS,
        help="the statistic whose standard error matters most (steers --context-sharing auto)",
    )
    group.add_argument("--profile-seed", type=_count(0), default=0)


def _profile_options(
    args: argparse.Namespace, *, return_pairs: bool = False, feature_names: Sequence[str] = ()
) -> ProfileOptions:
    baseline: Any = args.baseline
    with contextlib.suppress(ValueError):
        baseline = float(baseline)  # a constant baseline
    if args.mask is not None and args.features is not None:
        raise CliError("--mask and --features both name the players", "give one of them")
    features = None if args.features is None else feature_groups(args.features, feature_names)
    reference = None
    if args.baseline_reference is not None:
        reference = _load_array(args.baseline_reference).astype(np.float32)
    return ProfileOptions(
        grid=None if args.mask is not None or features is not None else args.grid,
        mask=_load_array(args.mask) if args.mask is not None else None,
        features=features,
        baseline=baseline,
        baseline_reference=reference,
        value=args.value,
        orders=args.orders,
        ratios=args.ratios,
        estimator=args.estimator,
        pairs=args.pairs,
        num_pairs=args.num_pairs,
        neighbor_radius=args.neighbor_radius,
        contexts_per_order=args.contexts_per_order,
        context_sharing=args.context_sharing,
        target_statistic=args.target_statistic,
        seed=args.profile_seed,
        return_pairs=return_pairs,
    )


def _attack_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attack")
    group.add_argument("--attack", default="pgd", choices=ATTACKS)
    group.add_argument("--norm", default="linf", choices=NORMS)
    group.add_argument(
        "--eps", type=_real(positive=True), default=8 / 255, help="radius in raw input units"
    )
    group.add_argument("--steps", type=_count(0), default=0, help="iterations (server default 10)")
    group.add_argument("--step-size", type=_real(positive=False), default=0.0)
    group.add_argument(
        "--random-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start at a random point in the ball (default: the attack's own choice)",
    )
    group.add_argument("--restarts", type=_count(0), default=0)
    group.add_argument("--margin-threshold", type=_real(positive=False), default=0.0)
    group.add_argument("--query-budget", type=_count(0), default=0)
    group.add_argument("--seed", type=_count(0), default=0)
    group.add_argument(
        "--check-queries",
        type=_count(0),
        help="gradient-masking check: Square queries per example left robust (0: off; "
        "server default 100)",
    )
    group.add_argument(
        "--check-reruns",
        type=_count(0),
        help="gradient-masking check: robust examples per batch re-attacked with twice the "
        "steps (0: off; server default 16)",
    )
    group.add_argument(
        "--loss", choices=LOSSES, default=None, help="apgd's objective (default: ce)"
    )


def _flag_lines(flags: Any) -> list[str]:
    """One line per raised gradient-masking flag: code, its numbers, what to try."""
    return [
        f"  flag {f.code} ({', '.join(f'{k} {v:.4g}' for k, v in sorted(f.numbers.items()))}): "
        f"{f.meaning} Try: {f.advice}"
        for f in flags
    ]


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
        check_queries=args.check_queries,
        check_reruns=args.check_reruns,
        loss=args.loss,
    )


def _load_data(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """x and y from an .npz, or a CliError saying what was expected."""
    from interscope._data import DataError, load_npz

    try:
        x, y = load_npz(path)
    except DataError as error:
        raise CliError(error.message, error.expected) from None
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def _audit_data(args: argparse.Namespace, model: str) -> tuple[np.ndarray, np.ndarray]:
    """x and y for an audit: an .npz as it is; image folders and tables fitted to the model
    (its input shape, classes, value range and feature names: one GetModel call)."""
    from interscope._data import DataError, ModelShape, load_data

    if args.data.is_file() and args.data.suffix.lower() == ".npz":
        return _load_data(args.data, args.limit)
    shape = None
    if args.data.exists():
        with _client(args) as client:
            info = client.get_model(model)
        shape = ModelShape(
            input_shape=tuple(info.input.shape),
            classes=tuple(info.classes),
            value_range=info.value_range,
            feature_names=tuple(info.feature_names),
            layout=info.input.layout,
        )
    try:
        return load_data(
            args.data, shape, limit=args.limit, label_column=args.label_column, resize=args.resize
        )
    except DataError as error:
        raise CliError(error.message, error.expected) from None


def _load_array(path: Path) -> np.ndarray:
    """One .npy array (no pickles), or a CliError saying what was expected."""
    expected = "an .npy file of one input or a batch, as numpy.save writes"
    if not path.is_file():
        raise CliError(f"{path}: no such file", expected)
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError) as error:
        raise CliError(f"{path}: not a readable .npy array ({error})", expected) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interscope",
        description="Audit model robustness through multi-order interactions.",
    )
    parser.add_argument("--version", action="version", version=f"interscope {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a failure instead of one line (anywhere on the line)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _client_parent()

    serve = sub.add_parser(
        "serve",
        help="run a replica until SIGTERM/SIGINT",
        description="Run a replica until SIGTERM/SIGINT. Every flag mirrors a setting: a flag "
        "given overrides its INTERSCOPE_* environment variable, which overrides the default.",
    )
    try:
        flags = _serve_flags()
    except ModuleNotFoundError:  # a client-only install: `serve` will say what to install
        serve.set_defaults(server_missing=True)
    else:
        for flag, field, info in flags:
            env = f"INTERSCOPE_{field.upper()}"
            text = f"{info.description} (env {env}; default {info.default!r})".replace("%", "%%")
            if _is_bool(info.annotation):
                serve.add_argument(
                    flag,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=text,
                )
            else:
                # Values go to Settings as text, so pydantic parses and checks them exactly as
                # it does the environment variable (one rule, one message).
                serve.add_argument(flag, default=argparse.SUPPRESS, metavar="VALUE", help=text)
        serve.add_argument(
            "--no-metrics", action="store_true", help="disable /metrics (unsets --metrics-port)"
        )

    demo = sub.add_parser("demo", help="build the demo models, serve them, audit both, report")
    demo.add_argument("--workdir", type=Path, default=Path("demo-out"))
    demo.add_argument("--out", type=Path, help="report directory (default WORKDIR/report)")
    demo.add_argument(
        "--repository", type=Path, help="demo repository (default WORKDIR/repository)"
    )
    demo.add_argument("--samples", type=_count(1), default=48, help="digits audited per model")
    demo.add_argument("--estimator", default="sampled", choices=ESTIMATORS)
    demo.add_argument("--contexts-per-order", type=_count(1), default=16)
    demo.add_argument("--eps", type=_real(positive=True), default=0.1)
    demo.add_argument("--steps", type=_count(1), default=10)
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
    profile.add_argument("--label", type=_count(0), help="class y (default: the prediction)")
    profile.add_argument("--class-choice", choices=CLASS_CHOICES)
    profile.add_argument("--return-pairs", action="store_true", help="return I^(m)(i,j) per pair")
    _profile_args(profile)
    profile.add_argument("--seed", type=_count(0), dest="profile_seed", help=argparse.SUPPRESS)

    attack = sub.add_parser("attack", parents=[conn], help="adversarial attack on a batch")
    attack.add_argument("--model", required=True)
    attack.add_argument("--data", type=Path, required=True, help=".npz with arrays x and y")
    attack.add_argument("--limit", type=_count(1), help="first N examples only")
    attack.add_argument("--save", type=Path, help="write adversarial inputs to this .npz")
    _attack_args(attack)

    audit = sub.add_parser("audit", parents=[conn], help="resumable batch audit with a report")
    audit.add_argument("--model", required=True, help="model name; several separated by commas")
    audit.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz with arrays x and y, a folder with one subfolder of images per class, or a "
        ".csv / .parquet table (feature columns named as the model's feature_names)",
    )
    audit.add_argument("--limit", type=_count(1), help="first N examples only")
    audit.add_argument("--out", type=Path, help="write report.json, report.html and plots here")
    audit.add_argument(
        "--label-column", default="label", help="label column of a CSV / Parquet --data"
    )
    audit.add_argument(
        "--resize", action="store_true", help="resize images of a --data folder to the input"
    )
    audit.add_argument(
        "--gallery",
        type=_count(0),
        default=2,
        help="samples shown in the report's gallery, most and least affected (0: none)",
    )
    audit.add_argument(
        "--checkpoint",
        type=Path,
        help="JSON-lines checkpoint (default OUT/checkpoint-MODEL.jsonl with --out)",
    )
    audit.add_argument("--streams-per-address", type=_count(1), default=2)
    audit.add_argument("--no-plots", action="store_true")
    audit.add_argument(
        "--shards",
        type=int,
        default=1,
        help="audit one of this many shards (samples I, I+N, ...); merge with audit-merge",
    )
    audit.add_argument(
        "--shard-index",
        type=int,
        help="which shard, 0-based (default: env JOB_COMPLETION_INDEX, as in an Indexed Job)",
    )
    audit.add_argument(
        "--eps-sweep",
        type=_floats,
        default=[],
        help="robustness curve: also attack every sample at each of these eps (commas; at "
        "most 16); the report shows robust accuracy per eps",
    )
    _attack_args(audit)
    _profile_args(audit, default_estimator="sampled")

    report = sub.add_parser("report", help="combine report.json files into one report")
    report.add_argument("reports", nargs="+", type=Path, help="report.json files or dirs")
    report.add_argument("--out", type=Path, required=True)

    merge = sub.add_parser(
        "audit-merge", help="merge the checkpoints of sharded audits into one report per model"
    )
    merge.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files or dirs")
    merge.add_argument("--out", type=Path, required=True, help="report directory")
    merge.add_argument("--no-plots", action="store_true")
    merge.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    health = sub.add_parser("health", parents=[conn], help="exit 0 if the server is SERVING")
    health.add_argument("--service", default="", help="a model name (default: the server)")
    return parser


def _client(args: argparse.Namespace) -> Client:

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


def _json_safe(data: Any) -> Any:
    """`data` with every NaN or infinity replaced by None: JSON has no NaN, and a consumer that
    parses strictly (jq, JavaScript's JSON.parse) must be able to read what we print."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_safe(v) for v in data]
    return data


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(_json_safe(data), sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(text)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from interscope_server.config import Settings
    from interscope_server.errors import StartupError

    flags = {field: flag for flag, field, _ in _serve_flags()}
    given = {field: getattr(args, field) for field in flags if field in args}
    if args.no_metrics:
        given["metrics_port"] = None
    try:
        settings = Settings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = f"{flags[field]} / INTERSCOPE_{field.upper()}" if field in flags else "settings"
        value = f", got {first['input']!r}" if field in flags else ""
        raise CliError(f"{where}: {first['msg']}{value}", "see interscope serve --help") from None
    # Read by torch's OpenMP when torch loads, which the server's import below does: the same
    # wait as the model hosts get (see interscope_server.openmp, which imports no torch).
    from interscope_server import openmp

    os.environ.update(openmp.environment(settings.runtime_spinning))
    from interscope_server.server import serve

    try:
        serve(settings)
    except StartupError as error:
        raise CliError(error.message, error.hint) from None
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from interscope._demo import DemoOptions, run_demo

    options = DemoOptions(
        workdir=args.workdir,
        repository=args.repository,
        out=args.out,
        samples=args.samples,
        estimator=args.estimator,
        contexts_per_order=args.contexts_per_order,
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
        f"{len(m.classes)} classes, {grads}{', stochastic' if m.stochastic else ''}"
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
            # config.json goes as it is: the server validates it as a repository folder's.
            config = args.config.read_text() if args.config else None
            info = client.load_model(
                args.name, model_bytes=data, config=config, replace=args.replace
            )
            _emit(args, info.to_dict(), f"loaded {_model_line(info)}")
        else:
            client.unload_model(args.name)
            _emit(args, {"unloaded": args.name}, f"unloaded {args.name}")
    return 0


def _feature_names(client: Client, args: argparse.Namespace, model: str) -> list[str]:
    """The model's feature names when --features may name them (one GetModel call)."""
    if args.features is None or all(
        v.strip().lstrip("-").isdigit() or not v.strip()
        for v in args.features.replace(";", ",").split(",")
    ):
        return []
    return client.get_model(model).feature_names


def _cmd_profile(args: argparse.Namespace) -> int:
    x = _load_array(args.input).astype(np.float32)
    with _client(args) as client:
        bar = ProgressBar("profile")
        result = None
        for event in client.profile_stream(
            model=args.model,
            x=x,
            label=args.label,
            class_choice=args.class_choice,
            options=_profile_options(
                args,
                return_pairs=args.return_pairs,
                feature_names=_feature_names(client, args, args.model),
            ),
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
            elif isinstance(event, Progress) and event.unit == "stages":
                # A staged attack's batch runs long: say which stage it is in.
                bar.update(done, len(x), event.stage.removeprefix("attack: "))
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
        "masking_flags": [dataclasses.asdict(f) for f in summary.masking_flags],
        "examples": [
            {k: v for k, v in e.to_dict().items() if k not in ("adversarial", "perturbation")}
            for e in result.examples
        ],
    }
    _emit(
        args,
        data,
        "\n".join(
            [
                f"{args.model}: clean accuracy {summary.clean_accuracy:.3f}, robust "
                f"accuracy {summary.robust_accuracy:.3f}, success rate "
                f"{summary.success_rate:.3f} over {summary.n} inputs",
                *_flag_lines(summary.masking_flags),
            ]
        ),
    )
    return 0


def _audit_header(args: argparse.Namespace, n: int) -> str:
    """The settings that decide an audit's numbers, defaults included, in one line."""
    attack = f"{args.attack} {args.norm} eps {args.eps:.4g}"
    attack += f", {args.steps} steps" if args.steps else ", the attack's default steps"
    if args.step_size:
        attack += f" of {args.step_size:.4g}"
    players = f"mask {args.mask}" if args.mask is not None else "{}x{} grid".format(*args.grid)
    profile = f"{players}, {args.baseline} baseline, {args.value}, {args.estimator} estimator"
    if args.contexts_per_order:
        profile += f", {args.contexts_per_order} contexts"
    return f"audit of {n} samples: attack {attack}; players {profile}"


class _AuditWatch:
    """Progress for one model's audit: says when it resumes, remembers how far it got."""

    def __init__(self, label: str, checkpoint: Path | None) -> None:
        self.bar = ProgressBar(label)
        self.checkpoint = checkpoint
        self.done = 0
        self.total = 0
        self._told = False

    def __call__(self, progress: Any) -> None:
        self.done, self.total = progress.done, progress.total
        if not self._told:
            self._told = True
            if progress.resumed:
                print(
                    f"resuming: {progress.resumed} of {progress.total} samples from "
                    f"{self.checkpoint}",
                    file=sys.stderr,
                    flush=True,
                )
        self.bar.audit_progress(progress)


def _failure_lines(report: Any) -> list[str]:
    """Failed samples grouped by status, each with the first message and the first ids."""
    failed = [s for s in report.samples if s.error is not None]
    by_code = Counter(s.error.code for s in failed)
    lines = []
    for code, count in by_code.most_common():
        first = next(s for s in failed if s.error.code == code)
        ids = [s.id for s in failed if s.error.code == code][:5]
        more = ", ..." if count > len(ids) else ""
        lines.append(f"  {count} x {code} (samples {', '.join(ids)}{more}): {first.error.message}")
    return lines


def _cmd_audit(args: argparse.Namespace) -> int:
    from interscope.report import write_report

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    x, y = _audit_data(args, models[0])
    shard = _shard(args)
    suffix = "" if shard is None else f"-shard-{shard[0]}-of-{shard[1]}"
    header = _audit_header(args, len(x))
    if shard is not None:
        header += f"; shard {shard[0]} of {shard[1]}"
    print(header, file=sys.stderr, flush=True)
    reports = []
    pages: list[dict[str, Any]] = []
    with _client(args) as client:
        for model in models:
            checkpoint = args.checkpoint
            if checkpoint is None and args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                checkpoint = args.out / f"checkpoint-{model}{suffix}.jsonl"
            if checkpoint is not None and len(models) > 1 and args.checkpoint is not None:
                checkpoint = checkpoint.with_name(f"{checkpoint.stem}-{model}{checkpoint.suffix}")
            watch = _AuditWatch(f"audit {model}", checkpoint)
            try:
                with watch.bar:
                    report = client.audit(
                        model=model,
                        x=x,
                        y=y,
                        attack=_attack_options(args),
                        profile=_profile_options(
                            args, feature_names=_feature_names(client, args, model)
                        ),
                        checkpoint=checkpoint,
                        streams_per_address=args.streams_per_address,
                        on_progress=watch,
                        shard=shard,
                        return_adversarial=args.gallery > 0 and args.out is not None,
                        eps_sweep=args.eps_sweep,
                    )
            except KeyboardInterrupt:
                where = (
                    f"rerun the same command to resume from {checkpoint}"
                    if checkpoint is not None
                    else "nothing was kept: pass --out or --checkpoint to make audits resumable"
                )
                raise CliError(
                    f"interrupted with {watch.done} of {watch.total} samples of {model} done",
                    where,
                    exit_code=EXIT_INTERRUPTED,
                ) from None
            reports.append(report)
            if args.out is not None:
                pages.append(_with_gallery(args, client, report, x))
    if args.out is not None:
        write_report(pages, args.out, plots=not args.no_plots)
    data: Any = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
    lines = []
    for r in reports:
        ok = r.summary.n_samples  # the samples that did not fail
        line = f"{r.model}: {ok} of {len(r.samples)} samples audited"
        if ok:
            line += (
                f", clean accuracy {r.summary.clean_accuracy:.3f}, robust accuracy "
                f"{r.summary.robust_accuracy:.3f}"
            )
        if r.resumed_samples:
            line += f" ({r.resumed_samples} from the checkpoint)"
        lines.append(line)
        curve = r.summary.robustness_curve
        if curve is not None:
            points = ", ".join(
                f"{e:.4g}: {a:.3f}" for e, a in zip(curve.eps, curve.robust_accuracy, strict=True)
            )
            lines.append(f"  robust accuracy by eps: {points}")
        lines.extend(_flag_lines(r.summary.masking_flags))
    if args.out is not None:
        lines.append(f"report: {args.out / 'report.html'}")
    _emit(args, data, "\n".join(lines))
    failed = [r for r in reports if r.summary.n_failed]
    for r in failed:
        print(
            f"interscope audit: {r.summary.n_failed} of {len(r.samples)} samples of {r.model} "
            "failed (fix them and rerun: finished samples are kept in the checkpoint):",
            file=sys.stderr,
        )
        print("\n".join(_failure_lines(r)), file=sys.stderr)
    return EXIT_ERROR if failed else 0


def _with_gallery(
    args: argparse.Namespace, client: Client, report: Any, x: np.ndarray
) -> dict[str, Any]:
    """The report.json form of `report` with its sample gallery (exact profiles of the most
    and least affected samples; none with --gallery 0 or for a sharded audit's part)."""
    from interscope._gallery import build_gallery

    page: dict[str, Any] = report.to_dict()
    if args.gallery and _shard(args) is None:
        info = client.get_model(report.model)
        profile = _profile_options(args, feature_names=info.feature_names)
        page["gallery"] = build_gallery(
            client,
            report,
            x,
            profile,
            count=args.gallery,
            classes=info.classes,
            layout=info.input.layout,
        )
    return page


def _shard(args: argparse.Namespace) -> tuple[int, int] | None:
    """(index, count) of a sharded audit, the index from --shard-index or JOB_COMPLETION_INDEX."""
    import os

    if args.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
    if args.shards == 1 and args.shard_index in (None, 0):
        return None
    index = args.shard_index
    if index is None:
        given = os.environ.get("JOB_COMPLETION_INDEX", "")
        if not given.isdigit():
            raise ValueError(
                "--shards needs --shard-index or the env JOB_COMPLETION_INDEX (an Indexed Job's)"
            )
        index = int(given)
    if not 0 <= index < args.shards:
        raise ValueError(f"shard index {index} is outside 0..{args.shards - 1}")
    return index, args.shards


def _cmd_audit_merge(args: argparse.Namespace) -> int:
    from interscope._merge import merge_audits
    from interscope.report import write_report

    reports = merge_audits(args.checkpoints)
    write_report(reports, args.out, plots=not args.no_plots)
    data: Any = reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports]
    text = "\n".join(
        f"{r.model}: {r.summary.n_samples} samples merged, clean accuracy "
        f"{r.summary.clean_accuracy:.3f}, robust accuracy {r.summary.robust_accuracy:.3f}"
        for r in reports
    )
    _emit(args, data, text + f"\nreport: {args.out / 'report.html'}")
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
    "audit-merge": _cmd_audit_merge,
    "health": _cmd_health,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("interscope")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "models":
        return f"models {args.models_command}"
    return str(args.command)


def _hint(error: InterscopeError, args: argparse.Namespace) -> str:
    """What to do about a server's answer, where the status alone says it."""
    address = getattr(args, "address", "")
    return {
        "UNAVAILABLE": f"is a replica running at {address}? `interscope serve` starts one"
        if address
        else "",
        "UNAUTHENTICATED": "pass --token or set INTERSCOPE_TOKEN",
        "NOT_FOUND": "`interscope models list` shows what the replica has",
        "DEADLINE_EXCEEDED": "raise --timeout, or ask for less work",
        "RESOURCE_EXHAUSTED": "ask for less work in one call, or raise the server's limit",
        "INTERNAL": "a server bug: its log has the request id",
    }.get(error.code, "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `interscope` console script; returns the exit code.

    Every failure is one line on stderr, `interscope <command>: <what> (<what to do>)`, and a
    non-zero exit code; `--debug` shows the traceback instead.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words  # accepted after the command too, where people type it
    parser = build_parser()
    args, extra = parser.parse_known_args([w for w in words if w != "--debug"])
    if extra and not getattr(args, "server_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    name = _command_name(args)
    try:
        return _COMMANDS[args.command](args)
    except BaseException as error:
        if args.debug or isinstance(error, SystemExit):
            raise
        message, code = _one_line(error, args)
        print(f"interscope {name}: {message}", file=sys.stderr)
        return code


def _one_line(error: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The message and exit code the CLI shows for an error escaping a command."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(error, CliError):
        return str(error), error.exit_code
    if isinstance(error, InterscopeError):
        hint = _hint(error, args)
        return (f"{error} ({hint})" if hint else str(error)), EXIT_ERROR
    if isinstance(error, ModuleNotFoundError):
        missing = (error.name or "").split(".")[0]
        if missing in _SERVER_MODULES:
            return (
                f"this needs the server, which is not installed (no module {missing!r}) "
                '(pip install "interscope[server]")',
                EXIT_ERROR,
            )
        if missing == "matplotlib":
            return 'plots need matplotlib (pip install "interscope[plot]")', EXIT_ERROR
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}", EXIT_ERROR
    if isinstance(error, (ValueError, OSError)):
        return str(error), EXIT_ERROR
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    return f"unexpected error: {detail} (rerun with --debug for the traceback)", EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
