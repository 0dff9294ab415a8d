"""Assembly: wire the picker's layers once and run them — the :class:`EmbeddedPicker`.

``start_picker(EppOptions(...))`` validates the configuration (raising :class:`InferouteError` with cause
``config`` naming the bad key), loads the endpoints, starts the metrics collector and the endpoint-source
watcher, and returns an :class:`EmbeddedPicker` implementing :class:`inferoute.picking.Picker`. The gateway
uses it in process (``epp.endpoint: embedded``) and ``inferoute epp`` serves it over ext_proc.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from inferoute.clock import Clock, SystemClock
from inferoute.endpoints import Endpoint
from inferoute.epp.config import BUILTIN_PROFILES, PickerConfig, builtin_profile_text, parse_config
from inferoute.epp.datalayer.collector import MetricsCollector
from inferoute.epp.datalayer.datastore import Datastore
from inferoute.epp.datalayer.sources import EndpointSource, FileSource, StaticSource
from inferoute.epp.flowcontrol import ConcurrencyDetector
from inferoute.epp.flowcontrol.config import FlowControlConfig
from inferoute.epp.flowcontrol.eviction import confirmation_grace
from inferoute.epp.flowcontrol.shell import FlowControl
from inferoute.epp.flowcontrol.signals import FlowControlMetrics
from inferoute.epp.flowcontrol.stages import stage_saturation
from inferoute.epp.learned import LearnedState, LocalLearnedState, PrefixIndex
from inferoute.epp.learned.approx import DEFAULT_LRU_CAPACITY
from inferoute.epp.metrics import EppMetrics
from inferoute.epp.plugin import BackgroundPlugin, PluginDeps, RequestPreparer
from inferoute.epp.requestcontrol.director import Director, Prepared
from inferoute.epp.scheduling.disagg_metrics import DisaggMetrics
from inferoute.epp.scheduling.shadow import ShadowMetrics
from inferoute.epp.sync.inflight import SyncedLearnedState
from inferoute.epp.sync.options import SyncOptions
from inferoute.errors import ConfigError, InferouteError, read_text_file
from inferoute.picking import Decision, PickerError, PickRequest, PickSession
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EppOptions:
    """Everything needed to start a picker. Exactly one of ``endpoints`` / ``endpoints_file`` is expected."""

    config_file: str | None = None
    """Path of an EndpointPickerConfig YAML file."""
    config_text: str | None = None
    """EndpointPickerConfig YAML text (wins over ``config_file``); both None = the GIE default."""
    endpoints: Sequence[Endpoint] | None = None
    endpoints_file: str | None = None
    """A YAML endpoints file (``endpoints: [{name, address, port, labels}]``), re-read when it changes."""
    refresh_interval: float = 0.05
    """Seconds between two scrapes of one endpoint's metrics."""
    staleness_threshold: float = 2.0
    """Metrics older than this make an endpoint ineligible (while some endpoint has fresh metrics)."""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    pool_name: str = "default"
    profile: str | None = None
    """A built-in profile name (gie-default, predicted-ttft, round-robin, random, precise) instead of a
    config."""
    scrape_timeout: float = 1.0
    endpoints_poll_interval: float = 1.0
    objectives: Mapping[str, int] = field(default_factory=dict)
    """InferenceObjective name → priority (negative = sheddable); the objective header selects one."""
    clock: Clock = field(default_factory=SystemClock)
    seed: int | None = None
    """Seed for the tie-breaking / random pickers (None: nondeterministic)."""
    learned: LearnedState | None = None
    """Shared learned state (None: a new in-process one)."""
    sync: SyncOptions | None = None
    """Share in-flight load and prefix placements with other picker replicas/workers (unless ``learned`` is
    given): the picker runs the exchange."""
    source: EndpointSource | None = None
    """A ready-made endpoint source (Kubernetes InferencePool discovery); wins over the endpoint options."""


def _config_text(opts: EppOptions) -> tuple[str | None, str]:
    if opts.config_text is not None:
        return opts.config_text, "config"
    if opts.config_file is not None:
        return read_text_file(opts.config_file, f"config file {opts.config_file}"), opts.config_file
    if opts.profile is not None:
        if opts.profile not in BUILTIN_PROFILES:
            raise ConfigError(f"profile: unknown {opts.profile!r}; valid: {', '.join(BUILTIN_PROFILES)}")
        return builtin_profile_text(opts.profile), f"profile {opts.profile}"
    return None, "config"


class EmbeddedPicker:
    """The endpoint picker in process: implements :class:`inferoute.picking.Picker`."""

    def __init__(
        self,
        opts: EppOptions,
        config: PickerConfig,
        source: EndpointSource,
        datastore: Datastore,
        learned: LearnedState,
        metrics: EppMetrics,
    ) -> None:
        self.options = opts
        self.config = config
        self.source = source
        self.datastore = datastore
        self.learned = learned
        self.metrics = metrics
        self.director = Director(
            datastore,
            config.scheduler,
            learned,
            metrics,
            opts.clock,
            prefix=config.prefix,
            saturation=config.saturation,
            objectives=opts.objectives,
            store=config.store,
            admitters=config.admitters,
            rng=random.Random(opts.seed),
        )
        self.collector = MetricsCollector(
            datastore,
            interval=opts.refresh_interval,
            timeout=opts.scrape_timeout,
            scheme=config.metrics_scheme,
            path=config.metrics_path,
            insecure_skip_verify=config.metrics_insecure,
            on_scrape=metrics.on_scrape,
        )
        self._tasks = TaskSet("epp")
        self._closed = False
        self.flow: FlowControl | None = None
        """Flow control (the ``flowControl`` feature gate); None: the legacy admission check."""
        if config.flow is not None:
            self.flow = _flow_control(config.flow, self.director, opts, metrics.registry, datastore)
        self.shadow_metrics: ShadowMetrics | None = None
        if config.scheduler.shadows:
            self.shadow_metrics = ShadowMetrics(metrics.registry)
            self.shadow_metrics.attach(config.scheduler)
        self.disagg_metrics = DisaggMetrics.for_scheduler(config.scheduler, metrics.registry)
        """``llm_d_epp_disagg_decision_total`` when the config has a disagg-profile-handler."""
        plugins = list(config.plugins.values())
        self._background = [p for p in plugins if isinstance(p, BackgroundPlugin)]
        """Plugins with work of their own (KV-event subscribers): told every change of the endpoint set."""
        self._preparer = next((p for p in plugins if isinstance(p, RequestPreparer)), None)
        """Computes the prompt's token ids before scheduling (``token-producer``), if configured."""

    async def _start(self) -> None:
        await self.collector.start()
        endpoints = self._endpoints()
        for plugin in self._background:
            await plugin.start(endpoints)
        self._tasks.spawn(self.source.watch(self._on_endpoints), name="endpoint-source")
        sync = self.options.sync
        if sync is not None and self.options.learned is None and isinstance(self.learned, SyncedLearnedState):
            self.metrics.watch(self.learned.collector(self.options.pool_name))
            self._tasks.spawn(self.learned.run(sync.interval), name="cross-replica-sync")

    def _on_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.director.set_endpoints(endpoints)
        self.collector.sync()
        endpoints = self._endpoints()
        for plugin in self._background:
            plugin.endpoints_changed(endpoints)

    def _endpoints(self) -> list[Endpoint]:
        return [s.endpoint for s in self.datastore.states.values()]

    def ready(self) -> bool:
        """Datastore synced: endpoints known and each scraped (or tried) at least once."""
        return not self._closed and self.datastore.ready()

    @property
    def decides_now(self) -> bool:
        return self.flow is None and self._preparer is None and not self._closed

    def pick_now(self, request: PickRequest) -> tuple[Decision, PickSession] | None:
        """:meth:`pick` without awaiting: flow control and token preparation need the event loop (None)."""
        if not self.decides_now:
            return None
        try:
            return self.director.decide(request)
        except InferouteError:
            raise
        except Exception as exc:
            raise _plugin_failure(exc) from exc

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        if self._closed:
            raise PickerError("picker is closed", cause="picker-closed")
        decided = self.pick_now(request)
        if decided is not None:
            return decided
        try:
            prep = self.director.prepare(request)
            if not isinstance(prep, Prepared):
                return prep
            if self._preparer is not None:
                prep.request.token_ids = await self._preparer.prepare(request.body, self._endpoints())
            if self.flow is None:
                return self.director.schedule(prep, admission=True)
            return await self.flow.pick(prep)
        except InferouteError:
            raise
        except Exception as exc:
            raise _plugin_failure(exc) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for plugin in self._background:
            await plugin.aclose()
        if self.flow is not None:
            self.flow.close()
            if self.flow.metrics is not None:
                self.flow.metrics.close()
        if self.shadow_metrics is not None:
            self.shadow_metrics.close()
        if self.disagg_metrics is not None:
            self.disagg_metrics.close()
        await self._tasks.aclose()
        await self.collector.aclose()
        self.metrics.close()


def _plugin_failure(exc: Exception) -> PickerError:
    """A bug in a plugin must not take the data plane down: logged (call it in the ``except`` block) and
    turned into a PickerError, so the data plane applies its failure mode."""
    log.exception("pick failed")
    return PickerError(f"picker failed: {exc!r}", cause="picker-internal")


def _flow_control(
    cfg: FlowControlConfig,
    director: Director,
    opts: EppOptions,
    registry: CollectorRegistry,
    datastore: Datastore,
) -> FlowControl:
    """Flow control over ``director``, with its metrics, re-run whenever fresh metrics arrive."""
    fc_metrics = FlowControlMetrics(registry, opts.pool_name)
    detector = cfg.detector
    grace = confirmation_grace(detector.type_name, opts.refresh_interval, opts.staleness_threshold)
    flow = FlowControl(cfg, director, opts.clock, fc_metrics, eviction_grace=grace)
    per_replica = (
        detector.per_endpoint_capacity()
        if isinstance(detector, ConcurrencyDetector)
        else getattr(detector, "queue_threshold", 1.0)
    )

    def state() -> tuple[int, dict[str, float], int, float]:
        now = opts.clock.now()
        pool = director.all_candidates(now)
        stages = stage_saturation(detector, pool, now)
        return len(pool), stages, detector.stale_endpoints, per_replica

    fc_metrics.watch(flow.core, state)
    datastore.add_metrics_listener(lambda _state, _fresh: flow.kick())
    return flow


async def start_picker(opts: EppOptions) -> EmbeddedPicker:
    """Validate, wire and start an :class:`EmbeddedPicker` (see module docstring)."""
    text, where = _config_text(opts)
    if opts.refresh_interval <= 0:
        raise ConfigError("refresh_interval: must be > 0 seconds")
    if opts.staleness_threshold <= 0:
        raise ConfigError("staleness_threshold: must be > 0 seconds")
    metrics = EppMetrics(opts.registry)
    index = PrefixIndex(DEFAULT_LRU_CAPACITY)
    learned: LearnedState
    if opts.learned is not None:
        learned = opts.learned
    elif opts.sync is not None:
        learned = SyncedLearnedState(opts.sync.build(), index)
    else:
        learned = LocalLearnedState(index)
    deps = PluginDeps(learned=learned, clock=opts.clock, seed=opts.seed)
    config = parse_config(text, deps=deps, observer=metrics.plugin_observer, source=where)
    if config.prefix.lru_capacity:  # the configured LRU size of the approximate store built here
        index.default_capacity = config.prefix.lru_capacity * config.prefix.block_size_tokens

    source: EndpointSource
    if opts.source is not None:
        source = opts.source
    elif opts.endpoints_file is not None:
        source = FileSource(
            opts.endpoints_file,
            poll_interval=opts.endpoints_poll_interval,
            on_error=lambda exc: metrics.endpoint_reload_errors.inc(),
        )
    elif opts.endpoints is not None:
        source = StaticSource(opts.endpoints)
    else:
        raise ConfigError("endpoints: give a static list (endpoints) or a file (endpoints_file)")
    datastore = Datastore(
        opts.clock, staleness=opts.staleness_threshold, default_engine=config.default_engine
    )
    datastore.set_endpoints(source.initial())
    metrics.watch_pool(datastore, opts.pool_name)
    picker = EmbeddedPicker(opts, config, source, datastore, learned, metrics)
    try:
        await picker._start()
    except BaseException:
        await picker.aclose()
        raise
    return picker
