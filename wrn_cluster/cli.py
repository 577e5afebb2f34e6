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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
