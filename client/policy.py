"""A site's privacy policy: which requests it answers and the smallest group it will describe.

Defaults: every request type in :data:`fedrad.common.messages.REQUESTS` is allowed, minimum cell size 10
(no aggregate is released about fewer than 10 patients). A site can only make its policy stricter than what
the coordinator asks for: the effective minimum is ``max(site policy, request)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fedrad.common.messages import REQUESTS

DEFAULT_MIN_CELL_SIZE = 10


class PolicyRefusal(PermissionError):
    """The site refuses a request under its policy (the message names the site and the rule)."""


@dataclass(frozen=True)
class SitePolicy:
    min_cell_size: int = DEFAULT_MIN_CELL_SIZE
    allowed_requests: frozenset[str] = field(default_factory=lambda: frozenset(REQUESTS))

    def __post_init__(self):
        if self.min_cell_size < 2:
            raise ValueError(f"min_cell_size must be at least 2, got {self.min_cell_size}")
        unknown = set(self.allowed_requests) - set(REQUESTS)
        if unknown:
            raise ValueError(f"unknown request type(s) in allow-list: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(REQUESTS)}")

    def check_allowed(self, site: str, request: str) -> None:
        if request not in self.allowed_requests:
            raise PolicyRefusal(f"site {site} does not answer {request!r} requests (not in its allow-list)")

    @classmethod
    def from_node_config(cls, cfg: dict) -> "SitePolicy":
        """Read ``min-cell-size`` and ``allowed-requests`` (comma-separated) from a SuperNode's node config."""
        kwargs = {}
        if "min-cell-size" in cfg:
            kwargs["min_cell_size"] = int(cfg["min-cell-size"])
        if cfg.get("allowed-requests"):
            kwargs["allowed_requests"] = frozenset(
                r.strip() for r in str(cfg["allowed-requests"]).split(",") if r.strip())
        return cls(**kwargs)
