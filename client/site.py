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
=================  ==================================================================================

The file has a ``[site]`` table (name, table, workdir, extract-jobs; relative paths are relative to the file)
and a ``[policy]`` table (min-cell-size, min-events, allowed-requests). Node-config values override the
``[site]`` values; for the policy the stricter of the two wins, so a SuperNode's command line can tighten but
never loosen what the hospital wrote in its file. ``deploy/site.toml`` is a commented example.

:func:`answer` is the single path of a request: allow-list check -> compute from the site's own rows ->
audit log -> reply. Errors are re-raised as one line naming the site, which Flower turns into an error
reply the coordinator reports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrad.client.audit import AuditLog
from fedrad.client.policy import SitePolicy


class SiteFailure(RuntimeError):
    """A request failed or was refused at a site; the message starts with the site's name."""


@dataclass(frozen=True)
class Site:
    name: str
    table_path: Path | None
    workdir: Path
    policy: SitePolicy
    extract_jobs: int | None = None

    @classmethod
    def from_node_config(cls, cfg: dict, run_config: dict | None = None) -> "Site":
        cfg = dict(cfg)
        sim_root = (run_config or {}).get("sim-root")
        file_policy = None
        if cfg.get("config"):
            file_site, file_policy = read_site_config(Path(str(cfg["config"])))
            cfg = {**file_site, **cfg}
        if "site-name" in cfg:
            name = str(cfg["site-name"])
        elif "partition-id" in cfg:  # Flower simulation: virtual sites are numbered, work under sim-root
            name = f"site{int(cfg['partition-id']) + 1}"
            if sim_root:
                cfg = {**cfg, "workdir": str(Path(str(sim_root)) / name)}
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
        return cls(name=name, table_path=table, workdir=workdir, policy=policy, extract_jobs=jobs)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.workdir / "audit.jsonl")

    def rows(self) -> pd.DataFrame:
        """The site's own feature table (never leaves the site)."""
        if self.table_path is None:
            raise SiteFailure(f"site {self.name}: no feature table configured; set table=\"PATH\" in --node-config")
        if not self.table_path.is_file():
            raise SiteFailure(f"site {self.name}: feature table {self.table_path} not found")
        if self.table_path.suffix.lower() == ".parquet":
            return pd.read_parquet(self.table_path)
        return pd.read_csv(self.table_path, float_precision="round_trip")

    def table(self, name: str | None = None) -> pd.DataFrame:
        """The configured feature table (``name`` None) or a table this site derived earlier (``name``)."""
        if name is None:
            return self.rows()
        path = self.workdir / "harmonized" / f"{name}.parquet"
        if not path.is_file():
            raise SiteFailure(f"site {self.name}: table {name!r} not found (an earlier phase did not run here)")
        return pd.read_parquet(path)

    def save_table(self, name: str, df: pd.DataFrame) -> Path:
        """Keep a derived table at the site (atomic write; never sent anywhere)."""
        import io

        from fedrad.common.files import atomic_write_bytes

        path = self.workdir / "harmonized" / f"{name}.parquet"
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def answer(self, request: str, payload: dict, compute: Callable[["Site", dict], dict]) -> dict:
        """Policy check, compute, audit, return the reply payload (``site`` key added)."""
        try:
            self.policy.check_allowed(self.name, request)
            reply = compute(self, payload)
        except SiteFailure:
            raise
        except Exception as exc:  # one line naming the site, whatever went wrong locally
            text = " ".join(str(exc).split()) or exc.__class__.__name__
            self.audit.record(self.name, request, {"refused": text}, status="refused")
            raise SiteFailure(f"site {self.name}: {text}") from exc
        reply = {"site": self.name, **reply}
        self.audit.record(self.name, request, reply)
        return reply


_SITE_KEYS = {"name": "site-name", "table": "table", "workdir": "workdir", "extract-jobs": "extract-jobs"}


def read_site_config(path: Path) -> tuple[dict, dict]:
    """``(site keys as node-config keys, [policy] table)`` of a site configuration file; relative paths are
    taken relative to the file. Unknown tables or keys are errors (a typo must not loosen a policy)."""
    import tomllib

    from fedrad.client.policy import POLICY_KEYS

    if not path.is_file():
        raise SiteFailure(f"site configuration file {path} not found; fix config= in --node-config")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteFailure(f"site configuration file {path} is not valid TOML: {exc}") from None
    extra = set(doc) - {"site", "policy"}
    bad = sorted(f"[{t}]" for t in extra) + sorted(f"[site] {k}" for k in set(doc.get("site", {})) - set(_SITE_KEYS))
    bad += sorted(f"[policy] {k}" for k in set(doc.get("policy", {})) - set(POLICY_KEYS))
    if bad:
        raise SiteFailure(f"site configuration file {path}: unknown {', '.join(bad)}; known: [site] "
                          f"{', '.join(_SITE_KEYS)}; [policy] {', '.join(POLICY_KEYS)}")
    site = {}
    for key, value in doc.get("site", {}).items():
        if key in ("table", "workdir"):
            value = str((path.parent / str(value)).resolve())
        site[_SITE_KEYS[key]] = value
    return site, dict(doc.get("policy", {}))
