"""How the CLI shows things: one console, one table style, one renderer per kind of result.

Commands compute with functions from `flows`, `tasks` and `storage`, then call these. Nothing
here reads a store or runs a flow.
"""

from __future__ import annotations

import json
import sys

from rich import box
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

console = Console()
err = Console(stderr=True)

COSTLY_STAGES = ("caption", "interests", "embed", "fit")
STAGE_COLUMNS = ("stage", "computed", "cached", "resumed", "skipped", "failed", "seconds")


def table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A rich table whose cells wrap instead of being cut: ids must stay readable."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, overflow="fold", justify="right" if column in right else "left")
    return out


def print_table(
    title: str,
    columns: tuple[str, ...],
    rows: list[tuple[str, ...]],
    right: tuple[str, ...] = (),
    key: int = 1,
) -> None:
    """Rows as a table when it fits the terminal with every id, date and count whole (only
    `error` and `path` cells wrap, at spaces); on a narrower terminal two lines per row: its
    first `key` cells, then the others as `column: value`, wrapped at spaces. Nothing is cut."""
    wrapping = {"error", "path"}
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for column in columns:
        out.add_column(
            column,
            no_wrap=column not in wrapping,
            overflow="fold",
            justify="right" if column in right else "left",
        )
    for row in rows:
        out.add_row(*(escape(cell) for cell in row))

    def width(column: str, cells: list[str]) -> int:
        words = [w for c in cells for w in c.split()] if column in wrapping else cells
        return max(len(w) for w in [column, *words])

    needed = sum(width(c, [r[i] for r in rows]) for i, c in enumerate(columns))
    if not rows or needed + 3 * len(columns) <= console.width:
        console.print(out)
        return
    console.print(f"[italic]{escape(title)}[/]")
    for row in rows:
        console.print(Text("  ".join(row[:key]), style="bold"))
        details = [f"{c}:\u00a0{v}" for c, v in zip(columns[key:], row[key:], strict=True) if v]
        if details:  # wrapped at spaces, indented
            console.print(Padding(Text(" · ".join(details)), (0, 0, 0, 2)))


def print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_markdown(text: str) -> None:
    console.print(Markdown(text))


def print_error(message: str, hint: str = "") -> None:
    """`error:` and `hint:` lines, escaped (messages hold paths and `[...]`) and never hard-wrapped
    (paths stay copyable)."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}", soft_wrap=True)


def stage_table(title: str, stages: dict) -> Table:
    """A run's stages (manifest `stages`: name -> counts, as dicts or StageStats)."""
    out = table(title, STAGE_COLUMNS, right=STAGE_COLUMNS[1:])
    for name, s in stages.items():
        s = s if isinstance(s, dict) else s.model_dump()
        out.add_row(
            name,
            *(f"{s[c]:,}" for c in STAGE_COLUMNS[1:-1]),
            f"{s['seconds']:.1f}",
        )
    return out


def counts_line(c: dict) -> str:
    return (
        f"items: {c['input']:,} in = {c['assigned']:,} assigned + "
        f"{c['quarantined']:,} quarantined + {c['failed']:,} failed"
    )


def print_run_summary(manifest: dict, seconds: float) -> None:
    """What `sidpipe run` prints at the end: stages, where every item went, what was costly."""
    title = f"{manifest['catalog']} {manifest['run_date']}  (run {manifest['run_id']})"
    console.print(stage_table(title, manifest["stages"]))
    if manifest.get("attempts", 1) > 1:
        console.print(
            f"attempt {manifest['attempts']}: continued an unfinished run; shards it had "
            "finished were kept (resumed)"
        )
    console.print(counts_line(manifest["counts"]))
    stages = manifest["stages"]
    recomputed = {n: stages[n]["computed"] for n in COSTLY_STAGES if n in stages}
    if not any(recomputed.values()):
        console.print(
            "[green]nothing costly recomputed[/]: caption, interests, embed and fit "
            "all came from the cache or were skipped"
        )
    else:
        done = ", ".join(f"{n} {v:,}" for n, v in recomputed.items() if v)
        console.print(f"computed: {done}")
    sids = manifest["files"]["sids"]["path"]
    console.print(
        f"tokenizer {manifest['tokenizer_id']}; published "
        f"[bold]{sids.rsplit('/', 1)[0]}/[/] in {seconds:.1f}s"
    )
    print_notes(manifest)


def print_notes(manifest: dict) -> None:
    """A run's notes, then its SID-quality warnings (they repeat every run until a refit)."""
    for note in manifest.get("notes", []):
        console.print(f"note: {escape(note)}", soft_wrap=True)
    for warning in manifest.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def print_manifest(m) -> None:
    """One published run: counts, tokenizer, code version, stages, files."""
    console.print(
        f"[bold]{m.catalog} {m.run_date}[/]  run {m.run_id}  "
        f"finished {m.finished_at:%Y-%m-%d %H:%M:%S} UTC"
    )
    console.print(counts_line(m.counts.model_dump()))
    console.print(
        f"tokenizer: {m.tokenizer_id}; code: sidpipe {m.code_version.get('sidpipe')} "
        f"{(m.code_version.get('git_commit') or '')[:10]}"
    )
    print_notes(m.model_dump())
    console.print(stage_table("stages", m.stages))
    print_table(
        "files",
        ("role", "path", "rows", "bytes"),
        [
            (role, f.path, "" if f.rows is None else f"{f.rows:,}", f"{f.bytes:,}")
            for role, f in m.files.items()
        ],
        right=("rows", "bytes"),
    )


def print_sid_head(sids, rows: int) -> None:
    head = table(
        f"sids.parquet ({sids.num_rows:,} rows; first {min(rows, sids.num_rows)})",
        ("item_id", "sid", "codes", "suffix", "first_assigned"),
    )
    for row in sids.slice(0, rows).to_pylist():
        head.add_row(
            escape(row["item_id"]),
            row["sid"],
            str(row["codes"]),
            str(row["suffix"]),
            str(row["first_assigned"]),
        )
    console.print(head)


def print_run_list(manifests, records, root_uri: str) -> None:
    if not manifests and not records:
        console.print(f"no runs in {root_uri}")
        return
    counts = ("input", "assigned", "quarantined", "failed")
    print_table(
        f"published runs in {root_uri}",
        ("catalog", "run_date", "run_id", *counts, "tokenizer"),
        [
            (
                m.catalog,
                str(m.run_date),
                m.run_id,
                *(f"{m.counts.model_dump()[k]:,}" for k in counts),
                m.tokenizer_id or "",
            )
            for m in manifests
        ],
        right=counts,
        key=3,
    )
    rows = []
    for r in records:
        embed, fit = r.stages.get("embed"), r.stages.get("fit")
        computed = f"{embed.computed:,}/{fit.computed:,}" if embed and fit else ""
        cached = f"{embed.cached:,}/{fit.cached:,}" if embed and fit else ""
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else ""
        rows.append(
            (
                r.run_id,
                r.catalog,
                str(r.run_date),
                r.status,
                computed,
                cached,
                seconds,
                r.error or "",
            )
        )
    print_table(
        "run log (every run, newest last)",
        ("run_id", "catalog", "run_date", "status", "computed embed/fit", "cached embed/fit")
        + ("seconds", "error"),
        rows,
        right=("seconds",),
        key=4,
    )


def print_diff(a, b, report, rows: int) -> None:
    def share(n: int, of: int) -> str:
        return f"{n / of:.1%}" if of else ""

    def tokenizers(counts: dict[str, int]) -> str:
        return ", ".join(f"{t} ({n:,})" for t, n in counts.items()) or "-"

    r = report
    label_a, label_b = f"{a.catalog}/{a.run_date}", f"{b.catalog}/{b.run_date}"
    console.print(f"[bold]A[/] {label_a}  run {a.run_id}  tokenizer {tokenizers(r.tokenizers_a)}")
    console.print(f"[bold]B[/] {label_b}  run {b.run_id}  tokenizer {tokenizers(r.tokenizers_b)}")
    summary = table(f"SID diff {label_a} -> {label_b}", ("", "items", "share"), ("items", "share"))
    for name, n, of in (
        ("in A", r.items_a, 0),
        ("in B", r.items_b, 0),
        ("only in A (removed)", r.only_in_a, r.items_a),
        ("only in B (added)", r.only_in_b, r.items_b),
        ("in both", r.in_both, 0),
        ("  SID changed", r.sid_changed, r.in_both),
        ("  tokenizer_id changed", r.tokenizer_changed, r.in_both),
        ("  unchanged", r.unchanged, r.in_both),
    ):
        summary.add_row(name, f"{n:,}", share(n, of))
    console.print(summary)
    if r.sid_changed:
        levels = table(
            f"where the {r.sid_changed:,} changed SIDs differ",
            ("level", "code changed", "first differs here"),
            ("code changed", "first differs here"),
        )
        for level in r.levels:
            levels.add_row(
                f"{level.level} ({level.token})",
                f"{level.code_changed:,} ({share(level.code_changed, r.sid_changed)})",
                f"{level.first_changed:,} ({share(level.first_changed, r.sid_changed)})",
            )
        levels.add_row(
            "suffix only", "", f"{r.suffix_only:,} ({share(r.suffix_only, r.sid_changed)})"
        )
        console.print(levels)
    if r.sid_changed and rows > 0:
        head = r.rows("sid_changed", rows)
        changed = table(
            f"SID changed: first {len(head):,} of {r.sid_changed:,} (by item_id)",
            ("item_id", "sid A", "sid B", "first differs"),
        )
        for row in head:
            level = row["first_changed_level"]
            where = f"level {level}" if level <= len(r.levels) else "suffix"
            changed.add_row(escape(row["item_id"]), row["sid_a"], row["sid_b"], where)
        console.print(changed)


def print_ranking_metrics(title: str, rows: list[tuple[str, dict]]) -> None:
    """Recall/NDCG@5/10 overall and by popularity bucket."""
    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    right = ("R@5", "R@10", "N@5", "N@10", "users")
    out = table(title, ("", *right), right=right)
    for name, m in rows:
        out.add_row(name, *(f"{m[k]:.4f}" for k in keys), f"{m['users']:,}")
    console.print(out)


def print_click_metrics(title: str, summary: dict[str, dict]) -> None:
    """Per click model: test AUC and GAUC (mean ± std over seeds), log loss, head/tail AUC and
    the GAUC of low-activity users."""
    columns = ("AUC", "GAUC", "logloss", "head AUC", "tail AUC", "low-act. GAUC")
    out = table(title, ("model", *columns), right=columns)
    for model, s in summary.items():
        out.add_row(
            model,
            f"{s['auc_mean']:.4f} ± {s['auc_std']:.4f}",
            f"{s['gauc_mean']:.4f} ± {s['gauc_std']:.4f}",
            f"{s['logloss_mean']:.4f}",
            f"{s['head_items']['auc_mean']:.4f}",
            f"{s['tail_items']['auc_mean']:.4f}",
            f"{s['low_activity_users']['gauc_mean']:.4f}",
        )
    console.print(out)


def print_rows(title: str, rows: list[dict]) -> None:
    """A table of dict rows (the keys of the first row are the columns; the first is left)."""
    columns = tuple(rows[0])
    cells = [
        tuple(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns)
        for row in rows
    ]
    print_table(title, columns, cells, right=columns[1:])
