"""The `sdbatch` command: the only place that prints, exits or draws progress.

Heavy libraries (torch, diffusers, ray) are imported inside the commands that need them,
so `sdbatch --help`, `validate` and `schema` answer at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from .errors import UserError


class _Commands(TyperGroup):
    """The one place a `UserError` from any command becomes `error: …` lines and exit 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(e.problems)


app = typer.Typer(
    cls=_Commands,
    help="Distributed, reproducible batch rendering for Stable Diffusion on Ray Data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Build or inspect checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# soft_wrap: a line is never broken at the terminal's width (80 columns when piped), so a
# path or an "ok" stays on its line in logs and for grep; tables still fit the width.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class ProgressStyle(str, Enum):
    bar = "bar"
    plain = "plain"
    none = "none"


def _fail(lines: Sequence[str] | str, code: int = 1) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(f"[red]error:[/red] {line}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec_path: Path) -> Any:
    from .spec import load_spec

    return load_spec(spec_path)


@app.command()
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec.")],
) -> None:
    """Check a job spec, its manifest and its models without rendering anything."""
    from .checks import check_job
    from .manifest import rows_checked

    spec = _load(spec_path)
    info = check_job(spec, on_rows=lambda rows: err.print(rows_checked(rows)))
    modes = ", ".join(sorted(info.modes))
    out.print(f"{spec_path}: ok — {info.num_rows} rows, {info.total_items} images ({modes})")


@app.command()
def plan(
    spec_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec.")],
    calibrate: Annotated[
        int, typer.Option(help="Render N items on one in-process actor to estimate time.")
    ] = 0,
) -> None:
    """Show what a job will render (per mode/size/steps/scheduler/model), what is done, and an estimate."""
    from rich.table import Table

    from .estimate import plan_report

    spec = _load(spec_path)
    report = plan_report(spec, calibrate=calibrate)
    table = Table(title=f"{spec.name}: {report.total} images")
    for column in ("mode", "size", "steps", "scheduler", "model", "done", "remaining"):
        table.add_column(
            column, justify="right" if column in ("steps", "done", "remaining") else "left"
        )
    for group in sorted(set(report.groups) | set(report.done_groups)):
        mode, width, height, steps, scheduler, model = group
        table.add_row(
            mode,
            f"{width}x{height}",
            str(steps),
            scheduler,
            Path(model).name or model,
            str(report.done_groups[group]),
            str(report.groups[group]),
        )
    out.print(table)
    out.print(
        f"done {report.done}, remaining {report.remaining} in {report.batches} batches of "
        f"≤{spec.batch_size}"
    )
    if report.gpu_seconds is None:
        out.print(f"estimate: {report.source}")
    else:
        out.print(
            f"estimate: {report.gpu_seconds:,.0f} actor-seconds, ~{report.wall_seconds:,.0f} s wall "
            f"on {report.actors} actor(s), plus start-up ({report.source})"
        )


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
    break_lease: Annotated[
        bool,
        typer.Option(
            help="Delete another run's lease on the output first (only if that run is gone)."
        ),
    ] = False,
) -> None:
    """Render a job. Resumes from whatever the output folder already holds."""
    from .runner import run_job

    spec = _load(spec_path)
    reporter = _Reporter(progress, every)
    stop = _stop_on_sigint()
    try:
        with reporter:  # the bar stops before any line below
            result = run_job(
                spec,
                address=address,
                on_start=reporter.start,
                on_progress=reporter.update,
                on_note=reporter.note,
                verbose=verbose,
                fresh=fresh,
                overwrite=overwrite,
                retry_failed=retry_failed,
                stop=stop,
                break_lease=break_lease,
            )
    except KeyboardInterrupt:
        err.print("interrupted: finished images are committed; run the same command to resume")
        raise typer.Exit(130) from None
    _print_result(result)


def _print_result(result: Any) -> None:
    """The run's summary table and its last line; exit 2 when items failed."""
    from rich.table import Table

    table = Table(
        title=f"{result.name}: {result.done + result.skipped}/{result.total} done",
        show_header=False,
    )
    per_image = result.actor_seconds_per_image
    for label, value in (
        ("rendered", str(result.done)),
        ("failed", str(result.failed)),
        ("already done", str(result.skipped)),
        ("setup", f"{result.setup_seconds:.1f} s (checks, resume scan, hashing, Ray, planning)"),
        ("wall time", f"{result.wall_seconds:.1f} s rendering and writing"),
        ("throughput", f"{result.images_per_second:.2f} img/s on {result.actors} actor(s)"),
        ("actor-seconds per image", "-" if per_image is None else f"{per_image:.3f} s"),
        ("output", result.output),
    ):
        table.add_row(label, value)
    out.print(table)
    out.print(
        f"{result.done} images rendered in {result.wall_seconds:.1f} s "
        f"(+{result.setup_seconds:.1f} s setup); images and metadata: {result.output}"
    )
    if result.failed:
        out.print(f"[yellow]{result.failed} items failed; see {result.output}/failures/[/yellow]")
        raise typer.Exit(2)


# After a first Ctrl-C, the driver commits what finished and stops Ray; if that takes
# longer than this (a store that does not answer, a Ray that does not stop), it exits
# anyway: uncommitted images render again on resume, committed ones are kept.
STOP_GRACE_SECONDS = 60.0


def _stop_on_sigint() -> threading.Event:
    """SIGINT → KeyboardInterrupt plus a set event (so a library that swallows the
    KeyboardInterrupt cannot keep the job going); a second SIGINT, or a stop that outlasts
    STOP_GRACE_SECONDS, exits at once with 130."""
    stop = threading.Event()

    def exit_now(why: str) -> None:
        os.write(2, f"\n{why}: exiting now; committed images are kept, rerun to resume\n".encode())
        os._exit(130)

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            exit_now("interrupted again")
        stop.set()
        os.write(2, b"\nstopping: committing finished images (Ctrl-C again to exit now)\n")
        grace = threading.Timer(
            STOP_GRACE_SECONDS, exit_now, args=(f"not stopped after {STOP_GRACE_SECONDS:g} s",)
        )
        grace.daemon = True
        grace.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return stop


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

    def note(self, line: str) -> None:
        """What the driver is doing before rendering starts (scanning, planning)."""
        err.print(line, markup=False, highlight=False)

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

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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

    output, storage = _output_and_storage(target)
    st = job_status(output, storage)
    total = "?" if st.total is None else str(st.total)
    remaining = "?" if st.remaining is None else str(st.remaining)
    state = "complete" if st.complete else "incomplete (running, interrupted, or with failures)"
    out.print(f"{st.output}: {state}", markup=False)
    out.print(f"  done {st.done} / {total}, failed {st.failed}, remaining {remaining}")
    if st.images_per_second:
        out.print(f"  latest run: {st.images_per_second:.2f} img/s")
    for reason, count in st.top_failures:
        out.print(f"  {count} × {reason}", markup=False)
    if st.lease:
        err.print(f"warning: a run is writing this output now: {st.lease}", markup=False)
    if st.events_line():
        out.print(f"  latest run: {st.events_line()}", markup=False)
    if st.lease_taken_over_from:
        out.print(f"  latest run took over a stale lease: {st.lease_taken_over_from}", markup=False)


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
    from .rerun import rerun as do_rerun

    if not (to or verify):
        _fail("rerun needs --to OUTPUT2 (where to write) and/or --verify (compare only)")
    output, storage = _output_and_storage(target)
    report = do_rerun(output, ids=ids, failed=failed, to=to, verify=verify, storage=storage)
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


@app.command("gallery")
def gallery(
    target: Annotated[
        str, typer.Argument(metavar="OUTPUT|JOB.yaml", help="Job output or its spec.")
    ],
    out_path: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Where to write the page (default OUTPUT/index.html); for an S3 output, "
            "a key inside it.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="At most N images (and N failures) on the page; 0: all.")
    ] = 1000,
    where: Annotated[
        str | None,
        typer.Option(help="SQL predicate over the metadata columns, e.g. \"mode = 'inpaint'\"."),
    ] = None,
) -> None:
    """Write a static HTML contact sheet of a job's images, failures and sweeps."""
    from .gallery import build_gallery

    output, storage = _output_and_storage(target)
    g = build_gallery(output, storage, out=out_path, limit=limit or None, where=where)
    more = f" (of {g.matching_images}; raise --limit)" if g.images < g.matching_images else ""
    out.print(f"{g.uri}", markup=False)
    out.print(
        f"  {g.images} images{more}, {g.matching_failures} failed item(s)"
        + (f", {g.sweep_grids} sweep grid(s)" if g.sweep_grids else ""),
        markup=False,
    )


@app.command("inspect")
def inspect_image(
    image: Annotated[
        str, typer.Argument(metavar="IMAGE", help="A PNG sdbatch wrote (path or s3://…).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON record.")] = False,
) -> None:
    """Print the A1111 infotext and the sdbatch record embedded in an image."""
    from .inspector import read_image_info

    try:
        parameters, record = read_image_info(image)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False)
    if as_json:
        print(text)
        return
    # Prompts are user text: no rich markup, emoji codes or re-wrapping may touch them.
    plain: dict[str, Any] = {"markup": False, "emoji": False, "soft_wrap": True}
    out.print("parameters:", style="bold", **plain)
    out.print(parameters if parameters is not None else "(none)", **plain)
    out.print("\nsdbatch:", style="bold", **plain)
    out.print(text, **plain)


@models_app.command("tiny")
def models_tiny(
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the pipelines.")],
    force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False,
) -> None:
    """Build tiny random-weight pipelines (SD 1.x base, inpaint, depth; SD 2 v; SDXL base, inpaint, refiner, depth ControlNet) and single-file .safetensors exports of them, for tests and demos, offline."""
    from .tiny import build_tiny

    try:
        paths = build_tiny(out_dir, force=force)
    except OSError as err:  # an unwritable or full folder: a line, not a traceback
        where = err.filename or out_dir
        raise UserError([f"{where}: cannot write the tiny models: {err.strerror or err}"]) from None
    for variant, path in paths.items():
        out.print(f"{variant}: {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
