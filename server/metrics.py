"""Prometheus metrics, vLLM's names with the `lln:` prefix, label `model_name`.

Request histograms and token counters are fed by the API as outputs stream out; gauges (queue,
slots, state memory, the KV cache a softmax model would hold, live context lengths, prefix
cache) are read from the engine at scrape time. One registry per app: no global state.
"""

from __future__ import annotations

import bisect

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lln_core.state import kv_cache_bytes
from server.engine import LLMEngine, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
TOKEN_BUCKETS = tuple(2**i for i in range(21))  # 1 .. 1M tokens
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


OTHER_TENANTS = "other"  # the label of tenants past the cardinality cap


class Metrics:
    def __init__(self, engine: LLMEngine, model_name: str, max_tenant_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = histogram(
            "lln:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self.itl = histogram(
            "lln:inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "lln:e2e_request_latency_seconds", "Arrival to finish, per choice.", LATENCY_BUCKETS
        )
        self.queue = histogram(
            "lln:request_queue_time_seconds", "Arrival to getting a slot.", LATENCY_BUCKETS
        )
        self.prompt_len = histogram(
            "lln:request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS
        )
        self.gen_len = histogram(
            "lln:request_generation_tokens", "Generated tokens per choice.", TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter(
            "lln:prompt_tokens", "Prompt tokens of finished choices.", labels, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "lln:generation_tokens", "Generated tokens.", labels, registry=reg
        ).labels(model_name)
        self.finished = Counter(
            "lln:request_success",
            "Finished choices by reason (stop, length, abort, error).",
            [*labels, "finished_reason"],
            registry=reg,
        )
        self.store_latency = Histogram(
            "lln:state_store_operation_seconds",
            "State store operations: load (lock + read + decode), save (encode + write + swap), "
            "prefix_load, prefix_save.",
            [*labels, "operation"],
            buckets=STORE_BUCKETS,
            registry=reg,
        )
        engine.sessions.observe = lambda op, seconds: self.store_latency.labels(
            model_name, op
        ).observe(seconds)
        self.tenants = TenantMetrics(reg, model_name, max_tenant_labels)
        reg.register(EngineCollector(engine, model_name))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self._last_token: dict[tuple[str, int], float] = {}

    def observe(self, out: RequestOutput) -> None:
        """Account one engine output (called for every output the API receives)."""
        key = (out.request_id, out.index)
        m = out.metrics
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            previous = self._last_token.get(key)
            if previous is None:
                self.ttft.observe(out.emitted - m.arrival)
                if m.scheduled is not None:
                    self.queue.observe(m.scheduled - m.arrival)
            else:
                self.itl.observe(out.emitted - previous)
            self._last_token[key] = out.emitted
        if out.finished:
            self._last_token.pop(key, None)
            self.e2e.observe(out.emitted - m.arrival)
            self.finished.labels(self.model_name, out.finish_reason or "error").inc()
            self.prompt_tokens.inc(out.num_prompt_tokens)
            self.gen_len.observe(out.num_output_tokens)
            if out.index == 0:
                self.prompt_len.observe(out.num_prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TenantMetrics:
    """Per-tenant counters (label `tenant`): requests admitted, prompt and generated tokens,
    requests refused by a rate limit (label `limit`: requests or tokens). The first
    `max_labels` tenants seen get their own label, the rest share `other`, so a keys file of
    any size cannot blow up the series count."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_labels: int) -> None:
        self.model_name, self.max_labels = model_name, max_labels
        self._labels: set[str] = set()
        labels = ["model_name", "tenant"]
        self._requests = Counter("lln:tenant_requests", "Requests admitted, per tenant.",
                                 labels, registry=registry)  # fmt: skip
        self._prompt = Counter("lln:tenant_prompt_tokens", "Prompt tokens admitted, per tenant.",
                               labels, registry=registry)  # fmt: skip
        self._generated = Counter("lln:tenant_generation_tokens", "Generated tokens, per tenant.",
                                  labels, registry=registry)  # fmt: skip
        self._limited = Counter("lln:tenant_rate_limited", "Requests refused with 429, per "
                                "tenant and limit (requests, tokens).", [*labels, "limit"],
                                registry=registry)  # fmt: skip

    def label(self, tenant: str) -> str:
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self.max_labels:
            self._labels.add(tenant)
            return tenant
        return OTHER_TENANTS

    def request(self, tenant: str, prompt_tokens: int) -> None:
        label = self.label(tenant)
        self._requests.labels(self.model_name, label).inc()
        self._prompt.labels(self.model_name, label).inc(prompt_tokens)

    def generated(self, tenant: str, num_tokens: int) -> None:
        if num_tokens:
            self._generated.labels(self.model_name, self.label(tenant)).inc(num_tokens)

    def rate_limited(self, tenant: str, limit: str) -> None:
        self._limited.labels(self.model_name, self.label(tenant), limit).inc()


class EngineCollector:
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        config = engine.model.config
        self._kv_shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)

    def collect(self):
        engine, name = self.engine, [self.model_name]
        pool = engine.pool
        contexts = engine.live_context_lengths()
        gauges = [
            ("lln:num_requests_running", "Sequences holding a slot.", engine.num_running),
            ("lln:num_requests_waiting", "Requests waiting for a slot.", engine.num_waiting),
            ("lln:state_slots_used", "State slots in use.", pool.num_used),
            ("lln:state_slots_allocated", "State slots allocated at start.", pool.num_slots),
            ("lln:state_bytes_per_sequence", "Bytes of one sequence's state, at any context "
             "length.", pool.bytes_per_slot),
            ("lln:state_bytes_in_use", "State bytes held by live sequences.", pool.bytes_in_use),
            ("lln:state_bytes_allocated", "State bytes allocated at start.", pool.total_bytes),
            ("lln:kv_cache_equivalent_bytes", "KV cache a softmax model of the same shape would "
             "hold for the live contexts (bf16): the memory saved.", self._kv_bytes(contexts)),
            ("lln:prefix_cache_bytes", "Bytes of cached prefix states.",
             engine.prefix_cache.bytes_used),
            ("lln:session_states", "Saved sessions (in Redis: all replicas', counted every "
             "10 s).", engine.sessions.num_sessions),
            ("lln:session_bytes", "Bytes of saved session states.", engine.sessions.bytes_used),
            ("lln:state_store_up", "1 while the state store is reachable (always 1 in process).",
             int(engine.sessions.is_available)),
        ]  # fmt: skip
        if torch.cuda.is_available():
            gauges += [
                ("lln:gpu_memory_allocated_bytes", "torch.cuda.memory_allocated().",
                 torch.cuda.memory_allocated()),
                ("lln:gpu_memory_reserved_bytes", "torch.cuda.memory_reserved().",
                 torch.cuda.memory_reserved()),
            ]  # fmt: skip
        for metric, doc, value in gauges:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(name, value)
            yield family
        cache = engine.prefix_cache
        for metric, doc, value in (
            ("lln:prefix_cache_queries", "Prefix-cache lookups.", cache.queries),
            ("lln:prefix_cache_hits", "Prefix-cache lookups that restored a state.", cache.hits),
            ("lln:session_evictions", "Sessions evicted.", engine.sessions.evictions),
            ("lln:prefill_computed_tokens", "Prompt tokens computed by prefill (prefix-cache "
             "and session hits excluded).", engine.num_prefill_tokens),
        ):  # fmt: skip
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(name, value)
            yield family
        yield self._context_histogram(contexts)

    def _kv_bytes(self, contexts: list[int]) -> int:
        layers, heads, dim = self._kv_shape
        return sum(kv_cache_bytes(c, layers, heads, dim, bytes_per_elem=2) for c in contexts)

    def _context_histogram(self, contexts: list[int]) -> HistogramMetricFamily:
        counts = [0] * (len(TOKEN_BUCKETS) + 1)
        for c in contexts:
            counts[bisect.bisect_left(TOKEN_BUCKETS, c)] += 1
        cumulative, total = [], 0
        for bound, count in zip([*map(str, TOKEN_BUCKETS), "+Inf"], counts, strict=True):
            total += count
            cumulative.append((bound, total))
        family = HistogramMetricFamily(
            "lln:live_context_length_tokens",
            "Context length (tokens in the state) of live sequences, at scrape time.",
            labels=["model_name"],
        )
        family.add_metric([self.model_name], cumulative, sum_value=sum(contexts))
        return family
