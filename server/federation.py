"""The coordinator's view of the sites: ``ask`` one question of every site over a Flower ``Grid``.

A phase is one round trip: the coordinator sends every site the same request type (the payload may differ per
site, e.g. per validation fold), each site answers from its own rows, the coordinator combines. :class:`Federation`
wraps any Flower ``Grid`` — the deployment runtime's, the simulation engine's, or :class:`LocalGrid` (a Ray-free
in-process harness for tests and single-machine CLI runs) — so the same study code runs on all of them.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedrad.common.messages import from_record, message_type, to_record


_SITE_PREFIX = re.compile(r"^site (.+?): (.*)$", re.S)


class SiteError(RuntimeError):
    """One or more sites failed or refused a request; ``failures`` maps site (or node) to its reason."""

    def __init__(self, request: str, failures: dict[str, str]):
        self.request = request
        self.failures = failures
        shown = "; ".join(f"{site}: {reason}" for site, reason in failures.items())
        n = len(self.sites()) or len(failures)  # "study" / "federation" entries say why, they are no site
        super().__init__(f"{request}: {n} site(s) failed: {shown}")

    def sites(self) -> dict[str, str]:
        """The failures of sites only (without the coordinator's own ``study`` / ``federation`` entries)."""
        return {s: r for s, r in self.failures.items() if s not in NOT_SITES}


#: keys of :attr:`SiteError.failures` that are the coordinator's own reasons, not sites
NOT_SITES = ("study", "federation")


#: what a site's refusal of a plan it did not approve says (fedrad.client.site.PUBLIC_ERRORS["plan-not-approved"])
NOT_APPROVED = "does not belong to a study plan this site approved"
#: the next step when sites refuse a plan they did not approve
APPROVE_STEP = "ask each site to run `fedrad site approve study.toml --config site.toml`, then run the study again"


def failure_line(exc: SiteError, plan_id: str | None = None) -> str:
    """One line for a failed federation: which sites failed and why, the coordinator's own reason (quorum lost,
    sites not connected) and, when sites refused the plan as not approved, the plan id and how to approve it."""
    sites = exc.sites()
    own = [r for s, r in exc.failures.items() if s in NOT_SITES]
    refused = sorted(s for s, r in sites.items() if NOT_APPROVED in r)
    if refused:
        plan = f"study plan {plan_id[:12]}" if plan_id else "this study plan"
        parts = [f"{', '.join(refused)} refused {plan}: not the plan {'it' if len(refused) == 1 else 'they'} "
                 "approved (study.toml changed since, or not approved yet)"]
        others = [f"{s}: {r}" for s, r in sorted(sites.items()) if s not in refused]
        # every site refused: that the quorum is lost as well says nothing more
        return "; ".join(parts + others + (own if others else [])) + f"; {APPROVE_STEP}"
    if not sites:
        return "; ".join(own) or str(exc)
    shown = "; ".join(f"{s}: {r}" for s, r in sites.items())
    return f"{len(sites)} site(s) failed during {exc.request}: " + "; ".join([shown, *own])


#: what the SuperLink itself replies (``src_node_id`` 1, code 5) for a message whose site is gone: it missed its
#: heartbeats, or it was stopped and unregistered (Flower gives the same code for both)
SITE_DOWN = ("its SuperNode stopped sending heartbeats or was stopped (crashed, shut down, or cut off from the "
             "coordinator) [Flower NODE_UNAVAILABLE]")


def _error_reason(error) -> str:
    return SITE_DOWN if error.code == ErrorCode.NODE_UNAVAILABLE else _short_reason(error.reason)


def _short_reason(reason: str) -> str:
    """Flower wraps a raised exception as ``"<class 'X'>:<'message'>"``; keep the message."""
    if reason.startswith("<class") and ":<" in reason:
        inner = reason.split(":<", 1)[1].rstrip(">")
        return inner.strip("'\"")
    return reason


class Federation:
    """Ask every site a question and collect aggregates, counting round trips.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    signer : fedrad.common.signing.Signer, optional
        The coordinator's key: each message then carries a signature over the plan id, request type, destination
        node, session, round and payload hash, which a site whose approved plan names the key requires.
    timeout : float
        Seconds to wait for all replies of one round trip.
    log : callable, optional
        Receives one progress line per round trip (phase, round, sites answered).
    max_concurrent : int, default 0
        At most this many sites are asked at once within a round trip (0: all at once). Only for many
        SuperNodes sharing one small machine (loopback load checks): Flower 1.42 gives a SuperNode's
        ``flwr-clientapp`` process 30 s from claiming a message to activating its task token; 20 of them
        starting together on 2 cores miss it, are restarted, and the machine spirals. Hospitals each run
        their own machine and need no limit.
    """

    def __init__(self, grid, timeout: float = 600.0, log: Callable[[str], None] | None = None,
                 max_concurrent: int = 0, signer=None):
        from fedrad.common.signing import new_session

        self.grid = grid
        self.timeout = timeout
        self.max_concurrent = max(0, int(max_concurrent))
        self.log = log or (lambda line: None)
        self.rounds = 0
        self.node_of_site: dict[str, int] = {}
        self.excluded: set[str] = set()  # sites left out (e.g. lost mid-study): never asked again
        #: one entry per round trip: round, request, phase, sites asked, answered and failed (with reasons), seconds
        self.history: list[dict] = []
        #: id of the study plan every request belongs to (fedrad.common.plan); sites answer only approved plans
        self.plan_id: str | None = None
        #: the coordinator's signing key (:class:`fedrad.common.signing.Signer`): every request is signed with it
        self.signer = signer
        #: random id of this federation's requests: a site answers each (session, round) at most once
        self.session = new_session()

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def active_node_ids(self) -> list[int]:
        """Connected nodes, without those of sites left out (``excluded``): whom a round trip asks."""
        dropped = {self.node_of_site[s] for s in self.excluded if s in self.node_of_site}
        return [n for n in self.node_ids() if n not in dropped]

    def registered_names(self) -> dict[int, str]:
        """Node id -> the name the coordinator registered the site's key under (``fedrad coordinator
        register-site --name``; Flower's node info, with node authentication only) of the connected nodes."""
        try:
            return {int(n.node_id): str(n.name) for n in self.grid.get_nodes() if getattr(n, "name", "")}
        except Exception:  # a Grid without node info (in-process, simulation, older Flower): names from replies
            return {}

    def connected_line(self, n: int, expected: list[str] | None = None) -> str:
        """``K of N connected`` with, when the sites' registered names are known, the missing ones named."""
        nodes = self.node_ids()
        line = f"{len(nodes)} of {n} connected"
        names = self.registered_names()
        if expected and names:
            missing = [s for s in expected if s not in set(names.values())]
            if missing:
                line += f" ({', '.join(missing)} missing)"
        return line

    def wait_for_sites(self, n: int, timeout: float = 120.0, expected: list[str] | None = None,
                       every: float = 15.0) -> list[int]:
        """Wait until ``n`` sites are connected; a progress line ``waiting for sites: K of N connected (...)``
        whenever the count changes and every ``every`` s. ``expected``: the sites the plan names (``[sites]``),
        so that the line can name the missing ones. Raises :class:`SiteError` (request ``connect``) after
        ``timeout`` s, naming how many connected."""
        deadline = time.monotonic() + timeout
        said, said_at = None, 0.0
        while True:
            nodes = self.node_ids()
            if len(nodes) >= n:
                return nodes
            if len(nodes) != said or time.monotonic() - said_at >= every:
                self.log(f"waiting for sites: {self.connected_line(n, expected)}")
                said, said_at = len(nodes), time.monotonic()
            if time.monotonic() > deadline:
                raise SiteError("connect", {"federation": f"only {self.connected_line(n, expected)} after "
                                                          f"{timeout:.0f} s: start `fedrad site join` at the "
                                                          "missing sites, then run the study again"})
            time.sleep(0.5)

    def check_site_names(self, expected: list[str]) -> None:
        """Every site the plan names (``[sites]``) must be a connected site, when the registered names are known
        (node authentication): a misspelt name fails here, before any site is asked."""
        names = sorted(set(self.registered_names().values()))
        unknown = [s for s in expected if s not in names]
        if names and unknown:
            what = "site named " + unknown[0] if len(unknown) == 1 else "sites named " + ", ".join(unknown)
            raise SiteError("connect", {"federation": f"no {what} is connected (connected: {', '.join(names)}); "
                                                      "check [sites] in study.toml"})

    def ask(self, request: str, payload: dict | None = None, *, per_site: dict[str, dict] | None = None,
            phase: str = "") -> dict[str, dict]:
        """One round trip: send ``request`` to every site; return ``{site name: reply payload}``.

        ``per_site`` gives a payload per site name (sites must have answered an earlier round so that their
        node is known); otherwise every site gets ``payload``. Raises :class:`SiteError` naming every site that
        failed, refused or did not answer in time.
        """
        mtype = message_type(request)
        if self.plan_id is not None:
            payload = {**(payload or {}), "plan": self.plan_id}
            per_site = None if per_site is None else {s: {**p, "plan": self.plan_id} for s, p in per_site.items()}
        if per_site is not None:
            unknown = [s for s in per_site if s not in self.node_of_site]
            if unknown:
                raise ValueError(f"no node known for site(s) {', '.join(unknown)}")
            targets = {self.node_of_site[s]: per_site[s] for s in per_site}
        else:
            targets = {n: payload or {} for n in self.active_node_ids()}
        if not targets:
            raise SiteError(request, {"federation": "no site is connected"})
        self.rounds += 1
        group = f"{phase or request}-{self.rounds}"
        msgs = [Message(self._record(request, n, p), dst_node_id=n, message_type=mtype, group_id=group)
                for n, p in targets.items()]
        t0 = time.monotonic()
        self.log(f"round {self.rounds} ({phase or request}): asking {len(msgs)} sites")
        w = self.max_concurrent or len(msgs)
        replies = []
        for i in range(0, len(msgs), w):  # waves only with max_concurrent (see the class docstring)
            replies.extend(self.grid.send_and_receive(msgs[i:i + w], timeout=self.timeout))
        node_by_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        site_by_node = {v: k for k, v in self.node_of_site.items()}
        ok: dict[str, dict] = {}
        failed: dict[str, str] = {}
        answered: set[int] = set()
        for r in replies:
            node = node_by_msg.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            name = site_by_node.get(node, f"node {node}")
            if r.has_error():  # a site's refusal, or the SuperLink's reply for a site that is down
                reason = _error_reason(r.error)
                named = _SITE_PREFIX.match(reason)  # site agents start their errors with "site NAME: "
                if named:
                    name, reason = named.group(1), named.group(2)
                    self.node_of_site.setdefault(name, node)
                failed[name] = reason
                continue
            content = from_record(r.content)
            name = str(content.get("site", name))
            self.node_of_site[name] = node
            ok[name] = content
        for node in set(targets) - answered:
            failed[site_by_node.get(node, f"node {node}")] = f"no reply within {self.timeout:.0f} s"
        site_by_node = {v: k for k, v in self.node_of_site.items()}
        self.history.append({"round": self.rounds, "request": request, "phase": phase,
                             "asked": sorted(site_by_node.get(n, f"node {n}") for n in targets),
                             "answered": sorted(ok), "failed": dict(sorted(failed.items())),
                             "seconds": round(time.monotonic() - t0, 3)})
        self.log(f"round {self.rounds} ({phase or request}): {len(ok)} of {len(targets)} sites answered "
                 f"in {time.monotonic() - t0:.1f} s")
        if failed:
            raise SiteError(request, failed)
        return dict(sorted(ok.items()))  # by site name, not arrival: sums are then the same to the last bit


    def _record(self, request: str, node: int, payload: dict):
        """The message content for ``node``: the encoded payload and, with a signer, its signature."""
        record = to_record(payload)
        if self.signer is not None:
            from fedrad.common.messages import attach_signature, payload_digest
            from fedrad.common.signing import signed_fields

            fields = signed_fields(str(payload.get("plan") or ""), request, node, self.session, self.rounds,
                                   payload_digest(record))
            attach_signature(record, self.signer.sign(fields), self.session, self.rounds)
        return record


class LocalGrid(Grid):
    """A Ray-free, in-process Flower ``Grid``: each message is handed to ``client_app(message, context)``.

    Every site has its own persistent ``Context`` (``node_config`` as a SuperNode would have it, ``state``
    kept across messages as on a SuperNode). Messages are deflated to bytes and inflated again in both
    directions, as on the wire, so a payload that would not survive Flower's serialization fails here too.
    A handler exception becomes an error reply (code 2, CLIENT_APP_RAISED_EXCEPTION) as on a SuperNode.
    """

    def __init__(self, client_app, node_configs: Iterable[dict], run_config: dict | None = None, run_id: int = 1):
        self.client_app = client_app
        self.run_id = run_id
        self._contexts = {}
        for i, cfg in enumerate(node_configs):
            node_id = 1000 + i
            self._contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=dict(cfg),
                                              state=RecordDict(), run_config=dict(run_config or {}))
        self._inbox: dict[str, object] = {}
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    # --- Grid API -------------------------------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        self.run_id = run.run_id

    @property
    def run(self):
        return Run.create_empty(self.run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._deliver(self._inbox.pop(mid)) for mid in list(message_ids) if mid in self._inbox]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))

    # --- delivery -------------------------------------------------------------------------------------------
    def _deliver(self, msg):
        wire = _wire_copy(msg)
        node = msg.metadata.dst_node_id
        context = self._contexts[node]
        TaskIdentity.node_id = node
        try:
            reply = self.client_app(wire, context)
        except Exception as exc:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"<class '{exc.__class__.__name__}'>:<'{exc}'>"), reply_to=wire)
        finally:
            TaskIdentity.node_id = 1
        reply = _wire_copy(reply)
        reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def _wire_copy(msg):
    """Serialize and deserialize a Message the way Flower ships it (object tree -> bytes -> objects)."""
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    copy = inflate_object_from_contents(msg.object_id, contents)
    copy.metadata.__dict__.update({k: v for k, v in msg.metadata.__dict__.items()})
    return copy



#: the longest pause between two pulls of a round's replies
MAX_POLL = 0.5


def poll_delay(base: float, elapsed: float) -> float:
    """Pause before the next pull, ``elapsed`` s into a round: a tenth of the time waited so far (so a reply
    waits at most ~10 % of the round for its pull), at least ``base``, at most MAX_POLL."""
    return max(base, min(MAX_POLL, 0.1 * elapsed))


class FastGrid(Grid):
    """Wrap a deployment ``Grid`` so ``send_and_receive`` polls every ``poll_interval`` s instead of Flower's
    hard-coded 3 s (public API only: push once, then ``pull_messages``; FLOWER-LATENCY.md §3.1)."""

    def __init__(self, inner: Grid, poll_interval: float = 0.05):
        self._inner, self._poll = inner, poll_interval

    def set_run(self, run):
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages):
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._inner.pull_messages(message_ids)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        """Push once, then pull every ``poll_interval`` s, backing off to :data:`MAX_POLL` s as the round goes
        on (each pull costs the SuperLink and this process CPU: a 30-s extraction round polled every 0.05 s
        takes 600 requests from the sites' share of a small machine)."""
        pending = {m for m in self._inner.push_messages(messages) if m}
        start = time.monotonic()
        end = None if timeout is None else start + timeout
        replies = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self._inner.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if pending:
                time.sleep(poll_delay(self._poll, time.monotonic() - start))
        return replies


def fast_object_pulls(initial_backoff: float = 0.02, backoff_cap: float = 0.5) -> bool:
    """Shorten the ServerApp's 1 s object-pull back-off (FLOWER-LATENCY.md §3.2) — Flower 1.42.0 only.

    Relies on the module-level name ``flwr.superlink.grid.http_grid.pull_objects``; on any other Flower
    version it does nothing and returns False (stock behaviour).
    """
    import functools

    import flwr

    if getattr(flwr, "__version__", "") != "1.42.0":
        return False
    try:
        import flwr.superlink.grid.http_grid as http_grid
        from flwr.supercore.inflatable.inflatable_utils import pull_objects
    except ImportError:
        return False
    if not hasattr(http_grid, "pull_objects"):
        return False
    http_grid.pull_objects = functools.partial(pull_objects, initial_backoff=initial_backoff,
                                               backoff_cap=backoff_cap)
    return True
