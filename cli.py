"""The ``retrieve`` command line: a thin click layer over retrieval/, indexer/ and explain/.

Every error from the packages (a :class:`retrieval.errors.RetrieveError`) becomes one ``Error: …`` line
and a non-zero exit; heavy imports (torch, faiss) happen inside the commands so ``--help`` is instant.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from retrieval import __version__
from retrieval.errors import RetrieveError
from retrieval.names import shown
from retrieval.presets import PRESETS


class RetrieveGroup(click.Group):
    """Turns the packages' exceptions into one-line errors (no tracebacks for user mistakes)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrieveError as e:
            raise click.ClickException("\n".join(map(shown, str(e).split("\n")))) from None  # names readable
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _index_dir(value: str | None) -> Path:
    from retrieval.index.settings import default_index_dir  # no SQLAlchemy

    return Path(value).expanduser() if value else default_index_dir()


index_option = click.option("--index", "index_dir", metavar="DIR", envvar="RETRIEVE_INDEX",
                            help="Index directory [default: $RETRIEVE_INDEX, else ~/.local/share/retrieve].")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def _use_db(ctx: click.Context, _param, value: str | None) -> str | None:
    if not ctx.resilient_parsing:
        from retrieval.index import database

        database.use(value)  # a bad URL: one line, from the RetrieveGroup
    return value


db_option = click.option("--db", metavar="URL", envvar="RETRIEVE_DB", expose_value=False, callback=_use_db,
                         help="Keep the index's rows in this PostgreSQL database (postgresql+psycopg://USER@HOST/DB; "
                              "the password from PGPASSWORD or ~/.pgpass, never stored) instead of the SQLite file "
                              "in the index directory; the directory records it [env: RETRIEVE_DB].")


def _trust_model(ctx: click.Context, _param, value: bool) -> bool:
    if not ctx.resilient_parsing:
        from retrieval.models.loader import trust_models

        trust_models(value)
    return value


trust_option = click.option("--trust-model", is_flag=True, envvar="RETRIEVE_TRUST_MODEL", expose_value=False,
                            callback=_trust_model,
                            help="Load the index's model even if it is user code (module:function or a TorchScript "
                                 "file): only for an index you trust [env: RETRIEVE_TRUST_MODEL=1].")


@click.group(cls=RetrieveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="retrieve")
@click.option("--threads", type=click.IntRange(1), default=None, envvar="RETRIEVE_THREADS",
              help="CPU threads for inference [default: all cores].")
@click.pass_context
def main(ctx: click.Context, threads: int | None) -> None:
    """retrieve: image retrieval that explains every match (SFAM heat maps)."""
    ctx.ensure_object(dict)
    ctx.obj["threads"] = threads


def _set_threads(ctx: click.Context) -> None:
    """``--threads`` for whatever the command runs: put in RETRIEVE_THREADS, which ONNX Runtime's sessions
    (retrieval/models/graphs.py) and torch, where a command imports it, read (retrieval/models/loading.py
    apply_threads). Never imports torch itself: a search through the cached graphs does not need it (importing it
    took 1-3 s of a fresh process's query)."""
    threads = (ctx.obj or {}).get("threads")
    if threads:
        import os

        os.environ["RETRIEVE_THREADS"] = str(threads)


# -- models -------------------------------------------------------------------------------------
@main.command()
@json_option
def models(as_json: bool) -> None:
    """List the registered backbones and whether their weights are available offline.

    \b
    Examples:
      retrieve models             # name, embedding size, feature map, offline or not
      retrieve models --json      # the same as a JSON list
    """
    from retrieval.models.loading import weights_location
    from retrieval.models.registry import REGISTRY

    rows = []
    for name, spec in REGISTRY.items():
        where, ok = weights_location(name)
        h = w = spec.preprocess.size // 32
        rows.append({"name": name, "embedding_dim": spec.feature_dim,
                     "feature_map": [spec.feature_dim, h, w], "input_size": spec.preprocess.size,
                     "weights": where, "available_offline": ok, "description": spec.description})
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'name':<20} {'dim':>5}  {'feature map @ input':<22} {'offline':<8} weights")
    for r in rows:
        fm = "{}x{}x{} @ {}px".format(*r["feature_map"], r["input_size"])
        click.echo(f"{r['name']:<20} {r['embedding_dim']:>5}  {fm:<22} {'yes' if r['available_offline'] else 'no':<8} "
                   f"{r['weights']}")
    click.echo("\nAlso: --model path/to/model.pt (TorchScript returning N×C×H×W) or --model package.module:function.")


# -- index --------------------------------------------------------------------------------------
class _Bar:
    """click.progressbar on a terminal (stderr), nothing when piped."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled
        self.label = label
        self.bar = None

    def start(self, total: int) -> None:
        if self.enabled and total:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True,
                                         show_eta=True)
            self.bar.__enter__()

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def stage(self, label: str, total: int) -> None:
        """A later stage of the same run (indexer/common.py stage_progress): this bar ends, one for ``label`` starts."""
        self.close()
        self.label = label
        self.start(total)

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@index_option
@db_option
@click.option("--model", default=None, help="Backbone for a new index [default: efficientnet_lite0].")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file (state dict).")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default=None, help="Similarity [default: cosine].")
@click.option("--index-type", type=click.Choice(["flat", "hnsw", "ivfpq", "sharded"]), default=None,
              help="FAISS index type of a new index [default: flat]; sharded: float16 shard files, IVF-PQ "
                   "searched memory-mapped (millions of images).")
@click.option("--faiss", "faiss_factory", default=None, metavar="FACTORY",
              help="Advanced: a FAISS factory string for a new index (instead of --index-type).")
@click.option("--input-size", type=click.IntRange(32, 2048), default=None, help="Input side in pixels of a new index.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="What a new index is for: " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + ".")
@click.option("--face-detector", type=click.Choice(["hog", "cnn"]), default=None,
              help="With --preset faces: dlib's HOG detector (fast, the default) or its CNN detector (finds "
                   "turned and small faces, slower).")
@click.option("--resize", type=click.Choice(["squash", "long"]), default=None,
              help="Input shape of a new index: squash to a square, or keep the aspect (long side = input size).")
@click.option("--pooling", default=None, metavar="gap|gem[:P]|rmac",
              help="Feature map → embedding for a new index: average, generalised mean (P = 3) or regional max (R-MAC).")
@click.option("--head", default=None, metavar="none|centre|pca|pca-whiten[:D]",
              help="Linear head of a new index, fitted on the collection [default: the preset's; general: "
                   "centre, instance: pca-whiten:128].")
@click.option("--refit", is_flag=True, help="Re-fit the index's linear head on the whole collection now.")
@click.option("--precision", type=click.Choice(["fp32", "int8", "bf16"]), default=None,
              help="Arithmetic of a new index's network (search and explain use the same): fp32, or int8 (ONNX "
                   "Runtime static quantisation; faster, slightly different embeddings: bench/results/precision.md) "
                   "[default: fp32; a new --preset instance index: int8 where the CPU has VNNI].")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Decoding threads [default: up to 4]; with --engine ray: embedding actors [default: one per free CPU].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where decoding and embedding run: this process, or a Ray cluster (needs the ray extra).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --engine ray: the cluster (auto, host:port or ray://host:port) [default: a local Ray on "
                   "this machine's CPUs].")
@click.option("--follow-links", is_flag=True,
              help="Follow symbolic links that lead out of PATHS (by default they are not: a link to / would index "
                   "the whole disk). Paths are stored as real paths either way.")
@click.option("--prune-missing", is_flag=True,
              help="Also drop the photos of folders that are away. By default a folder that is gone, or empty "
                   "(an unmounted drive, a disconnected share), keeps its photos' rows and is named.")
@click.option("--catalogue", "as_catalogue", is_flag=True,
              help="PATHS are the index's catalogue (clean reference images): searches of this index also verify "
                   "the top catalogue images beside the global shortlist (search --catalogue N).")
@trust_option
@json_option
@click.pass_context
def index(ctx, paths, index_dir, model, weights, metric, index_type, faiss_factory, input_size, preset, face_detector,
          resize, pooling, head, refit, batch_size, workers, engine, ray_address, follow_links, as_json,
          precision=None, as_catalogue=False, prune_missing=False) -> None:
    """Index the photos under PATHS (recursively); re-runs only embed what changed.

    \b
    Examples:
      retrieve index ~/Pictures                   # into the default index (see --index)
      retrieve index ~/Pictures --json            # the counts as JSON
      retrieve index ~/Products --preset instance --index ~/products-index
    """
    from indexer import index_paths

    _set_threads(ctx)
    if index_type and faiss_factory:
        raise click.UsageError("give --index-type or --faiss, not both")
    if ray_address and engine != "ray":
        raise click.UsageError("--ray-address needs --engine ray")
    bar = _Bar(enabled=not as_json and sys.stderr.isatty(), label="indexing")

    def on_skip(path: str, reason: str) -> None:
        if bar.bar:
            click.echo("", err=True)
        click.echo(f"{shown(path)}: {reason}", err=True)

    try:
        report = index_paths(paths, _index_dir(index_dir), model=model, weights=weights, metric=metric,
                             index_type=index_type, faiss_factory=faiss_factory, input_size=input_size,
                             preset=preset, resize=resize, pooling=pooling, head=head, refit=refit, batch_size=batch_size, workers=workers, progress=bar, on_skip=on_skip,
                             follow_links=follow_links, engine=engine, ray_address=ray_address,
                             catalogue=as_catalogue, prune_missing=prune_missing, **({"face_detector": face_detector} if face_detector else {}),
                             **({"precision": precision} if precision else {}))
    finally:
        bar.close()
    if as_json:
        d = report.to_dict()
        d.pop("skipped_files")
        click.echo(json.dumps(d))
    elif hasattr(report, "faces"):  # a faces index (indexer/faces.py): rows are faces
        click.echo(f"{report.total} faces in {report.index}: {report.faces} faces in {report.indexed} photos indexed, "
                   f"{report.no_face} photos with no face found, {report.unchanged} unchanged, {report.removed} "
                   f"removed, {report.skipped} skipped" + (f" (+{report.skipped_before} known bad or faceless)"
                                                           if report.skipped_before else "")
                   + f" in {report.seconds:.1f}s")
    else:
        click.echo(f"{report.total} images in {report.index}: {report.indexed} indexed, {report.moved} moved, "
                   f"{report.unchanged} unchanged, {report.removed} removed, {report.skipped} skipped"
                   + (f" (+{report.skipped_before} known bad)" if report.skipped_before else "")
                   + f" in {report.seconds:.1f}s")
    if report.catalogue and not as_json:
        click.echo(f"catalogue: {_paths_text(report.catalogue)}")
    if report.kept_missing and not as_json:
        from retrieval.index.check import describe_folder

        for g in report.kept_missing:
            click.echo(f"{shown(describe_folder(g))}; kept")
        click.echo("reconnect the folders, or drop their rows: the same command with --prune-missing, or "
                   f"`retrieve check --repair --prune-missing --index {shlex.quote(report.index)}`")
    if report.interrupted:
        click.echo("Interrupted: the work done so far is kept; run the same command again to continue.", err=True)
        ctx.exit(130)


# -- info ---------------------------------------------------------------------------------------
@main.command()
@index_option
@db_option
@json_option
def info(index_dir, as_json) -> None:
    """Show where the index is, how it was built and what it holds.

    \b
    Examples:
      retrieve info
      retrieve info --index ~/products-index --json
    """
    from retrieval.index.info import index_info
    from retrieval.index.store import IndexStore

    with IndexStore.open(_index_dir(index_dir)) as store:
        d = index_info(store)
    if as_json:
        click.echo(json.dumps(d))
        return
    width = max(len(k) for k in d)
    for k, v in d.items():
        if k == "size_bytes":
            k, v = "size on disk", _human(v)
        elif k == "catalogue":
            v = _paths_text(v)
        elif k == "search_defaults":
            v = " ".join(f"--{o} {x}" for o, x in v.items()) or "none"
        elif k == "local_features":
            v = f"SIFT at {v['side']} px, up to {v['budget']} keypoints"
        elif k == "sharded_vectors":  # index type sharded: its shard collection in one line
            k, v = "shards", ", ".join(f"{a.replace('_', ' ')} {_human(sum(b.values())) if a == 'disk_bytes' else b}"
                                       for a, b in v.items())
        click.echo(f"{k.replace('_', ' '):<{width}}  {v}")


def _paths_text(paths: list[str], most: int = 3) -> str:
    """Paths for one line: all of them when few, else the count, the first ``most`` and how many more
    (``--json`` keeps the whole list)."""
    paths = [shown(p) for p in paths]
    if len(paths) <= most + 1:
        return ", ".join(paths)
    return f"{len(paths)} paths: {', '.join(paths[:most])} and {len(paths) - most} more (--json lists all)"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# -- search -------------------------------------------------------------------------------------
@main.command()
@click.argument("queries", nargs=-1, required=False, type=click.Path())
@index_option
@db_option
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Results per query.")
@click.option("--min-score", type=float, default=None, help="Drop results scoring below this.")
@click.option("--include-self", is_flag=True, help="Keep a query that is in the index in its own results.")
@click.option("--qe", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Average query expansion with the top N results (0 = off).")
@click.option("--dba", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Database-side augmentation: rank against each image averaged with its N nearest (0 = off).")
@click.option("--verify", type=click.IntRange(0, 1000), default=None, metavar="K",
              help="Re-rank the top K by SIFT matches confirmed by a RANSAC homography (0 = off) "
                   "[default: the index's, 8 with --preset instance, else 0].")
@click.option("--words", type=click.IntRange(0, 1000), default=None, metavar="N",
              help="With --verify: also verify the top N of the index's visual-word inverted file (0 = off) "
                   "[default: the index's, 25 with --preset instance, else 0].")
@click.option("--expand", type=click.IntRange(0, 1000), default=None, metavar="E",
              help="With --words: the result confirmed with the most inliers (at least 20) brings its own top E by "
                   "visual words and by the embedding, each verified against the query (0 = off) [default: 0; 10 "
                   "raises mAP@10 on the instance set 0.858 -> 0.9 for 50 % more verified pairs].")
@click.option("--within", "within", type=click.Path(), default=None, metavar="DIR",
              help="Answer only with indexed images under DIR (catalogue mode: photos against the catalogue).")
@click.option("--catalogue", "catalogue_n", type=click.IntRange(0, 1000), default=None, metavar="N",
              help="With --verify, on an index with a catalogue (index --catalogue): also verify its top N catalogue "
                   "images by the embedding and by visual words (0 = off) [default: 3 when it has one].")
@click.option("--explain", is_flag=True, help="Write heat maps and a report explaining each result.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="With --explain: output directory [default: ./retrieve-explain-<query>-<time>].")
@click.option("--method", type=click.Choice(["sfam", "sfam-plain", "gradcam", "occlusion"]), default=None,
              help="With --explain: how maps are found: sfam (two layers, correspondence-gated), sfam-plain (the "
                   "paper's map), gradcam or occlusion (baselines) [default: the index's, sfam].")
@click.option("--full-maps", is_flag=True,
              help="With --explain: save the .npy maps at each photo's full size [default: long side ≤ 1024 px].")
@click.option("--face", "face", type=click.IntRange(0), default=None, metavar="N",
              help="Faces index (--preset faces): which face of the query photo to search for, 0 = the largest "
                   "[default: 0].")
@click.option("--person", "person", default=None, metavar="ID|NAME",
              help="Faces index: instead of QUERIES, the photos with this person (`retrieve people` lists them), "
                   "each with the face's box.")
@trust_option
@json_option
@click.pass_context
def search(ctx, queries, index_dir, k, min_score, include_self, qe, dba, verify, words, within, explain, out_dir,
           method, full_maps, face, as_json, catalogue_n=None, expand=None, person=None) -> None:
    """Find the nearest neighbours of QUERIES (image files or folders of them).

    \b
    Examples:
      retrieve search query.jpg -k 5
      retrieve search query.jpg --explain          # heat maps + report.html for every result
      retrieve search some/folder --json           # one JSON object per query image
      retrieve search photos/ --within catalogue/  # answers from the catalogue's images only
      retrieve search --person Alice --index ~/faces-index   # a faces index: the photos with Alice
    """
    from explain.collection import Collection
    from retrieval.match.search import expand_queries

    if person is not None:
        return _search_person(ctx, queries, index_dir, person, as_json)
    if not queries:
        raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "queries"))
    _set_threads(ctx)
    if (out_dir or method or full_maps) and not explain:
        raise click.UsageError("--out, --method and --full-maps go with --explain")
    paths = expand_queries(queries)
    failed = 0
    on_error = lambda p, r: click.echo(f"{shown(p)}: {r}", err=True)  # noqa: E731
    with Collection(_index_dir(index_dir)) as c:
        if c.preset.per_face:
            if qe or dba or verify or words or expand or within or catalogue_n or min_score is not None:
                raise click.UsageError("--qe, --dba, --verify, --words, --expand, --within, --catalogue and "
                                       "--min-score do not apply to a faces index")
            options = {"include_self": include_self}
        else:
            options = dict(c.search_options(verify, words, catalogue_n), include_self=include_self,
                           min_score=min_score, qe=qe, expand=expand, on_error=on_error)
        results = c.search(paths, k, searcher=c.searcher(dba=dba, within=within), face=face, **options)
        for qi, res in enumerate(results):
            if res.error:
                failed += 1
                click.echo(f"{shown(res.query)}: {res.error}", err=True)
                if as_json:
                    click.echo(json.dumps(res.to_dict()))
                continue
            explained = {}
            if explain and res.results:
                explained = c.explain_results(res, _explain_target(out_dir, res.query, qi, len(paths)), method,
                                              full_maps, on_error)
            verdicts = {h.rank: explained[h.rank]["verdict"] if h.rank in explained else c.verdict(h.score).to_dict()
                        for h in res.results} if (explained or c.preset.per_face) else {}
            if as_json:
                click.echo(json.dumps(_with_verdicts(res.to_dict(), explained, verdicts)))
                continue
            _print_results(res, explained, verdicts)
    if failed:
        raise click.ClickException(f"{failed} of {len(paths)} queries could not be read"
                                   if not c.preset.per_face else f"{failed} of {len(paths)} queries had no usable face")


def _print_results(res, explained: dict, verdicts: dict) -> None:
    """A query's results as a table: rank, score, inliers (verified), verdict, face box (faces), path."""
    face = res.faces_in_query is not None
    click.echo(shown(res.query) + (f" (face {res.face} of {res.faces_in_query}, box {','.join(map(str, res.box))})"
                                 if face else ""))
    if not res.results:
        click.echo("  (no results)")
        return
    verified = any(h.inliers is not None for h in res.results)
    score_head = "score" if res.metric == "cosine" else "-distance"
    click.echo(f"  {'rank':>4}  {score_head:>9}" + (f"  {'inliers':>7}" if verified else "")
               + (f"  {'face box':<19}" if face else "") + ("  verdict" if verdicts else "") + "  path")
    for h in res.results:
        inl = "" if not verified else f"  {'' if h.inliers is None else h.inliers:>7}"
        box = f"  {h.face}:{','.join(map(str, h.box)):<17}" if face else ""
        ver = f"  {verdicts[h.rank]['headline']}" if h.rank in verdicts else ""
        click.echo(f"  {h.rank:>4}  {h.score:>9.4f}{inl}{box}{ver}  {shown(h.path)}")
    if explained:
        click.echo(f"  report: {shown(next(iter(explained.values()))['report'])}")


def _explain_target(out_dir, query: str, qi: int, n: int) -> Path:
    """Where the explanations of query number ``qi`` (of ``n``) go: ``--out`` (one sub-folder per query when
    there are several), else beside the query (explain.run.default_out_dir)."""
    if out_dir:
        return Path(out_dir) / (f"{qi + 1:02d}_{Path(query).stem}" if n > 1 else "")
    from explain.run import default_out_dir

    return default_out_dir(query)


def _with_verdicts(d: dict, explained: dict, verdicts: dict) -> dict:
    """A search's JSON with each explained result's explanation under ``explanation`` and its verdict under
    ``verdict`` (with --explain, and always on a faces index)."""
    for h in d["results"]:
        if h["rank"] in explained:
            h["explanation"] = explained[h["rank"]]
        if h["rank"] in verdicts:
            h["verdict"] = verdicts[h["rank"]]
    return d


# -- people -------------------------------------------------------------------------------------
def _people_refresh(directory: Path) -> None:
    """Group the faces that wait for a person (first run, new or re-indexed photos) before people are read; said
    on stderr (retrieval/curate/people.py refresh)."""
    from retrieval.curate.people import refresh

    r = refresh(directory)
    if r is None:
        return
    if "locked" in r:
        click.echo(f"{r['waiting']} faces wait for a person, but {r['locked'][0].lower()}{r['locked'][1:]}; the "
                   "people are shown as they were", err=True)
        return
    click.echo(f"people updated: {r['faces']} new faces ({r['kept']} kept their person from before a re-index, "
               f"{r['joined']} joined a known person, {r['new_people']} new people); {r['people']} people", err=True)


def _person_text(p) -> str:
    return f"person {p.id}" + (f" ({p.name})" if p.name else "")


def _people_index(ctx: click.Context, index_dir: str | None) -> Path:
    """A subcommand's --index, else the group's (``retrieve people --index DIR show 3``)."""
    return _index_dir(index_dir or (ctx.obj or {}).get("people_index"))


def _people_json(ctx: click.Context, as_json: bool) -> bool:
    return as_json or bool((ctx.obj or {}).get("people_json"))


@main.group(invoke_without_command=True)
@index_option
@db_option
@json_option
@click.pass_context
def people(ctx, index_dir, as_json) -> None:
    """Who is in the photos of a faces index (retrieve index --preset faces): its faces grouped into people.

    Faces without a person (a first run, new or re-indexed photos) are grouped first: a re-indexed photo's faces keep
    their person, new faces join the person they match, the rest make new people. Names are kept in the index.
    People are listed most photos first, each with a representative face (row id, photo, box).

    \b
    Examples:
      retrieve people --index ~/faces-index          # id, name, photos, faces, a face of each
      retrieve people show 3                         # person 3's faces (the row ids that move takes)
      retrieve people name 3 Alice
      retrieve people merge Alice 7                  # person 7 into Alice
      retrieve people move 42 --to new               # face 42 out, a person of its own
      retrieve search --person Alice                 # the photos with Alice, with the face box
    """
    ctx.ensure_object(dict)
    ctx.obj["people_index"], ctx.obj["people_json"] = index_dir, as_json
    if ctx.invoked_subcommand is not None:
        return
    from retrieval.curate.people import list_people
    from retrieval.index.store import IndexStore

    directory = _index_dir(index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory) as store:
        found = list_people(store)
        faces = store.count()
    if as_json:
        click.echo(json.dumps({"index": str(directory), "faces": faces, "people": [p.to_dict() for p in found]}))
        return
    if not found:
        click.echo(f"no people yet: {faces} faces wait for a person (run `retrieve people --index "
                   f"{shlex.quote(str(directory))}` again once the index is not being written)" if faces
                   else f"no people: {directory} holds no faces yet")
        return
    width = max([4] + [len(p.name or "-") for p in found])
    click.echo(f"{'id':>5}  {'name':<{width}}  {'photos':>6}  {'faces':>5}  face (row: box  photo)")
    for p in found:
        face = f"{p.face[0]}: {','.join(map(str, p.face[2]))}  {shown(p.face[1])}" if p.face else "-"
        click.echo(f"{p.id:>5}  {p.name or '-':<{width}}  {p.photos:>6}  {p.faces:>5}  {face}")


@people.command("show")
@click.argument("person")
@index_option
@db_option
@json_option
@click.pass_context
def people_show(ctx, person, index_dir, as_json) -> None:
    """The faces of PERSON (an id or a name): row id (what `people move` takes), face number:box, photo.

    \b
    Examples:
      retrieve people show 3
      retrieve people show Alice --json
    """
    from retrieval.curate.people import faces_of, person_named
    from retrieval.index.store import IndexStore

    directory = _people_index(ctx, index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory) as store:
        p = person_named(store, person)
        faces = faces_of(store, p.id)
    if _people_json(ctx, as_json):
        click.echo(json.dumps({"person": p.to_dict(), "faces": faces}))
        return
    click.echo(f"{_person_text(p)}: {p.photos} photos, {p.faces} faces")
    if faces:
        click.echo(f"  {'id':>6}  {'face:box':<20}  photo")
    for f in faces:
        click.echo(f"  {f['id']:>6}  {str(f['face']) + ':' + ','.join(map(str, f['box'])):<20}  {shown(f['path'])}"
                   + ("  (by hand)" if f["manual"] else ""))


@people.command("name")
@click.argument("person")
@click.argument("name")
@index_option
@db_option
@json_option
@click.pass_context
def people_name(ctx, person, name, index_dir, as_json) -> None:
    """Name PERSON (an id, or its current name) NAME; names are unique (case-insensitive), never a bare number.

    \b
    Examples:
      retrieve people name 3 Alice
      retrieve people name Alice "Alice B."
    """
    from retrieval.curate.people import rename
    from retrieval.index.store import IndexStore

    directory = _people_index(ctx, index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory, writable=True, what="retrieve people name") as store:
        p = rename(store, person, name)
    if _people_json(ctx, as_json):
        click.echo(json.dumps(p.to_dict()))
        return
    click.echo(f"person {p.id}: {p.name} ({p.photos} photos, {p.faces} faces)")


@people.command("merge")
@click.argument("a")
@click.argument("b")
@index_option
@db_option
@json_option
@click.pass_context
def people_merge(ctx, a, b, index_dir, as_json) -> None:
    """Merge person B into person A (each an id or a name): A keeps its name, or takes B's when it has none.

    \b
    Examples:
      retrieve people merge 3 7
      retrieve people merge Alice 7
    """
    from retrieval.curate.people import merge
    from retrieval.index.store import IndexStore

    directory = _people_index(ctx, index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory, writable=True, what="retrieve people merge") as store:
        r = merge(store, a, b)
    p = r["person"]
    if _people_json(ctx, as_json):
        click.echo(json.dumps({**r, "person": p.to_dict()}))
        return
    click.echo(f"person {r['merged']} merged into {_person_text(p)}: {p.photos} photos, {p.faces} faces"
               + (f"; the name {r['dropped_name']!r} was dropped" if r["dropped_name"] else ""))


@people.command("move")
@click.argument("face", type=int)
@click.option("--to", "to", required=True, metavar="PERSON|new",
              help="The person (an id or a name) the face goes to, or `new`: a person of its own.")
@index_option
@db_option
@json_option
@click.pass_context
def people_move(ctx, face, to, index_dir, as_json) -> None:
    """Move face FACE (its row id, from `retrieve people show PERSON`) to another person, or out to a new one.

    \b
    Examples:
      retrieve people move 42 --to new        # split it out: a person of its own
      retrieve people move 42 --to Alice
    """
    from retrieval.curate.people import move_face
    from retrieval.index.store import IndexStore

    directory = _people_index(ctx, index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory, writable=True, what="retrieve people move") as store:
        r = move_face(store, face, None if to.strip().lower() == "new" else to)
    if _people_json(ctx, as_json):
        click.echo(json.dumps({**r, "to": r["to"].to_dict()}))
        return
    click.echo(f"face {r['face']} moved from person {r['from']} to {_person_text(r['to'])}")


def _search_person(ctx: click.Context, queries, index_dir, person: str, as_json: bool) -> None:
    """`retrieve search --person REF`: the photos with that person (no query photo; the options of a search by
    photo are a one-line error)."""
    from click.core import ParameterSource

    from retrieval.curate.people import faces_of, person_named
    from retrieval.index.store import IndexStore

    if queries:
        raise click.UsageError("--person lists the photos of a person and takes no query photo: give QUERIES or "
                               "--person, not both")
    names = {p.name: p.opts[0] for p in ctx.command.params}
    given = [names[k] for k in ctx.params if k not in ("queries", "index_dir", "as_json", "person") and k in names
             and ctx.get_parameter_source(k) not in (None, ParameterSource.DEFAULT)]
    if given:
        raise click.UsageError(f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --person (it "
                               "lists the photos of a person)")
    directory = _index_dir(index_dir)
    _people_refresh(directory)
    with IndexStore.open(directory) as store:
        p = person_named(store, person)
        faces = faces_of(store, p.id)
    if as_json:
        click.echo(json.dumps({"person": p.to_dict(), "results": [{k: f[k] for k in ("path", "face", "box", "id")}
                                                                   for f in faces]}))
        return
    click.echo(f"{_person_text(p)}: {p.photos} photos")
    if not faces:
        click.echo("  (no photos)")
        return
    click.echo(f"  {'face box':<20}  path")
    for f in faces:
        click.echo(f"  {str(f['face']) + ':' + ','.join(map(str, f['box'])):<20}  {shown(f['path'])}")


# -- check --------------------------------------------------------------------------------------
@main.command()
@index_option
@db_option
@click.option("--repair", is_flag=True,
              help="Restore consistency: re-embed or drop damaged rows, drop the rows of photos deleted from folders "
                   "that still hold others, rebuild the vector file. Photos whose folder is missing, or holds none "
                   "of its indexed photos (an unmounted drive, a disconnected share), are kept.")
@click.option("--prune-missing", is_flag=True,
              help="With --repair: also drop the rows of photos whose folder is missing or holds none of them.")
@trust_option
@json_option
@click.pass_context
def check(ctx, index_dir, repair, prune_missing, as_json) -> None:
    """Verify that the index agrees with itself and with the files on disk (exit 1 when it does not).

    \b
    Examples:
      retrieve check
      retrieve check --repair                   # mend damage, drop photos deleted from their folders
      retrieve check --repair --prune-missing   # also drop photos of missing folders (e.g. a drive gone for good)
    """
    from indexer import repair_index
    from retrieval.index.check import check_index

    if prune_missing and not repair:
        raise click.UsageError("--prune-missing works with --repair: retrieve check --repair --prune-missing")
    directory = _index_dir(index_dir)
    rep = repair_index(directory, prune_missing=prune_missing) if repair else check_index(directory)
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    else:
        for what in rep.repaired:
            click.echo(f"repaired: {what}")
        for p in rep.damage():
            click.echo(shown(p))
        for p in rep.away():
            click.echo(shown(p) + ("; kept" if repair else ""))
        if rep.consistent and rep.trailing:  # the normal state after an interrupted run: heals itself
            click.echo(f"pending: {'; '.join(rep.pending())} (searches catch up in memory; the next `retrieve "
                       "index` or `retrieve check --repair` writes the vector file)")
        if rep.missing_folders:
            prune = f"retrieve check --repair --prune-missing --index {shlex.quote(rep.index)}"
            click.echo(f"--repair keeps the rows of photos in missing folders: reconnect the folders, or drop those "
                       f"rows with `{prune}`")
        click.echo(f"{rep.index}: {rep.images} images, {rep.vectors} vectors: "
                   + ("consistent" if rep.consistent else "NOT consistent" + (
                       f" (run `retrieve check --repair --index {shlex.quote(rep.index)}`)" if rep.damage() else "")))
    if not rep.consistent:
        ctx.exit(1)


# -- duplicates ---------------------------------------------------------------------------------
TIER_NAMES = {"exact": "exact copy", "near": "near-duplicate", "similar": "similar shot"}
CSV_COLUMNS = ("group", "tier", "keeper", "path", "size", "width", "height", "date", "score", "percentile", "inliers",
               "agreement")


@main.command()
@index_option
@db_option
@click.option("--similar", is_flag=True,
              help="Also group similar shots (the same scene taken moments apart), a tier of its own.")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV row per member (group, tier, keeper, path, size, width, "
                                                    "height, date, score, percentile, inliers, "
                                                    "agreement).")
@click.option("--explain", is_flag=True, help="Write one report with the heat maps of each member against its keeper.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="With --explain: output directory [default: ./retrieve-explain-duplicates-<time>].")
@click.option("--move-to", "move_to", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Move the non-keepers of the exact and near-duplicate groups (never a similar shot's) to DIR (keeping their folders relative to the common "
                   "folder of the moved photos; never over a file) and take them out of the index; journaled in the "
                   "index directory, undone by --undo.")
@click.option("--undo", is_flag=True, help="Put the latest --move-to batch back: every file where it was (checked "
                                           "byte for byte) and its rows in the index; again for the batch before.")
@trust_option
@json_option
@click.pass_context
def duplicates(ctx, index_dir, similar, as_csv, explain, out_dir, move_to, undo, as_json) -> None:
    """Find the photos of an index that are the same picture: exact copies and near-duplicates (resized,
    recompressed, cropped, colour-adjusted, rotated, mirrored, with text added), each group with a suggested keeper
    (largest, then oldest) and its evidence. Nothing is moved or deleted unless --move-to says so.

    \b
    Examples:
      retrieve duplicates                         # a table of the groups
      retrieve duplicates --csv > dups.csv        # one row per photo
      retrieve duplicates --explain               # a report: each photo's maps against its keeper
      retrieve duplicates --move-to ~/dups        # move the non-keepers out (journaled)
      retrieve duplicates --undo                  # put the last batch back
    """
    _set_threads(ctx)
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    if out_dir and not explain:
        raise click.UsageError("--out goes with --explain")
    if undo and (move_to or explain or similar or as_csv):
        raise click.UsageError("--undo goes alone (with --index and --json)")
    directory = _index_dir(index_dir)
    if undo:
        return _undo_moves(directory, as_json)
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    quiet = as_json or as_csv or not sys.stderr.isatty()
    if not move_to:
        _note_pending_batch(directory)
    moved = explained = None
    with IndexStore.open(directory, writable=bool(move_to), what="retrieve duplicates") as store:
        with _progress(not quiet, "comparing") as progress:
            found = find_duplicates(store, similar=similar, progress=progress)
        if explain and found.groups:  # before any photo moves
            explained = _explain_groups(directory, found.groups, out_dir)
        if move_to:
            from retrieval.curate.moves import move_non_keepers

            with _progress(not quiet, "moving") as progress:
                moved = move_non_keepers(store.directory, found.groups, move_to, store=store, progress=progress)
    if as_json:
        d = found.to_dict()
        if moved is not None:
            d["moved"] = moved
        if explained is not None:
            d["report"] = explained["report"]
        click.echo(json.dumps(d))
    elif as_csv:
        _print_csv(found)
    else:
        _print_groups(found, directory, moved is not None)
    if moved is not None and not as_json:
        _print_moved(moved, directory)
    if explained is not None and not as_json:
        click.echo(f"report: {shown(explained['report'])}", err=as_csv)


class _progress:
    """A find or move's ``progress(done, total)`` as a bar on a terminal (stderr, as `retrieve index`), else None."""

    def __init__(self, enabled: bool, label: str):
        self.bar = _Bar(enabled, label)
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar.bar is not None and (done < self.done or total != self.bar.bar.length):  # a new pass
            self.bar.close()
            self.done = 0
        if self.bar.bar is None:
            self.bar.start(total)
        self.bar.advance(done - self.done)
        self.done = done

    def __enter__(self):
        return self if self.bar.enabled else None

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _date_text(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _print_groups(found, directory: Path, moving: bool) -> None:
    if not found.groups:
        click.echo(f"no duplicates among {found.photos} photos")
        return
    click.echo(f"{'group':>5}  {'tier':<14}  {'keep':<4}  {'size':>9}  {'W×H':>11}  {'date':<16}  {'score':>6}  "
               f"{'pctile':>6}  {'inliers':>7}  {'agree':>5}  path")
    for g in found.groups:
        for m in g.members:
            score = "" if m.score is None else f"{m.score:.3f}"
            pct = "" if m.percentile is None else f"{m.percentile:.1f}%"
            inl = "" if m.inliers is None else str(m.inliers)
            agree = "" if m.agreement is None else f"{m.agreement:.2f}"
            click.echo(f"{g.id:>5}  {TIER_NAMES.get(g.tier, g.tier):<14}  {'KEEP' if m.keeper else '':<4}  "
                       f"{_human(m.size):>9}  {f'{m.width}×{m.height}':>11}  {_date_text(m.date):<16}  {score:>6}  "
                       f"{pct:>6}  {inl:>7}  {agree:>5}  {shown(m.path)}")
    tiers = {}
    for g in found.groups:
        tiers[g.tier] = tiers.get(g.tier, 0) + 1
    extra = sum(len(g.members) - 1 for g in found.groups)
    click.echo(f"{len(found.groups)} groups (" + ", ".join(f"{TIER_NAMES.get(t, t)}: {n}" for t, n in tiers.items())
               + f") among {found.photos} photos; {extra} photos besides the keepers")
    if any(m.score is not None for g in found.groups for m in g.members):
        click.echo("score: the index's similarity of the photo to its keeper; pctile: the share of this collection's "
                   "random pairs that score lower; inliers: feature points of the two on one alignment (blank: "
                   "the frames aligned as they are, turned or mirrored); agree: how well the aligned pixels agree "
                   "(1: the same picture)")
    if not moving:
        click.echo(f"nothing was moved; to move the non-keepers out: retrieve duplicates --index "
                   f"{shlex.quote(str(directory))} --move-to DIR")


def _print_csv(found) -> None:
    import csv

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for g in found.groups:
        for m in g.members:
            w.writerow([g.id, g.tier, int(m.keeper), shown(m.path), m.size, m.width, m.height,
                        _time_iso(m.date), "" if m.score is None else f"{m.score:.6f}",
                        "" if m.percentile is None else f"{m.percentile:.3f}", "" if m.inliers is None else m.inliers,
                        "" if m.agreement is None else f"{m.agreement:.3f}"])


def _time_iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_moved(moved: dict, directory: Path) -> None:
    done = moved.get("completed")
    if done:
        click.echo(f"completed the interrupted batch {shown(done['batch'])}: {done['moved']} photos moved")
    for s in moved["skipped"]:
        click.echo(f"{shown(s['path'])}: not moved ({s['reason']})", err=True)
    if not moved["moved"]:
        click.echo("nothing to move")
        return
    click.echo(f"moved {moved['moved']} photos ({_human(moved['bytes'])}) to {shown(moved['dest'])}, keeping their "
               f"folders below {shown(moved['root'])}; {moved['rows_removed']} rows left the index")
    click.echo(f"to put them back: retrieve duplicates --index {shlex.quote(str(directory))} --undo")
    dest, root = Path(moved["dest"]), Path(moved["root"])
    if dest == root or root in dest.parents or dest in root.parents:
        click.echo(f"note: {shown(dest)} is inside or above the folder of the moved photos: a `retrieve index` of that "
                   "folder would index them again", err=True)


def _undo_moves(directory: Path, as_json: bool) -> None:
    from retrieval.curate.moves import undo_last

    res = undo_last(directory)
    if as_json:
        click.echo(json.dumps(res))
        return
    if res["batch"] is None:
        click.echo(f"nothing to undo: no --move-to batch of {shown(directory)} is left")
        return
    click.echo(f"restored {res['restored']} photos to their folders and {res['rows_restored']} rows to the index "
               f"(batch {shown(res['batch'])})")
    for p in res["lost"]:
        click.echo(f"{shown(p)}: not restored (its moved copy is gone or changed)", err=True)
    if res["left"]:
        click.echo(f"{res['left']} earlier batch{'es' if res['left'] > 1 else ''} can be undone too: "
                   f"retrieve duplicates --index {shlex.quote(str(directory))} --undo")


def _note_pending_batch(directory: Path) -> None:
    from retrieval.curate.moves import pending

    found = pending(directory)
    if found is None:
        return
    batch, state = found
    q = shlex.quote(str(directory))
    if state == "undoing":
        click.echo(f"an undo was interrupted ({shown(batch.plan_path)}); finish it: retrieve duplicates --index {q} "
                   "--undo", err=True)
    else:
        click.echo(f"a --move-to batch was interrupted ({shown(batch.plan_path)}); put it back with `retrieve "
                   f"duplicates --index {q} --undo`, or finish it with `retrieve duplicates --index {q} --move-to "
                   f"{shlex.quote(batch.plan['dest'])}`", err=True)


def _explain_groups(directory: Path, groups, out_dir) -> dict:
    from explain.collection import Collection
    from explain.groups import explain_groups
    from explain.run import default_out_dir

    out = Path(out_dir) if out_dir else default_out_dir("duplicates")
    on_error = lambda p, r: click.echo(f"{shown(p)}: {r}", err=True)  # noqa: E731
    with Collection(directory) as c:
        return explain_groups(c, groups, out, on_error=on_error)


# -- explain ------------------------------------------------------------------------------------
@main.command("explain")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--index", "index_dir", metavar="DIR", default=None,
              help="Use this index's backbone, metric and collection mean (μ).")
@db_option
@click.option("--model", default=None, help="Backbone when no index is used [default: efficientnet_lite0].")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file (state dict).")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default=None, help="Without an index [default: cosine].")
@click.option("--method", type=click.Choice(["sfam", "sfam-plain", "gradcam", "occlusion"]), default=None,
              help="How the maps are found: sfam (two layers, correspondence-gated), sfam-plain (the paper's map), "
                   "gradcam or occlusion (baselines) [default: sfam].")
@click.option("--input-size", type=click.IntRange(32, 2048), default=None,
              help="Input side in pixels [default: the index's explain size; 448 without an index].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: ./retrieve-explain-<A>-<time>].")
@click.option("--verify", is_flag=True, help="Also match SIFT points under one homography; draw the inliers.")
@click.option("--full-maps", is_flag=True, help="Save the .npy maps at each photo's full size [default: long side ≤ 1024 px].")
@click.option("--face-a", type=click.IntRange(0), default=None, metavar="N",
              help="Faces index (--preset faces): which face of A to explain, 0 = the largest [default: 0].")
@click.option("--face-b", type=click.IntRange(0), default=None, metavar="N",
              help="Faces index: which face of B [default: 0, the largest].")
@trust_option
@json_option
@click.pass_context
def explain_cmd(ctx, a, b, index_dir, model, weights, metric, method, input_size, out_dir, verify, full_maps,
                as_json, face_a=None, face_b=None) -> None:
    """Audit one pair: how similar A and B are, where that stands, and which regions made them similar.

    With --index the score is the one `retrieve search A` gives B in that index, and the maps explain the
    same similarity as `search --explain`; without it, retrieve compares the two photos with the model alone.

    \b
    Examples:
      retrieve explain a.jpg b.jpg
      retrieve explain a.jpg b.jpg --index ~/my-index --verify
      retrieve explain a.jpg group.jpg --index ~/faces-index --face-b 2   # a faces index: face against face
    """
    from explain.run import default_out_dir
    from retrieval.images import load_image

    _set_threads(ctx)
    for p in (a, b):
        load_image(p)  # a clear one-line error before any model is loaded
    if index_dir and (model or metric or weights):
        raise click.UsageError("give --index or --model/--metric/--weights, not both")
    out = Path(out_dir) if out_dir else default_out_dir(a)
    if index_dir:
        from explain.collection import Collection

        with Collection(_index_dir(index_dir)) as c:
            doc = c.explain_pair(a, b, out, method, verify, input_size, full_maps, face_a=face_a, face_b=face_b)
    else:
        if face_a is not None or face_b is not None:
            raise click.UsageError("--face-a/--face-b go with a faces index (--index DIR built with --preset faces)")
        from explain.run import explain_alone

        doc = explain_alone(a, b, out, model, weights, metric, method, input_size, verify, full_maps)
    if as_json:
        click.echo(json.dumps(doc))
        return
    for side, key in (("A", "a"), ("B", "b")):
        if f"face_{key}" in doc:
            click.echo(f"{side}: {shown(doc['query' if key == 'a' else 'result'])} (face {doc['face_' + key]} of "
                       f"{doc['faces_in_' + key]}, box {','.join(map(str, doc['box_' + key]))})")
    click.echo(doc["score_text"])
    click.echo(doc["verdict"]["text"])
    if doc.get("collection_note"):
        click.echo(doc["collection_note"][0].upper() + doc["collection_note"][1:] + ".")
    click.echo(doc["explained"]["text"])
    for c in doc["correspondences"]:
        click.echo(f"  region pair {c['rank']}: query {_box(c['query_box'])} ↔ result {_box(c['result_box'])}  "
                   f"{c['share']:6.1%} of the evidence for the match")
    if "energy_in_box" in doc:
        click.echo(f"share of the map inside the face box: A {doc['energy_in_box']['query']:.0%}, "
                   f"B {doc['energy_in_box']['result']:.0%}")
    click.echo(f"report: {shown(doc['files']['report'])}")


def _box(b) -> str:
    x0, y0, x1, y1 = b
    return f"({x0},{y0})–({x1},{y1})"


# -- serve --------------------------------------------------------------------------------------
@main.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but a loopback address lets other machines see the index.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--max-upload-mb", type=click.FloatRange(0.1, 200), default=20, show_default=True,
              help="The largest photo a client may upload.")
@click.option("--no-token", is_flag=True,
              help="No per-run token (loopback only): any program of any user on this machine can use the server.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests addressed to NAME (a name of this machine or a proxy in front); repeatable.")
@trust_option
@click.pass_context
def serve(ctx, index_dir, host, port, max_upload_mb, no_token, allow_hosts) -> None:
    """A local web app: drop a photo, see its matches, open one to see why (needs the serve extra).

    It prints a URL that carries this run's token (RETRIEVE_TOKEN fixes one): open it. Scripts send the
    token as a header. Requests from other sites, or under a name that is not this server's, are refused.

    \b
    Examples:
      retrieve serve --index /tmp/retrieve-demo          # then open the URL it prints
      curl -H "Authorization: token TOKEN" -F image=@photo.jpg 'http://127.0.0.1:8000/api/search?k=5'
                                                # TOKEN: what follows ?token= in that URL
    """
    import web

    web.require()
    from web.app import create_app
    from web.security import Guard
    from web.server import bind, is_loopback, serve as run_server
    from web.service import Service

    _set_threads(ctx)
    guard = Guard.for_address(host, token=not no_token, allow_hosts=allow_hosts)
    if not is_loopback(host):
        click.echo(f"Warning: listening on {host}, not on this machine only: anyone who can reach it can search "
                   "this index and see its photos.", err=True)
    sock = bind(host, port)  # before the model loads: a busy port is said at once
    collection = Service(_index_dir(index_dir), max_upload_bytes=int(max_upload_mb * 1_000_000))
    try:
        run_server(create_app(collection, guard), sock, on_ready=lambda url: click.echo(
            f"Serving {collection.index_dir} ({collection.state.store.count()} images) at {guard.url(url)}  "
            "(Ctrl-C to stop)"))
    finally:
        collection.close()


if __name__ == "__main__":
    main()
