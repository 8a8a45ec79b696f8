"""Coordinator side of the privacy options, on Flower: SecAgg+ sums for the exact logistic fit, and the DP
strategy wrapper + accountant for FedAvg. The math is in :mod:`fedrad.common.privacy`; see docs/PRIVACY.md.

Secure aggregation (:func:`secure_logistic_fit`)
    Each round of :class:`~fedrad.common.privacy.SecureLogisticServer` is one run of Flower's
    ``SecAggPlusWorkflow`` (4 message round trips: setup, share keys, collect masked vectors, unmask) driven with
    a minimal *legacy* strategy (:class:`_SecureSumStrategy`), as Flower 1.42 has no Message-API SecAgg
    (FLOWER.md §6). The request travels in the legacy ``FitIns`` config; sites answer in the default ``train``
    handler through ``secaggplus_mod`` (``fedrad.client.client_app``). Parameters: ``num_shares`` odd and
    above the number of sites, reconstruction threshold = number of sites (every site must contribute, else the
    coordinator cannot unmask anything), ``clipping_range=1``, ``quantization_range=2**h``, weight 1 per site,
    ``max_weight=1``: the mod's quantisation is then the identity on fedrad's integer digits.

Differential privacy (:func:`dp_strategy`)
    Flower's ``DifferentialPrivacyClientSideFixedClipping`` around ``FedAvg``/``FedProx`` weighted equally per
    site (the noise calibration assumes it), with :class:`GaussianAccountant` (Flower's ``PrivacyAccountant``
    protocol, exact Gaussian-DP composition; Flower's own ``RdpAccountant`` needs the optional
    ``dp-accounting`` package and gives a looser ε).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fedrad.common.messages import to_record
from fedrad.common.privacy import (
    SecureAggregationError,
    SecureLogisticServer,
    decode_sums,
    digit_sums_from_mean,
    gaussian_epsilon,
    layout_size,
    secagg_shares,
)
from fedrad.server.federation import _SITE_PREFIX, Federation, SiteError, _short_reason

#: Request name of a secure fit round (site allow-list / audit log).
SECURE_REQUEST = "secure_fit_round"
#: Stages of one SecAgg+ run = message round trips.
SECAGG_STAGES = 4


# ---------------------------------------------------------------------------------------------------------------
# SecAgg+ sums
# ---------------------------------------------------------------------------------------------------------------
class _WatchGrid:
    """Wraps the federation's grid for one SecAgg+ run: remembers every reply the coordinator received (tests
    inspect them) and which node answered with an error."""

    def __init__(self, inner):
        self._inner = inner
        self.received: list = []
        self.errors: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        node_by_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for r in replies:
            self.received.append(r)
            if r.has_error():
                node = node_by_msg.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
                self.errors[node] = _short_reason(r.error.reason)
        answered = {node_by_msg.get(r.metadata.reply_to_message_id) for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered and m.metadata.dst_node_id not in self.errors:
                self.errors[m.metadata.dst_node_id] = "no reply in time"
        return replies


def _secure_strategy_class():
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.strategy import Strategy

    class _SecureSumStrategy(Strategy):
        """Legacy strategy for one SecAgg+ sum: the same FitIns (the fedrad request) to every site; keeps the
        aggregate Flower's workflow computed (the weight-1 mean of the digit vectors)."""

        def __init__(self, config: dict):
            self.config = config
            self.results = None
            self.failures = None
            self.mean = None

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            ins = FitIns(ndarrays_to_parameters([]), dict(self.config))
            return [(proxy, ins) for proxy in client_manager.all().values()]

        def aggregate_fit(self, server_round, results, failures):
            from flwr.common import parameters_to_ndarrays

            self.results, self.failures = list(results), list(failures)
            if results and not failures:
                arrays = parameters_to_ndarrays(results[0][1].parameters)
                self.mean = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return _SecureSumStrategy


@dataclass
class SecureRound:
    """What one SecAgg+ run gave the coordinator: the digit sums and everything it received (for tests)."""

    digit_sums: np.ndarray
    sites: list[str]
    received: list = field(default_factory=list)
    seconds: float = 0.0


def secure_sum(fed: Federation, request: dict, data: dict, *, phase: str = "secure") -> SecureRound:
    """One SecAgg+ run: every site encodes its sums for ``request`` and the coordinator gets their integer sum.

    Raises :class:`SiteError` naming each site that refused or did not answer (nothing is unmasked then: the
    reconstruction threshold is the number of sites).
    """
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.compat.common import recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    nodes = fed.active_node_ids()
    k = len(nodes)
    if k != int(request["n_sites"]):
        raise SiteError(SECURE_REQUEST, {"federation": f"{k} sites connected, the secure fit was set up for "
                                                       f"{request['n_sites']}"})
    bits = int(request["bits"])
    meta = to_record({"request": request, "data": data, "plan": fed.plan_id})["meta"]
    strategy = _secure_strategy_class()(dict(meta))
    watch = _WatchGrid(fed.grid)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=watch, run_id=fed.grid.run.run_id))
    base = Context(run_id=fed.grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=base, config=ServerConfig(num_rounds=1), strategy=strategy,
                           client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: fed.rounds + 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), keep_input=True)
    workflow = SecAggPlusWorkflow(num_shares=secagg_shares(k), reconstruction_threshold=k, max_weight=1.0,
                                  clipping_range=1.0, quantization_range=2 ** bits, modulus_range=2 ** 32,
                                  timeout=fed.timeout)
    t0 = time.monotonic()
    fed.log(f"round {fed.rounds + 1}-{fed.rounds + SECAGG_STAGES} ({phase}): SecAgg+ sum over {k} sites")
    workflow(watch, legacy)
    fed.rounds += SECAGG_STAGES
    site_by_node = {v: s for s, v in fed.node_of_site.items()}
    for _proxy, res in strategy.results or []:
        name = res.metrics.get("site")
        if isinstance(name, str):
            fed.node_of_site[name] = _proxy.node_id
            site_by_node[_proxy.node_id] = name
    failed: dict[str, str] = {}
    for node, reason in watch.errors.items():
        named = _SITE_PREFIX.match(reason)
        if named:
            failed[named.group(1)] = named.group(2)
            fed.node_of_site.setdefault(named.group(1), node)
        else:
            failed[site_by_node.get(node, f"node {node}")] = reason
    if failed:
        raise SiteError(SECURE_REQUEST, failed)
    if strategy.mean is None or len(strategy.results or []) != k:
        got = len(strategy.results or [])
        raise SiteError(SECURE_REQUEST, {"federation": f"secure aggregation halted: {got} of {k} sites' masked "
                                                       "sums could be unmasked"})
    if strategy.mean.size != layout_size(request["layout"]):
        raise SecureAggregationError(f"the secure sum has {strategy.mean.size} values, expected "
                                     f"{layout_size(request['layout'])}")
    sums = digit_sums_from_mean(strategy.mean, k, bits)
    sites = sorted(site_by_node.get(n, f"node {n}") for n in nodes)
    fed.log(f"round {fed.rounds} ({phase}): secure sum of {k} sites in {time.monotonic() - t0:.2f} s")
    return SecureRound(digit_sums=sums, sites=sites, received=watch.received, seconds=time.monotonic() - t0)


def secure_logistic_fit(fed: Federation, features: list[str], data: dict, *, penalty: str | None = "l2",
                        C: float = 1.0, l1_ratio: float | None = None, tol: float = 1e-8, max_rounds: int = 30,
                        keep: list | None = None):
    """Exact federated logistic fit whose every round is a SecAgg+ sum; returns (model, info).

    ``data`` is the site-side data spec of a fit task (``model``, ``features``, ``outcome``, optional
    ``table``/``rows``). ``keep``, if given, receives each round's :class:`SecureRound` (tests).
    """
    nodes = fed.active_node_ids()
    server = SecureLogisticServer(features, len(nodes), penalty=penalty, C=C, l1_ratio=l1_ratio, tol=tol,
                                  max_rounds=max_rounds)
    request = server.start()
    t0, msg_rounds = time.monotonic(), fed.rounds
    sites: list[str] = []
    while request is not None:
        rnd = secure_sum(fed, request, data, phase=f"secure {request['stage']}")
        sites = rnd.sites
        if keep is not None:
            keep.append((request, rnd))
        request = server.receive(decode_sums(rnd.digit_sums, request["layout"], request["bits"], len(nodes)))
    model = server.model()
    return model, {"mode": "federated", "secure_aggregation": "SecAgg+", "round_trips": fed.rounds - msg_rounds,
                   "secure_rounds": server.round_trips, "sites": sites, "seconds": time.monotonic() - t0,
                   "n_sites": len(nodes)}


# ---------------------------------------------------------------------------------------------------------------
# Differential privacy (FedAvg path)
# ---------------------------------------------------------------------------------------------------------------
class GaussianAccountant:
    """Flower ``PrivacyAccountant`` (protocol) for un-sampled Gaussian releases: exact Gaussian-DP composition
    (:func:`fedrad.common.privacy.gaussian_epsilon`). Supports ``no-amplification`` sampling only."""

    def __init__(self, config):
        from flwr.serverapp import SamplingMethod

        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("GaussianAccountant: only sampling_method='no-amplification' (every site every round)")
        self._config = config
        self._events: list[tuple[float, int]] = []

    @property
    def config(self):
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(c for _, c in self._events)

    def _mu2(self, extra: list[tuple[float, int]] = ()) -> float:
        return sum(c / z ** 2 for z, c in [*self._events, *extra])

    def compose(self, event, count: int = 1) -> None:
        if event.population_size != self._config.population_size:
            raise ValueError(f"population_size {event.population_size} != {self._config.population_size}")
        self._events.append((float(event.noise_multiplier), int(count)))

    def get_epsilon(self, delta: float) -> float:
        mu2 = self._mu2()
        return 0.0 if mu2 == 0 else gaussian_epsilon(1.0 / np.sqrt(mu2), 1, delta)

    def get_delta(self, epsilon: float) -> float:
        from fedrad.common.privacy import gaussian_delta

        return gaussian_delta(float(np.sqrt(self._mu2())), epsilon)

    def get_privacy_spent(self, delta: float | None = None):
        from flwr.serverapp import PrivacySpent

        d = self._config.target_delta if delta is None else delta
        return PrivacySpent(epsilon=self.get_epsilon(d), delta=d, num_releases=self.num_releases,
                            accounting_method="gaussian-dp (exact composition)")

    def would_exceed(self, event, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be given in PrivacyConfig or to would_exceed()")
        mu2 = self._mu2([(float(event.noise_multiplier), int(count))])
        return gaussian_epsilon(1.0 / np.sqrt(mu2), 1, self._config.target_delta) > limit

    def state_dict(self) -> dict:
        return {"backend": "gaussian-dp", "events": [list(e) for e in self._events]}

    def load_state_dict(self, state: dict) -> None:
        self._events = [(float(z), int(c)) for z, c in state["events"]]


def dp_strategy(strategy: str, n_sites: int, *, noise_multiplier: float, clipping_norm: float, delta: float,
                max_epsilon: float | None = None, mu: float = 0.1):
    """Flower's FedAvg / FedProx (equal weight per site) wrapped in ``DifferentialPrivacyClientSideFixedClipping``
    with a :class:`GaussianAccountant`; sites clip with ``fixedclipping_mod`` (client_app)."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx

    cls = FedProx if strategy == "fedprox" else FedAvg
    kwargs = {"proximal_mu": mu} if strategy == "fedprox" else {}
    inner = cls(fraction_evaluate=0.0, min_train_nodes=n_sites, min_available_nodes=n_sites,
                weighted_by_key="site-weight", **kwargs)
    accountant = GaussianAccountant(PrivacyConfig(target_delta=delta, population_size=n_sites,
                                                  neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                  sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                                  max_epsilon=max_epsilon))
    return DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=noise_multiplier,
                                                      clipping_norm=clipping_norm, num_sampled_clients=n_sites,
                                                      accountant=accountant)
