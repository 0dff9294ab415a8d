"""The simulator's configuration: one frozen dataclass whose fields mirror the ``inferoute sim`` flags.

Defaults resemble a 7-8B model (Llama-3.1-8B class) served by vLLM on one H100 80GB:

* KV cache: ~56 GB left for KV after weights at 0.9 memory utilisation, 128 KiB of KV per token
  (32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes) -> ~440k tokens -> 27,000 blocks of 16 tokens.
* Latency: a decode step of 10 ms plus 0.05 ms per running sequence (ITL 10 ms alone, ~23 ms at 256 running)
  plus 40 ns per token of context each decoding sequence attends to (+4 ms for 100 sequences of 1,000 tokens);
  a step that prefills pays 20 ms plus 0.08 ms per uncached prompt token (~12.5k prompt tokens/s), so a
  500-token prompt on an idle replica sees a time to first token of ~70 ms and a 1,000-token one ~110 ms
  (the llm-d simulator's reference profile for 7-8B on H100: TTFT 60-120 ms, ITL 10-15 ms).

Every duration is multiplied by ``time_scale`` (0.1 runs ten times faster).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferoute.kvevents.config import KVEventsConfig

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Configuration of every replica of a simulated pool (each replica has its own engine state)."""

    model: str = DEFAULT_MODEL
    """The served base model name (``/v1/models``, the ``model_name`` metric label)."""
    lora_adapters: tuple[str, ...] = ()
    """LoRA adapter names that requests may name in ``model``."""
    max_loras: int = 1
    """Adapters active at once (vLLM ``--max-loras``); a request for another adapter waits for a slot."""
    max_num_seqs: int = 256
    """Sequences running at once (continuous batching)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one engine step (chunked prefill: long prompts are prefilled over several steps)."""
    max_waiting: int = 1000
    """Waiting-queue length; a request arriving at a full queue gets 429."""
    max_model_len: int = 32768
    """Context length: prompt + max_tokens above this is a 400."""
    kv_cache_blocks: int = 27000
    """GPU KV-cache blocks (``num_gpu_blocks``)."""
    block_size: int = 16
    """Tokens per KV block."""
    time_scale: float = 1.0
    """Multiplies every simulated duration (0.1 = ten times faster than the modelled GPU)."""
    seed: int = 0
    """Seeds output lengths, generated text and failure injection."""
    failure_rate: float = 0.0
    """Probability (0-1) that a completion request fails at once with 500 or 503 (half each)."""

    # Latency model (seconds, before time_scale).
    step_base_s: float = 0.010
    """Fixed cost of one engine step (one decode token for every running sequence)."""
    step_per_seq_s: float = 0.00005
    """Extra step cost per sequence in the batch."""
    step_per_context_token_s: float = 0.00000004
    """Extra step cost per token of context (prompt + output so far) of each decoding sequence: reading its
    KV (128 KiB per token for Llama-3-8B at ~3.3 TB/s of HBM is ~40 ns)."""
    prefill_base_s: float = 0.020
    """Extra cost of a step that prefills any prompt tokens."""
    prefill_per_token_s: float = 0.00008
    """Cost per uncached prompt token prefilled in a step."""
    lora_load_s: float = 0.050
    """Cost of loading an adapter into a free slot (added to the step that loads it)."""

    mean_output_tokens: int = 128
    """Mean of the output-length distribution (exponential, clipped to [1, max_tokens]) used when a request
    does not set ``ignore_eos``; with ``ignore_eos`` the output is exactly ``max_tokens``."""
    allow_forced_errors: bool = False
    """Honour the ``x-sim-force-status: <code>`` request header (tests only)."""
    emit_schedule: bool = False
    """Add ``"sim_scheduled_at"`` (CLOCK_MONOTONIC seconds) to every streamed chunk (fidelity benchmark)."""
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    """vLLM's ``--kv-events-config``; when enabled, block hashes are vLLM's ``sha256_cbor`` and every engine
    step that changes the prefix cache yields a batch of KV events (published by the server shell)."""
    hash_seed: str = "0"
    """``PYTHONHASHSEED`` of the modelled vLLM: the root of the ``sha256_cbor`` block-hash chain."""
    legacy_kv_events: bool = False
    """Publish events as vLLM <= 0.23 did (tagged arrays) instead of tagged maps."""
    extra_labels: dict[str, str] = field(default_factory=dict)
    """Labels copied into each replica's :class:`~inferoute.endpoints.Endpoint`."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.model:
            problems.append("model must not be empty")
        if self.model in self.lora_adapters:
            problems.append("a LoRA adapter may not have the base model's name")
        positive_ints = (
            "max_loras",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "kv_cache_blocks",
            "block_size",
            "mean_output_tokens",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append("max_num_batched_tokens must be >= max_num_seqs (as vLLM requires)")
        if self.max_waiting < 0:
            problems.append("max_waiting must be >= 0")
        if not self.time_scale > 0:
            problems.append("time_scale must be > 0")
        if not 0.0 <= self.failure_rate <= 1.0:
            problems.append("failure_rate must be within [0, 1]")
        for name in (
            "step_base_s",
            "step_per_seq_s",
            "step_per_context_token_s",
            "prefill_base_s",
            "prefill_per_token_s",
            "lora_load_s",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise ValueError("invalid SimConfig: " + "; ".join(problems))

    @property
    def served_models(self) -> tuple[str, ...]:
        """The base model followed by the adapters."""
        return (self.model, *self.lora_adapters)
