"""`cliplens classify`: zero-shot classification of images among labels.

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_TOP_K,
    BatchOpt,
    DeviceOpt,
    EngineOpt,
    FiniteFloat,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    TemplatesOpt,
    collect_images,
    no_images,
)
from cliplens.cli.output import (
    Format,
    info,
    print_csv,
    print_json,
    print_table,
    show_progress,
    warn,
)
from cliplens.errors import InvalidInputError

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).


def classify_command(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders (searched recursively).")
    ],
    labels: Annotated[
        str | None, typer.Option("--labels", "-l", help="Comma-separated labels.")
    ] = None,
    labels_file: Annotated[
        Path | None, typer.Option("--labels-file", help="A file with one label per line.")
    ] = None,
    labels_dir: Annotated[
        Path | None,
        typer.Option("--labels-dir", help="A folder whose subfolder names are the labels."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Labels to show per image.", min=1, max=MAX_TOP_K)
    ] = 3,
    templates: TemplatesOpt = "default",
    multi_label: Annotated[
        bool,
        typer.Option(
            "--multi-label", help="Score each label on its own; keep those above --threshold."
        ),
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Multi-label cut-off: a cosine, or a probability for sigmoid models "
            "(default: per model).",
            click_type=FiniteFloat(-1, 1),
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    batch_size: BatchOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Classify images among labels the model was never trained on (zero-shot)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks import classify as task

    given = [x for x in (labels, labels_file, labels_dir) if x is not None]
    if len(given) != 1:
        raise InvalidInputError(
            "give the labels once: --labels a,b or --labels-file F or --labels-dir D"
        )
    if labels is not None:
        label_list = task.parse_labels(labels)
    elif labels_file is not None:
        label_list = task.read_labels_file(labels_file)
    else:
        label_list = task.labels_from_folder(labels_dir)
    task.load_templates(templates)  # bad templates fail before the model loads

    files, failures = collect_images(paths)
    if not files and not failures:
        raise no_images(paths)
    encoder = ModelRef(model, device=device, precision=precision)
    result = task.classify(
        encoder,
        [str(f) for f in files],
        label_list,
        templates=templates,
        top_k=top_k,
        multi_label=multi_label,
        threshold=threshold,
        batch_size=batch_size,
        progress=show_progress(),
        max_megapixels=max_megapixels,
    )
    failures += result.failures
    for failure in failures:
        warn(f"{failure} (skipped)")

    preds = result.predictions
    if fmt is Format.json:
        print_json([p.to_dict() for p in preds])
    elif fmt is Format.csv:
        print_csv(
            ["path", "rank", "label", "score"],
            [(p.path, i + 1, lb, f"{s:.4f}") for p in preds for i, (lb, s) in enumerate(p.labels)],
        )
    else:
        kind = f"score ≥ {result.threshold:g}" if multi_label else "probability"
        columns = min(top_k, len(label_list))
        rows = [
            (p.path, *(f"{lb} {s:.2f}" for lb, s in p.labels), *([""] * (columns - len(p.labels))))
            for p in preds
        ]
        header = ["image", *(f"#{i + 1}" for i in range(columns))]
        print_table(header, rows, title=f"{encoder.info.name}: {len(label_list)} labels ({kind})")
    total = len(preds) + len(failures)
    info(
        f"classified {len(preds)} of {total} images"
        + (f", skipped {len(failures)}" if failures else "")
    )
    if not preds:
        raise typer.Exit(1)
