"""Engine configuration: one frozen dataclass, validated; CLI flags and env vars map 1:1."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
DTYPES = ("auto", *WEIGHT_DTYPES)  # auto: by device (`EngineConfig.weight_dtype`)
GEMM_DTYPES = ("auto", "float32", "bfloat16")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class EngineConfig:
    """How one engine serves one model.

    max_num_seqs: state slots (sequences decoding at once), allocated at start.
    max_num_batched_tokens: tokens per step (decodes first, prefill chunks get the rest).
    max_waiting: requests queued beyond the slots; more are refused before any work.
    prefill_chunk_size: longest prefill chunk; prefix-cache snapshots land on its multiples.
    prefix_cache_bytes / session_bytes: byte budgets of saved states (0 disables).
    session_ttl_s: idle sessions older than this are evicted.
    dtype: of the weights; "auto" is bfloat16 on CUDA, and on a CPU int8 where lln-serve's int8
    kernel runs (AVX-512 VNNI, `models/int8_kernel.py`: within 1% of float32's perplexity,
    about twice as fast a decode), else float32. States and LLN features are float32 whatever
    it is; int8 is weight-only (`models/quantize.py`), and so is int4 (CPU only: groups of 32
    weights, Q4_1's format, the default model's own grid, the LM head int8; `models/int4.py`).
    gemm_dtype: with float32 weights, the dtype of eager matmuls of 64 rows or more (prefill
    chunks); "auto" is bfloat16 on a CPU with bfloat16 units (`models/quantize.py`: 2.6-3.4x
    faster GEMMs, perplexity within 0.1%), else float32. Decode steps stay float32.
    compile_decode: decode steps through torch.compile'd layers (`LLNModel.compile_decode`).
    enforce_eager: on CUDA, run decode steps eagerly instead of replaying CUDA graphs
    (`server/decode_graph.py`); the step is the same static, in-place one.
    max_model_len: the most tokens one sequence may hold, prompt (with a session's history)
    plus generation; a request over it is refused before any work. A state does not grow
    with the context, so the default is a long-context server's 1M tokens, not a KV budget.
    default_max_tokens: the generation bound of a request that gives no max_tokens.
    state_store: where session states live: None (this process) or a Redis URL
    (redis://host:port/db, redis://:password@host/db, rediss://... for TLS; redis-py's own
    parsing, query options included), shared by replicas and kept across restarts.
    state_store_password_file: a file holding Redis's password (a mounted secret), so that it
    is neither in the URL nor on the command line; the URL's password wins where both are.
    state_store_ca_cert / state_store_cert / state_store_key: rediss:// only: the CA that
    signed Redis's certificate (verified; default: the system's CAs), and this client's
    certificate and key where Redis asks for one (tls-auth-clients).
    share_prefix_states: with Redis, prefix-cache states are shared by every replica too.
    session_lock_ttl_s: a session in use is locked in Redis for this long, refreshed while its
    request runs (a crashed replica's lock frees itself after it).
    threads: CPU threads for the model's math (`torch.set_num_threads`); None leaves torch's
    setting as it is (the CLI passes the cores the process may use). More threads than free
    cores make every step wait on descheduled threads (`bench_shared_cpu.py`).
    deterministic: a request's tokens do not depend on the other requests in the engine: its
    prefill chunks are split by its own prompt alone and run in forwards of their own, and
    every decode row takes one arithmetic whatever the batch (`models.quantize.
    set_batch_invariant`). Off: the fastest kernel per row count and prompts packed together.
    None (the default): on where it costs nothing measurable (`models.quantize.
    batch_invariance_is_free`: int8 weights on a CPU without AMX).
    """

    model: str = "smollm2-135m-lln"
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 1024
    max_waiting: int = 256
    prefill_chunk_size: int = 512
    device: str = "cpu"
    dtype: str = "auto"
    gemm_dtype: str = "auto"
    prefix_cache_bytes: int = 256 * 2**20
    session_bytes: int = 256 * 2**20
    session_ttl_s: float = 3600.0
    compile_decode: bool = True
    enforce_eager: bool = False
    seed: int | None = None
    max_model_len: int = 1 << 20
    default_max_tokens: int = 4096
    state_store: str | None = None
    share_prefix_states: bool = False
    session_lock_ttl_s: float = 30.0
    deterministic: bool | None = None
    state_store_password_file: str | None = None
    state_store_ca_cert: str | None = None
    state_store_cert: str | None = None
    state_store_key: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        ints = ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "prefill_chunk_size",
                "max_model_len", "default_max_tokens")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes each step"
            )
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be below max_model_len "
                f"({self.max_model_len})"
            )
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        for name in ("prefix_cache_bytes", "session_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        self._check_state_store()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.gemm_dtype not in GEMM_DTYPES:
            raise ValueError(
                f"gemm_dtype must be one of {', '.join(GEMM_DTYPES)}; got {self.gemm_dtype!r}"
            )
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype == "int4" and not self.device.startswith("cpu"):
            raise ValueError(f"dtype int4 runs on a CPU only, not on {self.device}")

    def _check_state_store(self) -> None:
        url = self.state_store
        if url not in (None, "", "memory") and not url.startswith(REDIS_SCHEMES):
            raise ValueError(
                "state_store must be 'memory' or a Redis URL (redis://host:port/db), got "
                f"{redacted_url(url)!r}"
            )
        tls = (self.state_store_ca_cert, self.state_store_cert, self.state_store_key)
        if any(tls) and not (url or "").startswith("rediss://"):
            raise ValueError("state_store_ca_cert, _cert and _key need a rediss:// state_store")
        if bool(self.state_store_cert) != bool(self.state_store_key):
            raise ValueError("state_store_cert and state_store_key go together")
        if self.state_store_password_file and not self.uses_redis:
            raise ValueError("state_store_password_file needs a Redis state_store")
        if self.share_prefix_states and not self.uses_redis:
            raise ValueError("share_prefix_states needs a Redis state_store (redis://...)")
        if self.session_lock_ttl_s <= 0:
            raise ValueError(f"session_lock_ttl_s must be > 0, got {self.session_lock_ttl_s}")

    @property
    def weight_dtype(self) -> str:
        """`dtype` with "auto" resolved for the device (on a CPU this builds the int8 kernel on
        first use, ~20 s, then cached)."""
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda"):
            return "bfloat16"
        from models import int8_kernel

        return "int8" if int8_kernel.available() else "float32"

    @property
    def uses_redis(self) -> bool:
        return bool(self.state_store) and self.state_store.startswith(REDIS_SCHEMES)


def redacted_url(url: str) -> str:
    """`url` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP layer: where it listens, who may call it, how big a request may be.

    api_key: one key (the tenant `default`); api_keys_file: many, one per line with a tenant
    and its limits (`server/tenants.py`), read again on SIGHUP; max_tenant_labels: tenants
    with a label of their own in the per-tenant metrics (the rest share `other`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys_file: str | None = None
    max_tenant_labels: int = 100
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 2**20
    served_model_name: str | None = None  # defaults to the engine's model
    ui: bool = True  # the playground at `/` (`--no-ui` turns it off: 404)
    shutdown_timeout_s: float = 30.0  # on SIGINT/SIGTERM, open requests are aborted after it

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535 (0: any free port), got {self.port}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_tenant_labels < 1:
            raise ValueError(f"max_tenant_labels must be >= 1, got {self.max_tenant_labels}")
