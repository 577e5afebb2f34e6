"""`wrn-cluster`: parse the command line, call the module that does the work, print the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True)
    return typer.Exit(code)


def load_spec(path: Path, overrides: list[str] | None = None):
    from wrn_cluster.spec import SpecError, load

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
    from wrn_cluster.spec import SpecError, load

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
    from wrn_cluster.spec import json_schema

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
) -> None:
    """Run a job: on the cluster at --address / RAY_ADDRESS, else on an embedded local Ray."""
    from wrn_cluster import launcher

    overrides = [*(set_ or []), *([f"name={name}"] if name else [])]
    spec = load_spec(file, overrides)
    address = launcher.cluster_address(address)
    try:
        if address:
            code = launcher.submit_remote(spec, address, wait, out.print)
        else:
            code = launcher.run_local(spec, out.print)
    except launcher.LaunchError as error:
        raise fail(str(error)) from None
    raise typer.Exit(code)


AddressOption = Annotated[
    str | None, typer.Option(help="Ray dashboard address (default: RAY_ADDRESS).")
]


def _address(address: str | None) -> str:
    from wrn_cluster import launcher

    found = launcher.cluster_address(address)
    if not found:
        raise fail("no cluster: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return found


@app.command()
def status(job_id: str, address: AddressOption = None) -> None:
    """A job's status."""
    from wrn_cluster import launcher

    try:
        info = launcher.job_info(_address(address), job_id)
    except launcher.LaunchError as error:
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
    """A job's driver output."""
    from wrn_cluster import launcher

    try:
        if follow:
            raise typer.Exit(launcher.follow(_address(address), job_id, sys.stdout.write))
        sys.stdout.write(launcher.job_logs(_address(address), job_id))
    except launcher.LaunchError as error:
        raise fail(str(error)) from None


@app.command()
def stop(job_id: str, address: AddressOption = None) -> None:
    """Stop a running job; its checkpoints stay, and resubmitting resumes from them."""
    from wrn_cluster import launcher

    try:
        stopped = launcher.stop_job(_address(address), job_id)
    except launcher.LaunchError as error:
        raise fail(str(error)) from None
    out.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


@app.command("list")
def list_(address: AddressOption = None) -> None:
    """Jobs on the cluster."""
    from wrn_cluster import launcher

    try:
        jobs = launcher.list_jobs(_address(address))
    except launcher.LaunchError as error:
        raise fail(str(error)) from None
    table = Table("job id", "name", "status")
    for job in jobs:
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
    top: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 5,
) -> None:
    """Top classes for each image, with the model's own preprocessing."""
    from wrn_cluster import tracking

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise fail(f"no such image: {', '.join(missing)}")
    try:
        results = tracking.predict(model_uri, images, top)
    except Exception as error:  # unreadable images, unknown models, servers down
        raise fail(f"cannot predict with {model_uri}: {_first_line(error)}") from None
    for path, ranked in zip(images, results, strict=True):
        out.print(f"{path}:")
        for label, prob in ranked:
            out.print(f"  {prob:7.2%}  {label}")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
