"""The site agent's runtime side: its configuration, its data, and the one path every request goes through.

A site is configured by a configuration file (``site.toml``, named by ``config`` in the node config; ``fedrad
site join --config``) and/or its SuperNode's ``--node-config`` (TOML values, strings quoted):

=================  ==================================================================================
key                meaning
=================  ==================================================================================
config             path of the site's configuration file (node config only)
site-name          the site's name as the coordinator will see it (required; ``[site] name`` in the file)
table              the site's feature table (.parquet or .csv, e.g. from ``fedrad site extract``)
workdir            where the site keeps its audit log and results (default: next to the table)
min-cell-size      smallest group the site describes (default 10; only stricter than the request)
min-events         opt-in: refuse model sums over fewer events (default 0; see fedrad.client.policy)
allowed-requests   request types the site answers (default: all; comma-separated in the node config)
extract-jobs       worker processes for feature extraction at the site (default: all cores)
manifest, params   the site's default data source as a manifest to extract (instead of ``table``)
robustness         the default source's perturbed feature table (``fedrad site robustness``) for ICC
approved-plans     plan ids the site answers (comma-separated; default: every plan approved in workdir)
=================  ==================================================================================

Data sources are the site's own: ``[sources.ALIAS]`` tables in the file (``table`` or ``manifest`` +
``params``, optional ``robustness``) and the default source (``[site]`` / node-config ``table`` or
``manifest``). A study plan names a source by alias (``[sites.NAME] source = "ALIAS"``); no request ever
carries a path. ``[columns]`` (``outcome``, ``clinical``, ``categorical``, ``features``) is the site's allow-list:
a plan that names other columns is not approved (:mod:`fedrad.client.approval`), and only numeric columns matching
``features`` (glob patterns; default fedrad's pyradiomics names and the plan's volume column) are candidate
features at the site, whatever a request asks (:func:`fedrad.common.plan.candidate_features`).

Permissions: building a :class:`Site` sets the process's umask to 077, so everything the site agent creates from
then on (its work directory and the folders in it, ``site.log``, the SuperNode it starts and that SuperNode's
ClientApp processes, which build their own Site) is private to the site's account: folders 0700, files 0600.
``fedrad site join`` builds its Site before it starts the SuperNode; a ClientApp builds one per message. A
single-machine rehearsal (``--runtime local``, the demo, tests) builds the sites in the coordinator's process,
whose later files are then private too.

The file has a ``[site]`` table (name, table, workdir, extract-jobs; relative paths are relative to the file)
and a ``[policy]`` table (min-cell-size, min-events, allowed-requests). Node-config values override the
``[site]`` values; for the policy the stricter of the two wins, so a SuperNode's command line can tighten but
never loosen what the hospital wrote in its file. ``deploy/site.toml`` is a commented example.

:func:`answer` is the single path of a request: allow-list check -> compute from the site's own rows ->
audit log -> reply. Errors are re-raised as one line naming the site, which Flower turns into an error
reply the coordinator reports.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedrad.client.audit import AuditLog
from fedrad.client.policy import SitePolicy


#: tables read from disk in this process, newest last: (path, inode, size, mtime) -> (DataFrame, its bytes)
_READS: "OrderedDict[tuple, tuple[pd.DataFrame, int]]" = OrderedDict()
#: at most this many bytes of them are kept (the oldest go first)
READ_CACHE_BYTES = 256 << 20


def file_key(path: Path) -> tuple:
    """What identifies one version of a file: path, inode, size and mtime (a replaced or edited file differs)."""
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def read_table(path: Path, reader: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    """``reader(path)``, read once per process for as long as the file is unchanged; every caller gets its own
    copy. A site message used to parse its tables 5-6 times (the plan checks, then each step); a derived table
    is replaced atomically (:meth:`Site.save_table`: a new inode) and an edited file changes size or mtime, so
    neither is ever served stale."""
    key = file_key(path)
    if key in _READS:
        _READS.move_to_end(key)
        return _READS[key][0].copy()
    df = reader(path)
    df.attrs = {}  # table metadata (pandas copies it into every column it hands out) never slows a request
    _READS[key] = (df, 8 * int(df.size))  # ~8 bytes a cell (measuring object columns exactly costs more than the read)
    while len(_READS) > 1 and sum(size for _, size in _READS.values()) > READ_CACHE_BYTES:
        _READS.popitem(last=False)
    return df.copy()


def frame_to_arrow(df: pd.DataFrame):
    """``pyarrow.Table.from_pandas(df, preserve_index=False)``, the same table and pandas metadata, with the
    float64 and int64 columns converted as whole blocks: pyarrow's own conversion takes each column from pandas
    one by one, which dominates writing a wide feature table."""
    import json

    import numpy as np
    import pyarrow as pa

    kinds = {np.dtype(np.float64): "float64", np.dtype(np.int64): "int64"}
    fast = [t in kinds for t in df.dtypes]
    if not any(fast) or not df.columns.is_unique or not all(isinstance(c, str) for c in df.columns):
        return pa.Table.from_pandas(df, preserve_index=False)
    names = list(df.columns)
    rest = [c for c, f in zip(names, fast) if not f]
    base = pa.Table.from_pandas(df[rest], preserve_index=False)
    meta = json.loads(base.schema.metadata[b"pandas"])
    entries = {e["name"]: e for e in meta["columns"]}
    arrays = {c: base.column(c) for c in rest}
    for dtype, kind in kinds.items():
        cols = [c for c, f, t in zip(names, fast, df.dtypes) if f and t == dtype]
        if not cols:
            continue
        values = np.ascontiguousarray(df[cols].to_numpy(dtype=dtype).T)
        for c, v in zip(cols, values):
            arrays[c] = pa.array(v, from_pandas=True)
            entries[c] = {"name": c, "field_name": c, "pandas_type": kind, "numpy_type": kind, "metadata": None}
    meta["columns"] = [entries[c] for c in names]
    schema = pa.schema([pa.field(c, arrays[c].type) for c in names],
                       metadata={**base.schema.metadata, b"pandas": json.dumps(meta).encode()})
    return pa.Table.from_arrays([arrays[c] for c in names], schema=schema)


def remember_table(path: Path, df: pd.DataFrame) -> None:
    """Put the DataFrame that reading ``path`` (just written) gives into this process's read cache."""
    df.attrs = {}
    _READS[file_key(path)] = (df, 8 * int(df.size))
    while len(_READS) > 1 and sum(size for _, size in _READS.values()) > READ_CACHE_BYTES:
        _READS.popitem(last=False)


def _read_features(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, float_precision="round_trip")


class SiteFailure(RuntimeError):
    """A request failed or was refused at a site; the message starts with the site's name and carries only a
    code and a generic text (the details stay in the site's local log, ``<workdir>/site.log``)."""


#: error code -> the only text a reply carries (no value, count, column list or path ever leaves in an error)
PUBLIC_ERRORS = {
    "plan-not-approved": "refused: the request does not belong to a study plan this site approved",
    "outside-plan": "refused: the request goes beyond the study plan this site approved",
    "min-cell-size": "refused: the rows involved are fewer than the site's minimum cell size",
    "min-events": "refused under the site's min-events rule",
    "not-allowed": "refused: the site does not answer this request type",
    "unsigned": "refused: the request is not signed by the coordinator its approved plan names",
    "policy": "refused under the site's privacy policy",
    "data": "could not compute its reply from its data; its operator sees the reason in the site's local log",
    "config": "is misconfigured; its operator sees the reason in the site's local log",
}


def error_code(exc: BaseException) -> str:
    from fedrad.client.approval import ApprovalError
    from fedrad.client.guard import PlanViolation
    from fedrad.client.policy import PolicyRefusal

    if isinstance(exc, ApprovalError):
        return "plan-not-approved"
    if isinstance(exc, PlanViolation):
        return "outside-plan"
    if isinstance(exc, PolicyRefusal):
        return getattr(exc, "code", "policy")
    from fedrad.client.signed import Unsigned

    if isinstance(exc, Unsigned):
        return "unsigned"
    if exc.__class__.__name__ in ("TooFewRows", "SmallBatchError"):
        return "min-cell-size"
    return "data"


@dataclass(frozen=True)
class Site:
    name: str
    table_path: Path | None
    workdir: Path
    policy: SitePolicy
    extract_jobs: int | None = None
    #: alias -> {"table" | "manifest", "params", "robustness"} (absolute paths); "default" from [site]/node config
    sources: dict = field(default_factory=dict)
    #: plan ids the site's configuration pins (None: any plan approved in its workdir)
    approved_plans: frozenset | None = None
    #: the [columns] allow-list (None: not set)
    columns: dict | None = None

    def __post_init__(self) -> None:
        import os

        os.umask(0o077)  # the site agent's folders 0700, its files 0600 (module docstring)

    @classmethod
    def from_node_config(cls, cfg: dict, run_config: dict | None = None) -> "Site":
        cfg = dict(cfg)
        sim_root = (run_config or {}).get("sim-root")
        file_policy, file_extra = None, {}
        if "partition-id" in cfg and "site-name" not in cfg and sim_root:
            # Flower simulation: virtual sites are numbered; each has the site.toml its operator (the person
            # rehearsing on one machine) wrote under sim-root -- never anything from the run's requests
            name = f"site{int(cfg['partition-id']) + 1}"
            cfg = {**cfg, "site-name": name, "workdir": str(Path(str(sim_root)) / name)}
            if (Path(str(sim_root)) / name / "site.toml").is_file():
                cfg.setdefault("config", str(Path(str(sim_root)) / name / "site.toml"))
        if cfg.get("config"):
            file_site, file_policy, file_extra = read_site_config(Path(str(cfg["config"])), extra=True)
            cfg = {**file_site, **cfg}
        if "site-name" in cfg:
            name = str(cfg["site-name"])
        elif "partition-id" in cfg:
            name = f"site{int(cfg['partition-id']) + 1}"
        else:
            raise SiteFailure("this SuperNode has no site-name in its --node-config or [site] name in its "
                              "config file; add site-name=\"NAME\"")
        table = Path(str(cfg["table"])) if cfg.get("table") else None
        workdir = Path(str(cfg["workdir"])) if cfg.get("workdir") else (
            table.parent / ".fedrad-site" if table else Path.cwd() / ".fedrad-site")
        jobs = int(cfg["extract-jobs"]) if cfg.get("extract-jobs") else None
        try:
            policy = SitePolicy.from_mapping({**(file_policy or {}), **cfg})
            if file_policy is not None:
                policy = policy.stricter(SitePolicy.from_mapping(file_policy, where=str(cfg["config"])))
        except ValueError as exc:
            raise SiteFailure(f"site {name}: {exc}") from None
        sources = dict(file_extra.get("sources", {}))
        default = {k: str(cfg[k]) for k in ("table", "manifest", "params", "robustness") if cfg.get(k)}
        if default:
            sources["default"] = default
        pins = [_as_list(v) for v in ((file_policy or {}).get("approved-plans"), cfg.get("approved-plans"))
                if v is not None]
        approved = frozenset.intersection(*(frozenset(p) for p in pins)) if pins else None
        return cls(name=name, table_path=table, workdir=workdir, policy=policy, extract_jobs=jobs,
                   sources=sources, approved_plans=approved, columns=file_extra.get("columns"))

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.workdir / "audit.jsonl")

    def source(self, alias: str | None) -> dict:
        """The data source a plan names (``None``: the site's default), from the site's own configuration."""
        key = alias or "default"
        if key not in self.sources:
            from fedrad.client.guard import PlanViolation

            self.log_local("config", f"the plan names data source {key!r}, which is not configured here "
                                     f"(configured: {', '.join(sorted(self.sources)) or 'none'}); add "
                                     f"[sources.{key}] to site.toml")
            raise PlanViolation("the plan's data source is not configured at this site")
        return self.sources[key]

    def rows(self) -> pd.DataFrame:
        """The site's own feature table (never leaves the site)."""
        if self.table_path is None:
            raise SiteFailure(f"site {self.name}: no feature table configured; set table=\"PATH\" in --node-config")
        if not self.table_path.is_file():
            raise SiteFailure(f"site {self.name}: feature table {self.table_path} not found")
        return read_table(self.table_path, _read_features)

    def _table_path(self, name: str) -> Path:
        from fedrad.client.approval import ApprovalError

        if not isinstance(name, str) or not _TABLE_NAME.match(name):
            raise ApprovalError("a table name that is not of the form [A-Za-z0-9_:.-]+")
        base = (self.workdir / "harmonized").resolve()
        path = (base / f"{name}.parquet").resolve()
        if path.parent != base:
            raise ApprovalError("a table name outside the site's work directory")
        return path

    def table(self, name: str | None = None) -> pd.DataFrame:
        """The configured feature table (``name`` None) or a table this site derived earlier (``name``)."""
        if name is None:
            return self.rows()
        path = self._table_path(name)
        if not path.is_file():
            raise ValueError(f"table {name!r} not found (an earlier phase did not run here)")
        return read_table(path, pd.read_parquet)

    def table_version(self, name: str) -> tuple:
        """:func:`file_key` of a table this site derived (``raw``, ``h-<fold>``): per-process caches of what is
        computed from a table key on it."""
        return file_key(self._table_path(name))

    def save_table(self, name: str, df: pd.DataFrame) -> Path:
        """Keep a derived table at the site (atomic write; never sent anywhere)."""
        import io

        from fedrad.common.files import atomic_write_bytes

        import numpy as np
        import pyarrow.parquet as pq

        path = self._table_path(name)
        table = frame_to_arrow(df)
        buf = io.BytesIO()  # float columns without dictionary pages: they hold no repeated values worth it
        pq.write_table(table, buf, use_dictionary=[c for c, t in zip(df.columns, df.dtypes) if t != np.float64])
        atomic_write_bytes(path, buf.getvalue())
        remember_table(path, table.to_pandas())  # what reading the file gives, without parsing it again
        return path

    def log_local(self, code: str, text: str, request: str = "") -> None:
        """A line in the site's local log (0600; never sent): the full reason behind a generic error reply."""
        import datetime
        import os

        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.workdir / "site.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older log, or one copied in with other modes, is tightened too
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            os.write(fd, f"{stamp} {request or '-'} [{code}] {' '.join(text.split())}\n".encode())
        finally:
            os.close(fd)

    def answer(self, request: str, payload: dict, compute: Callable[["Site", dict], dict], *,
               auth: dict | None = None, node: int | None = None) -> dict:
        """Signature, plan and policy checks, compute, audit, return the reply payload (``site`` key added).

        When the approved plan names a coordinator key the request must carry a valid signature by it for this
        site's ``node`` (:func:`fedrad.client.signed.check_signature`, after the stateless allow-list and before
        anything that reads or writes the plan's ledger). The request must belong to a
        plan the site approved (:func:`fedrad.client.guard.check_request`, which also derives every
        privacy-relevant parameter from the site's copy of that plan). An error or refusal is audited and answered
        with a code and a generic text only; its details go to the local log.
        """
        claimed = payload.get("plan") if isinstance(payload, dict) else None
        plan = claimed if isinstance(claimed, str) and len(claimed) <= 128 else None  # for the audit record
        try:
            self.policy.check_allowed(self.name, request)  # stateless: the site's own allow-list of request types
            from fedrad.client.signed import check_signature

            check_signature(self, request, payload, auth, node)  # before the plan's ledger is read or written
            from fedrad.client.guard import check_request

            record, clean = check_request(self, request, payload)
            plan = record["plan_id"]
            reply = compute(self, {**clean, "plan": record["plan_id"], "_plan": record["plan"]})
        except Exception as exc:  # one line naming the site, whatever went wrong locally
            code = error_code(exc)
            detail = " ".join(str(exc).split()) or exc.__class__.__name__
            self.log_local(code, detail, request)
            text = PUBLIC_ERRORS.get(code, PUBLIC_ERRORS["data"])
            self.audit.record(self.name, request, {"error": code, "message": text}, status="refused", plan=plan)
            raise SiteFailure(f"site {self.name}: {text} [{code}]") from exc
        reply = {"site": self.name, **reply}
        self.audit.record(self.name, request, reply, plan=plan)
        return reply


_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_:.-]{0,100}$")
_SITE_KEYS = {"name": "site-name", "table": "table", "workdir": "workdir", "extract-jobs": "extract-jobs",
              "manifest": "manifest", "params": "params", "robustness": "robustness"}
_SOURCE_KEYS = {"table", "manifest", "params", "robustness"}
_COLUMN_KEYS = {"outcome", "clinical", "categorical", "features"}


def _as_list(value) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _resolve(base: Path, key: str, value) -> str:
    if key == "params" and str(value) in ("ct", "mr", "ct-original"):
        return str(value)
    return str((base / str(value)).resolve())


def read_site_config(path: Path, extra: bool = False):
    """``(site keys as node-config keys, [policy] table)`` of a site configuration file (and, with ``extra``,
    ``{"sources": {alias: source}, "columns": allow-list or None}``); relative paths are taken relative to the
    file. Unknown tables or keys are errors (a typo must not loosen a policy)."""
    import tomllib

    from fedrad.client.policy import POLICY_KEYS
    from fedrad.common.plan import NAME

    if not path.is_file():
        raise SiteFailure(f"site configuration file {path} not found; fix config= in --node-config")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteFailure(f"site configuration file {path} is not valid TOML: {exc}") from None
    extra_tables = set(doc) - {"site", "policy", "sources", "columns"}
    bad = sorted(f"[{t}]" for t in extra_tables) + sorted(f"[site] {k}" for k in set(doc.get("site", {})) - set(_SITE_KEYS))
    bad += sorted(f"[policy] {k}" for k in set(doc.get("policy", {})) - set(POLICY_KEYS))
    bad += sorted(f"[columns] {k}" for k in set(doc.get("columns", {})) - _COLUMN_KEYS)
    for alias, src in (doc.get("sources") or {}).items():
        if not NAME.match(alias) or not isinstance(src, dict):
            bad.append(f"[sources.{alias}] (alias must match [A-Za-z0-9_-]+ and be a table)")
            continue
        bad += sorted(f"[sources.{alias}] {k}" for k in set(src) - _SOURCE_KEYS)
        if ("table" in src) == ("manifest" in src):
            bad.append(f"[sources.{alias}] needs exactly one of table or manifest")
    if bad:
        raise SiteFailure(f"site configuration file {path}: unknown {', '.join(bad)}; known: [site] "
                          f"{', '.join(_SITE_KEYS)}; [policy] {', '.join(POLICY_KEYS)}; [sources.ALIAS] "
                          f"{', '.join(sorted(_SOURCE_KEYS))}; [columns] {', '.join(sorted(_COLUMN_KEYS))}")
    site = {}
    for key, value in doc.get("site", {}).items():
        if key in ("table", "workdir", "manifest", "robustness", "params"):
            value = _resolve(path.parent, key, value)
        site[_SITE_KEYS[key]] = value
    policy = dict(doc.get("policy", {}))
    if not extra:
        return site, policy
    sources = {alias: {k: _resolve(path.parent, k, v) for k, v in src.items()}
               for alias, src in (doc.get("sources") or {}).items()}
    columns = ({k: _as_list(v) for k, v in doc["columns"].items()} if "columns" in doc else None)
    return site, policy, {"sources": sources, "columns": columns}
