"""The server's Prometheus metrics (GET /metrics), in a registry of its own so several servers in
one process (the tests) do not collide. Names follow the `edgecraft_` prefix and Prometheus units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# seconds; a 1M-parameter model's token takes well under a millisecond at batch 1, so the buckets
# start small, and a long queue wait shows in the top ones
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("edgecraft_requests_running", "Sequences decoding in the batch.", registry=r)
        self.waiting = Gauge("edgecraft_requests_waiting", "Sequences waiting for a free slot.", registry=r)
        self.prompt_tokens = Counter("edgecraft_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("edgecraft_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            "edgecraft_requests", "Finished requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "edgecraft_time_to_first_token_seconds", "From a request's arrival to its first token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.per_token = Histogram(
            "edgecraft_time_per_output_token_seconds", "Between a sequence's consecutive tokens.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
