"""`wrn-cluster`: parse the command line, call the module that does the work, print the result.

Only light modules are imported here (the spec, the cluster and Jobs API helpers): a command
that trains, builds networks, packs data or benchmarks imports its module when it runs, so
`wrn-cluster status`, `logs`, `stop`, `list`, `validate` and `schema` start without torch (about
1 s instead of 10 s on a 2-core machine). This is the one place project modules are imported
inside functions; `tests/unit/test_layers.py` holds both rules.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wrn_cluster import cluster, console, jobs
from wrn_cluster.cluster import LaunchError
from wrn_cluster.spec import SpecError, home, json_schema, load

app = typer.Typer(
    help="Train Wide Residual Networks on Ray, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The paper's networks, by name.", no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Datasets: write and check them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
runs_app = typer.Typer(
    help="Jobs' runs in MLflow (MLFLOW_TRACKING_URI, else the embedded store).",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")
bench_app = typer.Typer(
    help="Benchmarks: the project's speed as a ratio against a named baseline.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    # Messages quote paths and servers' errors: brackets in them are text, not markup.
    for line in message.splitlines() or [""]:
        err.print(f"[red]error:[/red] {escape(line)}", markup=True)
    return typer.Exit(code)


def load_spec(path: Path, overrides: list[str] | None = None):
    try:
        return load(path, overrides or [])
    except SpecError as error:
        for problem in error.problems:
            err.print(str(problem), markup=False)
        raise typer.Exit(1) from None


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Job spec YAML files.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: a.b=value.")
    ] = None,
) -> None:
    """Check job specs; print FILE:LINE: field: message for every problem."""

    bad = 0
    for path in files:
        try:
            spec = load(path, set_ or [])
        except SpecError as error:
            bad += 1
            for problem in error.problems:
                err.print(str(problem), markup=False)
            continue
        out.print(f"{path}: ok ({spec.kind} job {spec.name!r}, {spec.model.arch})")
    if bad:
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema (for yaml-language-server and editors)."""

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@models_app.command("list")
def models_list() -> None:
    """List the paper's variants; other wrn-D-K names build too."""
    from wrn_cluster.models import PAPER_VARIANTS, parse_name

    table = Table("name", "family", "depth", "width", "default input")
    for name in PAPER_VARIANTS:
        info = parse_name(name)
        size = info.default_image_size
        table.add_row(name, info.family, str(info.depth), f"{info.width:g}", f"{size}x{size}")
    out.print(table)
    out.print("Any wrn-D-K builds: 6n+4 depths for CIFAR/SVHN, 18/34/50/101 for ImageNet.")


@models_app.command("info")
def models_info(
    name: Annotated[str, typer.Argument(help="e.g. wrn-28-10, wrn-50-2")],
    num_classes: Annotated[int, typer.Option(min=1, help="Output classes.")] = 1000,
    image_size: Annotated[
        int | None, typer.Option(min=8, help="Input size for GMACs; the family's by default.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Family, parameters and GMACs per image of one network."""
    from wrn_cluster.models import UnknownModelError, describe

    try:
        info = describe(name, num_classes, image_size)
    except UnknownModelError as error:
        raise fail(str(error)) from None
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    for key, value in info.items():
        out.print(f"{key:>18}: {value:,}" if isinstance(value, int) else f"{key:>18}: {value}")


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    address: Annotated[
        str | None, typer.Option(help="Ray dashboard address (default: RAY_ADDRESS).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: the spec's).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: a.b=value.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the logs.")] = True,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Only run the preflight checks and print the plan."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also show Ray's, MLflow's and Python's lines."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the job's summary as one JSON object on stdout (embedded Ray only).",
        ),
    ] = False,
) -> None:
    """Run a job: on the cluster at --address / RAY_ADDRESS, else on an embedded local Ray."""
    from wrn_cluster import launcher

    overrides = [*(set_ or []), *([f"name={name}"] if name else [])]
    spec = load_spec(file, overrides)
    address = cluster.cluster_address(address)
    if address and as_json:
        raise fail(
            "--json is for jobs on the embedded Ray: a cluster job's summary ends its log "
            "(`wrn-cluster logs JOB_ID`); leave out --json, or --address and RAY_ADDRESS"
        )
    if dry_run:
        _dry_run(spec, address)
        return
    try:
        if address:
            code = launcher.submit_remote(spec, address, wait, out.print, verbose)
        else:
            code = launcher.run_local(spec, verbose, as_json)
    except LaunchError as error:
        raise fail(str(error)) from None
    raise typer.Exit(code)


def _dry_run(spec, address: str | None) -> None:
    from wrn_cluster import preflight

    try:
        report = preflight.dry_run(spec, address)
    except preflight.PreflightError as error:
        raise fail("\n".join(error.problems)) from None
    out.print("preflight")
    for check, result in report.checks:
        out.print(f"  ok  {check:<19} {result}", markup=False)
    for warning in report.warnings:
        out.print(f"warning: {warning}", markup=False)
    out.print("plan (dry run: nothing started)")
    for item, value in report.plan:
        out.print(f"  {item:<23} {value}", markup=False)


AddressOption = Annotated[
    str | None, typer.Option(help="Ray dashboard address (default: RAY_ADDRESS).")
]


def _address(address: str | None) -> str:
    found = cluster.cluster_address(address)
    if not found:
        raise fail("no cluster: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return found


@app.command()
def status(job_id: str, address: AddressOption = None) -> None:
    """A job's status."""

    try:
        info = jobs.job_info(_address(address), job_id)
    except LaunchError as error:
        raise fail(str(error)) from None
    out.print(
        f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else "")
    )


@app.command()
def logs(
    job_id: str,
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
) -> None:
    """A job's output: a cluster job's driver log, or an embedded job's whole log file."""

    if not cluster.cluster_address(address):
        local = console.log_path(home(), job_id)
        if local.is_file():
            sys.stdout.write(local.read_text(errors="replace"))
            return
        logs = sorted(local.parent.glob("*.log"), key=lambda p: p.stat().st_mtime)
        known = [p.stem for p in logs[-5:]][::-1]  # newest first
        raise fail(
            f"no log for job {job_id!r} in {local.parent} and no cluster (--address or "
            "RAY_ADDRESS)" + (f"; the newest local jobs: {', '.join(known)}" if known else "")
        )
    try:
        if follow:
            raise typer.Exit(jobs.follow(_address(address), job_id, sys.stdout.write))
        sys.stdout.write(jobs.job_logs(_address(address), job_id))
    except LaunchError as error:
        raise fail(str(error)) from None


@app.command()
def stop(job_id: str, address: AddressOption = None) -> None:
    """Stop a running job; its checkpoints stay, and resubmitting resumes from them."""

    try:
        stopped = jobs.stop_job(_address(address), job_id)
    except LaunchError as error:
        raise fail(str(error)) from None
    out.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@app.command("list")
def list_(address: AddressOption = None) -> None:
    """Jobs on the cluster."""

    try:
        listed = jobs.list_jobs(_address(address))
    except LaunchError as error:
        raise fail(str(error)) from None
    table = Table("job id", "name", "status")
    for job in listed:
        table.add_row(job["job_id"], job["name"], job["status"])
    out.print(table)


@data_app.command("synth-imagefolder")
def data_synth_imagefolder(
    dest: Annotated[str, typer.Argument(help="Folder URL: a path, file:// or s3://bucket/prefix.")],
    classes: Annotated[int, typer.Option(min=2, help="Number of classes.")] = 4,
    per_class: Annotated[int, typer.Option(min=2, help="Images per class, both splits.")] = 64,
    size: Annotated[int, typer.Option(min=8, help="Image side in pixels.")] = 40,
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of each class held out in val/.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
) -> None:
    """Write learnable synthetic JPEGs as DEST/train/<class>/*.jpg and DEST/val/<class>/*.jpg."""
    from wrn_cluster.data.synthetic import write_imagefolder

    try:
        counts = write_imagefolder(dest, classes, per_class, size, val_fraction, seed)
    except (ValueError, OSError) as error:
        raise fail(f"{dest}: {error}") from None
    out.print(
        f"{dest}: wrote {counts['train']} train and {counts['val']} val JPEGs "
        f"({counts['classes']} classes, {size}x{size})"
    )


@data_app.command("pack")
def data_pack(
    src: Annotated[
        str,
        typer.Argument(
            help="The dataset's URL: an ImageFolder (train/<class>/*.jpg, val/<class>/*), or "
            "with --dataset a CIFAR-10/100 python release, SVHN's .mat files, or a COCO set "
            "in COCO 2017's layout (annotations/instances_{train,val}2017.json, train2017/, "
            "val2017/)."
        ),
    ],
    dst: Annotated[str, typer.Argument(help="Where the shards go: a path, file:// or s3://.")],
    images_per_shard: Annotated[
        int, typer.Option(min=1, help="Images per shard; 1024 ImageNet JPEGs are about 110 MB.")
    ] = 1024,
    address: Annotated[
        str | None,
        typer.Option(
            help="Run the tasks on this Ray cluster: its GCS address (head:6379), "
            "ray://head:10001, or auto on one of its nodes (wrn-cluster installed on every "
            "node). Default: an embedded Ray on this machine."
        ),
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(
            help="What SRC holds, as data.dataset names it: imagefolder, cifar10, cifar100, "
            "svhn, coco."
        ),
    ] = "imagefolder",
    keep_empty_images: Annotated[
        bool,
        typer.Option(
            help="COCO: pack training images without boxes too (torchvision's recipe drops "
            "them); a spec reading the shards sets data.keep_empty_images to match."
        ),
    ] = False,
) -> None:
    """Pack a dataset into shards that `data.format: shards` streams: one Ray task per shard,
    each image as the source holds it (JPEG bytes, CIFAR/SVHN pixels; COCO's with its boxes);
    a rerun finishes an interrupted pack."""
    from wrn_cluster.data import DataError
    from wrn_cluster.pack import pack

    try:
        pack(
            src,
            dst,
            images_per_shard=images_per_shard,
            address=address,
            say=out.print,
            kind=dataset,
            keep_empty_images=keep_empty_images,
        )
    except (DataError, OSError) as error:
        raise fail(_first_line(error) if not isinstance(error, DataError) else str(error)) from None


@data_app.command("synth-coco")
def data_synth_coco(
    dest: Annotated[str, typer.Argument(help="Folder URL: a path, file:// or s3://bucket/prefix.")],
    images: Annotated[int, typer.Option(min=2, help="Images, train and val together.")] = 200,
    size: Annotated[int, typer.Option(min=32, help="Longer image side in pixels.")] = 96,
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of the images held out for val.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
) -> None:
    """Write shapes with known boxes as a COCO dataset: DEST/train2017/*.jpg, DEST/val2017/*.jpg
    and DEST/annotations/instances_{train,val}2017.json (a detect spec's default layout)."""
    from wrn_cluster.data.synthetic import SHAPES, write_coco

    try:
        counts = write_coco(dest, images, size, val_fraction, seed)
    except (ValueError, OSError) as error:
        raise fail(f"{dest}: {error}") from None
    out.print(
        f"{dest}: wrote {counts['train']} train and {counts['val']} val JPEGs with "
        f"{counts['boxes']} boxes ({', '.join(name for _, name in SHAPES)}; up to {size}px)"
    )


@app.command()
def pull(
    model_uri: Annotated[str, typer.Argument(help="e.g. models:/wrn50_2_imagenet@champion")],
    dst: Annotated[Path, typer.Option(help="Empty or new folder to download into.")],
) -> None:
    """Download a registered model from MLflow (MLFLOW_TRACKING_URI, else the embedded store)."""
    from wrn_cluster import tracking

    try:
        info = tracking.pull(model_uri, dst)
    except FileExistsError as error:
        raise fail(str(error)) from None
    except Exception as error:  # MLflow's errors for unknown names, aliases, servers
        raise fail(
            f"cannot pull {model_uri} from {tracking.tracking_uri()}: {_first_line(error)}"
        ) from None
    out.print(f"pulled {model_uri} -> {info['path']}")
    if "version" in info:
        out.print(f"  {info['name']} version {info['version']} (aliases: {info['aliases']})")
        out.print(f"  from run {info['run_id']}: {info['source']}")
        for key in sorted(info["tags"]):
            out.print(f"  {key}: {info['tags'][key]}")


@app.command()
def predict(
    model_uri: Annotated[str, typer.Argument(help="e.g. models:/wrn_quickstart@champion")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top: Annotated[int, typer.Option(min=1, help="Classes (or boxes) to show per image.")] = 5,
    min_score: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Detectors: lowest box score shown.")
    ] = 0.5,
) -> None:
    """Top classes (a classifier) or boxes (a detector) for each image, with the model's own
    preprocessing."""
    from wrn_cluster import tracking

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise fail(f"no such image: {', '.join(missing)}")
    try:
        results = tracking.predict(model_uri, images, top, min_score)
    except Exception as error:  # unreadable images, unknown models, servers down
        raise fail(f"cannot predict with {model_uri}: {_first_line(error)}") from None
    for path, ranked in zip(images, results, strict=True):
        out.print(f"{path}:")
        for label, prob, *box in ranked:  # a detector's results carry their box
            where = f"  [{', '.join(f'{v:g}' for v in box[0])}]" if box else ""
            out.print(f"  {prob:7.2%}  {label}{where}")


@runs_app.command("list")
def runs_list(
    experiment: Annotated[str | None, typer.Option(help="Only this experiment's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """Recent jobs: status, epochs, score and the model versions registered from each."""
    from wrn_cluster import tracking

    try:
        rows = tracking.recent_runs(tracking.tracking_uri(), experiment, limit)
    except Exception as error:  # MLflow's errors: a server down, a refused login
        raise fail(f"cannot list runs in {tracking.display_uri()}: {_first_line(error)}") from None
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print(f"no runs of wrn-cluster jobs in {tracking.display_uri()}")
        return
    table = Table("started", "job", "kind", "status", "epochs", "score", "models", "run id")
    for row in rows:
        score = row["score"]
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M", time.localtime(row["started"] / 1000)),
            row["job"],
            row["kind"],
            row["status"],
            str(row["epochs"] or ""),
            f"{score['metric']} {score['value']:.4g}" if score else "",
            ", ".join(row["versions"]),
            row["run_id"],
        )
    # Whole run ids and names, also in a pipe (where rich would take 80 columns).
    wide = out if out.is_terminal else Console(highlight=False, width=200)
    wide.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="A run id, or a job name (its newest run).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """One job's run: params, latest metrics, tags, artifacts and registered versions."""
    from wrn_cluster import tracking

    try:
        found = tracking.run_details(tracking.tracking_uri(), run)
    except Exception as error:  # MLflow's errors: a server down, a refused login
        raise fail(
            f"cannot read {run!r} in {tracking.display_uri()}: {_first_line(error)}"
        ) from None
    if found is None:
        raise fail(
            f"no run or job named {run!r} in {tracking.display_uri()}; `wrn-cluster runs list` "
            "shows the recent ones"
        )
    if as_json:
        out.print_json(json.dumps(found))
        return
    score = found["score"]
    out.print(f"{found['job']} ({found['kind']}) run {found['run_id']}: {found['status']}")
    out.print(f"  experiment: {found['experiment']}  UI: {found['run_path']}")
    if score:
        out.print(f"  {score['metric']}: {score['value']:.4g} after {found['epochs']} epochs")
    out.print(f"  models: {', '.join(found['versions']) or 'none registered'}")
    for section in ("metrics", "params", "tags"):
        out.print(f"{section}:")
        for key, value in found[section].items():
            out.print(f"  {key}: {value}", markup=False)
    out.print(f"artifacts: {', '.join(found['artifacts'])}", markup=False)


@runs_app.command("compare")
def runs_compare(
    experiment: Annotated[str, typer.Argument(help="The experiment (tracking.experiment).")],
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """An experiment's jobs side by side: recipe, epochs, best promotion metric, time and
    device-hours to schedule.stop_at, mean images/s."""
    from wrn_cluster import tracking
    from wrn_cluster.tracking.outcome import compare_runs

    try:
        rows = compare_runs(tracking.tracking_uri(), experiment, limit)
    except Exception as error:  # MLflow's errors: a server down, a refused login
        raise fail(
            f"cannot compare runs in {tracking.display_uri()}: {_first_line(error)}"
        ) from None
    if rows is None:
        raise fail(
            f"no experiment named {experiment!r} in {tracking.display_uri()}; `wrn-cluster "
            "runs list` shows the recent runs and their experiments"
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print(f"no runs of wrn-cluster jobs in experiment {experiment!r}")
        return
    table = Table(
        "job", "run", "status", "recipe", "epochs", "best", "target", "time", "device-h", "img/s"
    )
    for row in rows:
        hours = row["device_hours_to_target"]
        table.add_row(
            row["job"],
            row["run_id"][:8],
            row["status"],
            row["recipe"] or "",
            str(row["epochs"] or ""),
            f"{row['metric']} {row['best']:.4g}" if row["best"] is not None else "",
            row["target"] or "",
            _time_to_target(row),
            f"{hours:.3g}" if hours is not None else "",
            f"{row['images_per_sec']:.0f}" if row["images_per_sec"] is not None else "",
        )
    wide = out if out.is_terminal else Console(highlight=False, width=200)
    wide.print(table)


def _time_to_target(row: dict) -> str:
    """The time column: 3h 05m, 4m 12s, 9s (train.metrics.duration's words, which would import
    torch), or "not reached" for a run that aimed at a target and stopped short of it."""
    if row["time_to_target_s"] is None:
        return "not reached" if row["target"] else ""
    hours, rest = divmod(int(round(row["time_to_target_s"])), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")]
RoundsOption = Annotated[int, typer.Option(min=1, help="Interleaved rounds; median and spread.")]


def _report(comparison, json_path: Path | None) -> None:
    for line in comparison.lines():
        out.print(line, markup=False)
    if json_path:
        comparison.write_json(json_path)


def _progress(line: str) -> None:
    err.print(line, markup=False)


@bench_app.command("train-step")
def bench_train_step(
    model: Annotated[str, typer.Option(help="Network, e.g. wrn-28-10, wrn-50-2.")] = "wrn-28-10",
    image_size: Annotated[
        int | None, typer.Option(min=8, help="Input side; the family's default if left out.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch; halved until it fits the GPU.")] = 64,
    device: Annotated[
        str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")
    ] = "auto",
    baseline: Annotated[
        str, typer.Option(help="fp32, or fp16 (the reference's --amp; CUDA only).")
    ] = "fp32",
    dtype: Annotated[
        str | None, typer.Option(help="Project precision override: auto, fp32, bf16, fp16.")
    ] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last/--nchw", help="Project layout override.")
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="Project torch.compile override.")
    ] = None,
    rounds: RoundsOption = 5,
    steps: Annotated[int, typer.Option(min=1, help="Steps per variant per round.")] = 2,
    warmup: Annotated[int, typer.Option(min=1, help="Untimed steps first (compiles).")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    cpu_time: Annotated[
        bool,
        typer.Option(
            "--cpu-time", help="Count CPU seconds, not wall (CPU; with --threads 1: per core)."
        ),
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Images/s of forward+backward+SGD: torchvision's reference step vs the project's."""
    from wrn_cluster.bench import train_step
    from wrn_cluster.models import UnknownModelError

    overrides = {"dtype": dtype, "channels_last": channels_last, "compile": compile_}
    try:
        comparison = train_step.run(
            model,
            image_size,
            batch,
            device,
            baseline,
            {k: v for k, v in overrides.items() if v is not None},
            rounds,
            steps,
            warmup,
            threads=threads,
            cpu_time=cpu_time,
            say=_progress,
        )
    except (ValueError, UnknownModelError) as error:
        raise fail(str(error)) from None
    _report(comparison, json_path)


@bench_app.command("recipe-step")
def bench_recipe_step(
    model: Annotated[str, typer.Option(help="Network, e.g. wrn-16-4, wrn-50-2.")] = "wrn-16-4",
    image_size: Annotated[int, typer.Option(min=8, help="The loader's image side.")] = 32,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    rounds: RoundsOption = 5,
    steps: Annotated[int, typer.Option(min=1, help="Steps per variant per round.")] = 32,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Images/s of a train step with each recipe option on vs the plain step (CPU), and each
    per-image option's cost in a loader process."""
    from wrn_cluster.bench import recipe_step
    from wrn_cluster.models import UnknownModelError

    try:
        comparison = recipe_step.run(
            model, image_size, batch, rounds, steps, rounds, threads, say=_progress
        )
    except (ValueError, UnknownModelError) as error:
        raise fail(str(error)) from None
    _report(comparison, json_path)


@bench_app.command("input")
def bench_input(
    images: Annotated[int, typer.Option(min=8, help="Photo JPEGs to write and read.")] = 256,
    size: Annotated[int, typer.Option(min=8, help="Output side, as the training crop.")] = 224,
    batch: Annotated[int, typer.Option(min=1, help="DataLoader batch.")] = 32,
    rounds: RoundsOption = 5,
    folder: Annotated[
        Path | None, typer.Option(help="An imagefolder to read instead (train/<class>/*.jpg).")
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Images/s per core: torchvision ImageFolder + PIL classic transforms vs the project's."""
    from wrn_cluster.bench import input_pipeline

    comparison = input_pipeline.run(images, size, batch, rounds, folder, say=_progress)
    _report(comparison, json_path)


@bench_app.command("input-storage")
def bench_input_storage(
    images: Annotated[int, typer.Option(min=8, help="Photo JPEGs (~105 KB) to read.")] = 640,
    size: Annotated[int, typer.Option(min=8, help="Output side, as the training crop.")] = 224,
    batch: Annotated[int, typer.Option(min=1, help="DataLoader batch.")] = 32,
    delay_ms: Annotated[
        int, typer.Option(min=0, help="The delay the one-line ratio compares at.")
    ] = 20,
    images_per_shard: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 64,
    delays: Annotated[
        str, typer.Option("--delays-ms", help="The added delays to measure, comma-separated.")
    ] = "0,20,60",
    rounds: RoundsOption = 3,
    json_path: JsonOption = None,
) -> None:
    """Images/s of one loader process from S3 (moto, +0/20/60 ms a request) and from disk:
    one GET per image vs streamed shards."""
    from wrn_cluster.bench import input_storage

    try:
        measured = tuple(sorted({delay_ms, *(int(d) for d in delays.split(",") if d.strip())}))
    except ValueError:
        raise fail(f"--delays-ms {delays!r}: give whole milliseconds, e.g. 0,20,60") from None
    try:
        comparison = input_storage.run(
            images, size, batch, rounds, measured, delay_ms, images_per_shard, say=_progress
        )
    except ValueError as error:
        raise fail(str(error)) from None
    _report(comparison, json_path)


@bench_app.command("checkpoint-upload")
def bench_checkpoint_upload(
    model: Annotated[str, typer.Option(help="Network; its weights and momentum are uploaded.")] = (
        "wrn-16-4"
    ),
    images: Annotated[int, typer.Option(min=64, help="Training images (40 px JPEGs).")] = 1024,
    batch: Annotated[int, typer.Option(min=1, help="Batch.")] = 32,
    every_steps: Annotated[int, typer.Option(min=1, help="A step checkpoint every N steps.")] = 4,
    delay_ms: Annotated[
        int, typer.Option(min=0, help="Added to every request to the S3 store.")
    ] = 400,
    rounds: RoundsOption = 3,
    json_path: JsonOption = None,
) -> None:
    """Images/s of an epoch with step checkpoints into a slow S3 (moto): each upload waited for
    (checkpoint.upload: sync) vs in the background (async)."""
    from wrn_cluster.bench import checkpoint_upload

    try:
        comparison = checkpoint_upload.run(
            model, images, batch, every_steps, delay_ms, rounds, say=_progress
        )
    except ValueError as error:
        raise fail(str(error)) from None
    _report(comparison, json_path)


@bench_app.command("tracking-overhead")
def bench_tracking_overhead(
    model: Annotated[str, typer.Option(help="Network.")] = "wrn-16-2",
    size: Annotated[int, typer.Option(min=8, help="Input side.")] = 32,
    batch: Annotated[int, typer.Option(min=1, help="Batch.")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Train steps per epoch.")] = 40,
    rounds: RoundsOption = 3,
    json_path: JsonOption = None,
) -> None:
    """An epoch of train steps with and without MLflow tracking (every step logged)."""
    from wrn_cluster.bench import tracking_overhead

    comparison = tracking_overhead.run(model, size, batch, steps, rounds, say=_progress)
    _report(comparison, json_path)


@bench_app.command("ray-overhead")
def bench_ray_overhead(
    model: Annotated[str, typer.Option(help="Network.")] = "wrn-16-2",
    images: Annotated[int, typer.Option(min=16, help="Training images in the epoch.")] = 4096,
    size: Annotated[int, typer.Option(min=8, help="Training crop side.")] = 32,
    batch: Annotated[int, typer.Option(min=2, help="Global batch.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Training processes.")] = 2,
    loader_workers: Annotated[int, typer.Option(min=0, help="DataLoader processes each.")] = 0,
    rounds: RoundsOption = 3,
    json_path: JsonOption = None,
) -> None:
    """One epoch as a Ray Train job vs plain torch.distributed (gloo), same data and loop."""
    from wrn_cluster.bench import ray_overhead

    comparison = ray_overhead.run(
        model, images, size, batch, workers, loader_workers, rounds, say=_progress
    )
    _report(comparison, json_path)


@bench_app.command("table")
def bench_table(
    files: Annotated[list[Path], typer.Argument(help="JSON files written with --json.")],
) -> None:
    """One Markdown table of bench results."""
    from wrn_cluster.bench.common import markdown_table

    out.print(markdown_table([json.loads(p.read_text()) for p in files]), markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
