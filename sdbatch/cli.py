"""The `sdbatch` command: the only place that prints, exits or draws progress.

Heavy libraries (torch, diffusers, ray) are imported inside the commands that need them,
so `sdbatch --help`, `validate` and `schema` answer at once.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="Distributed, reproducible batch rendering for Stable Diffusion on Ray Data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Build or inspect checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class ProgressStyle(str, Enum):
    bar = "bar"
    plain = "plain"
    none = "none"


def _fail(lines: list[str] | str, code: int = 1) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(f"[red]error:[/red] {line}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec_path: Path) -> Any:
    from .spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        _fail(e.problems)


@app.command()
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec.")],
) -> None:
    """Check a job spec, its manifest and its models without rendering anything."""
    from .manifest import ManifestError
    from .runner import RunError, check_job

    spec = _load(spec_path)
    try:
        info = check_job(spec)
    except (ManifestError, RunError) as e:
        _fail(getattr(e, "problems", None) or str(e).splitlines())
    modes = ", ".join(sorted(info.modes))
    out.print(f"{spec_path}: ok — {info.num_rows} rows, {info.total_items} images ({modes})")


@app.command()
def schema() -> None:
    """Print the JSON schema of job specs (generated from the pydantic models)."""
    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec.")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (auto, HOST:PORT, ray://…); default: RAY_ADDRESS or a local Ray."
        ),
    ] = None,
    progress: Annotated[
        ProgressStyle, typer.Option(help="bar | plain (a line every --every s) | none")
    ] = ProgressStyle.bar,
    every: Annotated[float, typer.Option(help="Seconds between plain progress lines.")] = 10.0,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and bars.")
    ] = False,
    fresh: Annotated[
        bool, typer.Option(help="Refuse a non-empty output instead of resuming.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="With --fresh: delete what the output holds first.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="Render only the items that failed before.")
    ] = False,
) -> None:
    """Render a job. Resumes from whatever the output folder already holds."""
    from .manifest import ManifestError
    from .models import ModelError
    from .runner import RunError, run_job
    from .store import StoreError

    spec = _load(spec_path)
    reporter = _Reporter(progress, every)
    try:
        result = run_job(
            spec,
            address=address,
            on_start=reporter.start,
            on_progress=reporter.update,
            verbose=verbose,
            fresh=fresh,
            overwrite=overwrite,
            retry_failed=retry_failed,
        )
    except (ManifestError, RunError, ModelError, StoreError) as e:
        reporter.stop()
        _fail(getattr(e, "problems", None) or str(e).splitlines())
    except KeyboardInterrupt:
        reporter.stop()
        err.print("interrupted: finished images are committed; run the same command to resume")
        raise typer.Exit(130) from None
    reporter.stop()
    out.print(
        f"[bold]{result.name}[/bold]: {result.done} rendered, {result.failed} failed, "
        f"{result.skipped} already done, of {result.total} — {result.wall_seconds:.1f} s, "
        f"{result.images_per_second:.2f} img/s on {result.actors} actor(s)"
    )
    out.print(f"images and metadata: {result.output}")
    if result.failed:
        out.print(f"[yellow]{result.failed} items failed; see {result.output}/failures/[/yellow]")
        raise typer.Exit(2)


class _Reporter:
    """Draws progress as a rich bar or as plain lines for log files."""

    def __init__(self, style: ProgressStyle, every: float):
        self.style = style
        self.every = every
        self.bar: Any = None
        self.task: Any = None
        self.last = 0.0

    def start(self, p: Any, placement: Any) -> None:
        remaining = p.total - p.skipped
        err.print(
            f"{p.total} images, {p.skipped} already done, {remaining} to render on "
            f"{placement.actors} actor(s) ({placement.device}, {placement.torch_threads} threads each)"
        )
        if self.style is ProgressStyle.bar and remaining > 0:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("rendering"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.2f} img/s"),
                TextColumn("failed {task.fields[failed]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("render", total=remaining, rate=0.0, failed=0)

    def update(self, p: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=p.done + p.failed, rate=p.rate, failed=p.failed)
        elif self.style is ProgressStyle.plain and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            left = p.total - p.skipped - p.done - p.failed
            eta = left / p.rate if p.rate > 0 else float("nan")
            err.print(
                f"progress: {p.done + p.skipped}/{p.total} done, {p.failed} failed, "
                f"{p.rate:.2f} img/s, ETA {eta:.0f} s"
            )

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _output_and_storage(target: str) -> tuple[str, dict[str, Any] | None]:
    """`JOB.yaml` → (its output, its storage options); anything else is an output URI
    (S3 endpoints and credentials then come from the standard AWS environment)."""
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        spec = _load(Path(target))
        return spec.output, spec.storage.model_dump()
    return target, None


@app.command()
def status(
    target: Annotated[
        str, typer.Argument(metavar="OUTPUT|JOB.yaml", help="Job output or its spec.")
    ],
) -> None:
    """Done / failed / remaining counts, speed and top failure reasons of a job's output."""
    from .status import job_status
    from .store import StoreError

    output, storage = _output_and_storage(target)
    try:
        st = job_status(output, storage)
    except StoreError as e:
        _fail(str(e))
    total = "?" if st.total is None else str(st.total)
    remaining = "?" if st.remaining is None else str(st.remaining)
    state = "complete" if st.complete else "incomplete (running, interrupted, or with failures)"
    out.print(f"{st.output}: {state}", markup=False)
    out.print(f"  done {st.done} / {total}, failed {st.failed}, remaining {remaining}")
    if st.images_per_second:
        out.print(f"  latest run: {st.images_per_second:.2f} img/s")
    for reason, count in st.top_failures:
        out.print(f"  {count} × {reason}", markup=False)


@app.command()
def rerun(
    target: Annotated[
        str, typer.Argument(metavar="OUTPUT|JOB.yaml", help="Job output or its spec.")
    ],
    ids: Annotated[
        list[str] | None, typer.Option("--ids", help="Item ids to regenerate (repeatable).")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Regenerate the failed items.")] = False,
    to: Annotated[
        str | None, typer.Option("--to", help="Write regenerated images + metadata here.")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Compare with the stored sha256; exit 1 unless all bit-exact."
        ),
    ] = False,
) -> None:
    """Regenerate items from their metadata alone (no manifest), optionally verifying them."""
    from .rerun import RerunError
    from .rerun import rerun as do_rerun

    if not (to or verify):
        _fail("rerun needs --to OUTPUT2 (where to write) and/or --verify (compare only)")
    output, storage = _output_and_storage(target)
    try:
        report = do_rerun(output, ids=ids, failed=failed, to=to, verify=verify, storage=storage)
    except RerunError as e:
        _fail(str(e))
    for o in report.outcomes:
        if o.status == "differs":
            psnr = "inf" if o.psnr is None or o.psnr == float("inf") else f"{o.psnr:.1f} dB"
            out.print(
                f"  {o.id}[{o.image_index}]: differs: max pixel diff {o.max_diff}, PSNR {psnr}",
                markup=False,
            )
        elif o.status not in ("exact", "rendered"):
            out.print(f"  {o.id}[{o.image_index}]: {o.status}: {o.detail}", markup=False)
    n = len(report.outcomes)
    if verify:
        out.print(f"reproduced {report.exact}/{n} bit-exact")
        if not report.all_exact:
            raise typer.Exit(1)
    else:
        out.print(f"regenerated {n} item(s) into {to}")


@models_app.command("tiny")
def models_tiny(
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the pipelines.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False,
) -> None:
    """Build tiny random-weight pipelines (base, inpaint, depth) for tests and demos, offline."""
    from .tiny import build_tiny

    paths = build_tiny(out_dir, force=force)
    for variant, path in paths.items():
        out.print(f"{variant}: {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
