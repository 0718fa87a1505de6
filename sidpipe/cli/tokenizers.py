"""`sidpipe fit` (tokenize your own embeddings) and `sidpipe tokenizers` (a catalog's versions)."""

from __future__ import annotations

from typing import Annotated

import typer

from sidpipe.cli.options import ConfigOption, StoreOption
from sidpipe.cli.render import console, print_markdown, table
from sidpipe.config import load_config


def fit(
    embeddings: Annotated[
        str,
        typer.Option(help="Parquet with item_id and embedding (list of floats); local or s3://."),
    ],
    out: Annotated[str, typer.Option(help="Output folder or s3:// prefix.")],
    codebooks: Annotated[
        str, typer.Option(help="Codes per level, e.g. 256,256,256.")
    ] = "256,256,256",
    method: Annotated[str, typer.Option(help="rqvae or rqkmeans.")] = "rqvae",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same SIDs).")] = 42,
    collisions: Annotated[str, typer.Option(help="suffix or reassign.")] = "suffix",
    config: ConfigOption = None,
) -> None:
    """Tokenize your own embeddings: writes a tokenizer, sids.parquet, a quality report
    (JSON, markdown, PNG) and the rows set aside (quarantine.parquet) under --out."""
    from sidpipe.models.sids import quality_markdown
    from sidpipe.progress import show_sidpipe_info
    from sidpipe.tasks.tokenize_file import tokenize_file

    try:
        sizes = [int(k) for k in codebooks.split(",") if k.strip()]
    except ValueError:
        sizes = codebooks  # the config's validation names the problem
    settings = {"codebook_sizes": sizes, "method": method, "seed": seed, "collisions": collisions}
    cfg = load_config(config, tokenizer=settings)
    show_sidpipe_info()  # progress and fit lines on stderr

    quality = tokenize_file(embeddings, out, cfg.tokenizer)
    print_markdown(quality_markdown(quality))
    console.print(
        f"wrote tokenizer/, sids.parquet, tokens.txt, quality.json|md|png, quarantine.parquet "
        f"({quality['quarantined']:,} rows) to {out}"
    )


def tokenizers(
    catalog: Annotated[str, typer.Argument(help="Catalog name.")],
    store: StoreOption = None,
    pin: Annotated[
        str | None, typer.Option(help="Pin this tokenizer version: later runs encode with it.")
    ] = None,
) -> None:
    """List a catalog's tokenizer versions (which one is pinned, drift), or pin one."""
    from sidpipe.errors import TokenizerNotFound
    from sidpipe.storage.published import published_runs
    from sidpipe.storage.registry import pin as pin_version
    from sidpipe.storage.registry import read_registry
    from sidpipe.storage.store import existing_store

    artifact_store = existing_store(store or load_config().store)
    if pin:
        pin_version(artifact_store, catalog, pin)
        console.print(f"pinned {pin} for {catalog}; the next run encodes with it")
    registry = read_registry(artifact_store, catalog)
    if not registry.versions:
        known = sorted({m.catalog for m in published_runs(artifact_store)})
        raise TokenizerNotFound(
            f"catalog {catalog!r} has no tokenizer in {artifact_store.root_uri}",
            hint=f"catalogs there: {', '.join(known)}" if known else "that store has no catalog",
        )
    columns = ("tokenizer_id", "pinned", "method", "codebooks", "items", "parent", "SID drift")
    out = table(f"tokenizers of {catalog} in {artifact_store.root_uri}", (*columns, "created"))
    for v in registry.versions:
        out.add_row(
            v.tokenizer_id,
            "*" if v.tokenizer_id == registry.pinned else "",
            v.method,
            "/".join(map(str, v.codebook_sizes)),
            f"{v.items:,}",
            v.parent or "",
            f"{v.drift['sid_changed']:.1%}" if v.drift else "",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(out)


def register(app: typer.Typer) -> None:
    app.command()(fit)
    app.command()(tokenizers)
