"""A site's privacy policy: which requests it answers and the smallest group it will describe.

Defaults: every request type in :data:`fedrad.common.messages.REQUESTS` is allowed, minimum cell size 10
(no aggregate is released about fewer than 10 patients). A site can only make its policy stricter than what
the coordinator asks for: the effective minimum is ``max(site policy, request)``.

What "cell" means (the documented choice):

* **Count cells** — a class or event count in a cohort summary, a histogram, ROC or Kaplan-Meier bin — are
  released only when they cover at least ``min_cell_size`` patients; smaller cells are merged with a
  neighbour or withheld.
* **Sums** — gradients, Hessians, cross-products, score statistics — are answered when the rows they sum over
  number at least ``min_cell_size``, *even if they involve fewer events*: a site with 3 events among 40
  patients (TCGA-BRCA region 5) still takes part in a Cox fit, because a 40-patient sum does not describe
  any 3 patients. The same holds for ComBat's regression sums when a categorical covariate level is small.
  A site that wants the stricter rule sets ``min_events``: it then refuses model fits (gradients and
  Hessians) over rows with fewer events (survival) or fewer patients in the smaller outcome class (response)
  than that, and ComBat statistics where a categorical covariate level has fewer patients than that.

A site's policy comes from its configuration file (``[policy]`` of ``site.toml``, see
:mod:`fedrad.client.site`) and its SuperNode's ``--node-config``; when both set a rule, the stricter wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fedrad.common.messages import REQUESTS

DEFAULT_MIN_CELL_SIZE = 10

#: keys of the [policy] table / node config, with what they mean (for error messages and docs)
POLICY_KEYS = {
    "min-cell-size": "smallest group the site describes (integer >= 2; default 10)",
    "min-events": "smallest number of events / smaller-class patients a model fit's sums, or patients of a "
                  "categorical covariate level ComBat's sums, may involve (integer >= 0; default 0: sums over "
                  ">= min-cell-size patients are answered)",
    "allowed-requests": "request types the site answers (list, or comma-separated string; default: all)",
    "approved-plans": "plan ids the site answers (list; default: every plan approved with fedrad site approve)",
}


class PolicyRefusal(PermissionError):
    """The site refuses a request under its policy. ``code`` names the rule in the reply; the message (which
    may hold counts) goes to the site's local log only."""

    def __init__(self, message: str, code: str = "policy"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SitePolicy:
    min_cell_size: int = DEFAULT_MIN_CELL_SIZE
    allowed_requests: frozenset[str] = field(default_factory=lambda: frozenset(REQUESTS))
    min_events: int = 0

    def __post_init__(self):
        if self.min_cell_size < 2:
            raise ValueError(f"min_cell_size must be at least 2, got {self.min_cell_size}")
        if self.min_events < 0:
            raise ValueError(f"min_events must be at least 0, got {self.min_events}")
        unknown = set(self.allowed_requests) - set(REQUESTS)
        if unknown:
            raise ValueError(f"unknown request type(s) in allow-list: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(REQUESTS)}")

    def check_allowed(self, site: str, request: str) -> None:
        """Raise for a request type outside the allow-list (:meth:`Site.answer` prefixes the site's name)."""
        if request not in self.allowed_requests:
            raise PolicyRefusal(f"refuses {request!r} requests (not in its allow-list)", code="not-allowed")

    def check_events(self, n_events: int, what: str) -> None:
        """Refuse a model / selection sum over rows with fewer than ``min_events`` events (opt-in rule)."""
        if n_events < self.min_events:
            raise PolicyRefusal(f"{n_events} {what}, fewer than the site's min-events {self.min_events} "
                                f"(its policy refuses model sums over so few events)", code="min-events")

    def stricter(self, other: "SitePolicy") -> "SitePolicy":
        """The policy that obeys both: larger minimums, the intersection of the allow-lists."""
        return SitePolicy(min_cell_size=max(self.min_cell_size, other.min_cell_size),
                          allowed_requests=self.allowed_requests & other.allowed_requests,
                          min_events=max(self.min_events, other.min_events))

    @classmethod
    def from_mapping(cls, cfg: dict, where: str = "--node-config") -> "SitePolicy":
        """Read ``min-cell-size``, ``min-events`` and ``allowed-requests`` (a list or a comma-separated string)
        from a node config or a ``[policy]`` table; other keys are ignored here."""
        kwargs = {}
        try:
            if "min-cell-size" in cfg:
                kwargs["min_cell_size"] = int(cfg["min-cell-size"])
            if "min-events" in cfg:
                kwargs["min_events"] = int(cfg["min-events"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: min-cell-size and min-events must be integers ({exc})") from None
        allowed = cfg.get("allowed-requests")
        if allowed:
            items = allowed if isinstance(allowed, (list, tuple)) else str(allowed).split(",")
            kwargs["allowed_requests"] = frozenset(str(r).strip() for r in items if str(r).strip())
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_node_config(cls, cfg: dict) -> "SitePolicy":
        return cls.from_mapping(cfg)

    def describe(self) -> str:
        allowed = ("all request types" if self.allowed_requests == frozenset(REQUESTS)
                   else ", ".join(sorted(self.allowed_requests)) or "no request type")
        events = (f"model sums need >= {self.min_events} events" if self.min_events
                  else "model sums answered over >= min cell size patients whatever their event count")
        return f"min cell size {self.min_cell_size}; {events}; answers {allowed}"
