"""Settings of every role: pydantic-settings classes read from ``SPLITFED_*`` environment variables.

The CLI options of each role are generated from these same fields (``shared.runtime.cli_options``), so
``--lora-r 4`` and ``SPLITFED_LORA_R=4`` are one setting with one default and one validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.wire.chunks import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from shared.wire.ids import check_id

Mode = Literal["serial", "client-batch", "hierarchical"]
# Run, silo and worker ids travel in fixed-width header fields (shared/wire/ids.py).
Identifier = Annotated[str, AfterValidator(check_id)]


class PeerSettings(BaseSettings):
    """What every role has. A silo has only these and its own: it reaches the broker, nothing else."""

    model_config = SettingsConfigDict(env_prefix="SPLITFED_", extra="forbid", validate_default=True)

    run_id: Identifier = Field("run", description="run identifier (1-16 chars A-Z a-z 0-9 _ . -)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log verbosity")
    log_json: bool = Field(False, description="one JSON object per log line (with silo, round, step fields)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics on this port (0: any free)")
    metrics_addr: str = Field("127.0.0.1", description="address of the metrics endpoint")
    heartbeat_s: float = Field(1.0, gt=0, description="liveness heartbeat period (seconds)")
    liveness_ttl_s: int = Field(5, ge=1, description="seconds after the last heartbeat a peer counts as dead")
    max_tensor_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest tensor accepted from the wire")
    # Not run-wide: each receiver reads a payload's chunking from its header (shared/wire/chunks.py).
    wire_chunk_bytes: Annotated[int, AfterValidator(check_chunk_bytes)] = Field(
        DEFAULT_CHUNK_BYTES, description="tensors larger than this travel as frames of this many bytes, "
        "each sealed on its own (a power of two, 4 KiB..1 GiB)")
    curve: bool = Field(False, description="CurveZMQ on every socket (hop encryption + ZAP allow-list at the broker)")
    curve_cert: Path | None = Field(None, description="this role's CurveZMQ secret certificate (NAME.key_secret)")
    operator_fingerprint: str | None = Field(None, description="pinned operator key fingerprint (sha256:...): "
                                             "silo keys are taken from the directory only with its signed certificate")


class RedisAccess(BaseSettings):
    """The run's Redis: the broker, the trunk workers and the operator's tools (never a silo)."""

    model_config = SettingsConfigDict(env_prefix="SPLITFED_", extra="forbid", validate_default=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding run state and membership")
    key_prefix: str = Field("splitfed", description="namespace of every Redis key this run writes")


class CommonSettings(RedisAccess, PeerSettings):
    """A server-side role's or operator tool's settings: the peer settings and the run's Redis."""


class ModelSettings(PeerSettings):
    """What is trained and how: must be identical on the silos and the trunk of one run."""

    model: str = Field("smollm2", description="'smollm2', 'gemma3' (Gemma 3 270M), 'qwen2.5-coder-0.5b', 'tiny' (a tiny Llama cached locally) or a model directory")
    head_layers: int = Field(1, ge=1, description="decoder blocks kept on the silo after the embeddings")
    tail_layers: int = Field(1, ge=1, description="decoder blocks kept on the silo before the final norm")
    adapter: Literal["lora", "prefix", "full"] = Field("lora", description="what trains: LoRA, P-Tuning v2 prefixes, or full")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_init_b: Literal["zeros", "random"] = Field("zeros", description="LoRA B init (zeros = standard)")
    prefix_len: int = Field(4, ge=1, description="prefix length for prefix tuning")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(0, ge=0, description="seed of adapter initialisation and data order")
    wire_dtype: Literal["fp32", "bf16", "fp16", "int8", "fp8-e4m3", "fp8-e5m2", "auto8"] = Field(
        "fp32", description="activations/gradients on the wire: a float dtype, or int8 / fp8 values with "
        "a bfloat16 scale per token (auto8: int8 or fp8-e4m3, per tensor the better; shared/wire/compression.py)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="compute dtype of the model's weights and "
                                                   "activations (adapters and optimizer state stay fp32: master weights)")

    def adapter_config(self):
        from shared.model.adapters import AdapterConfig  # imported here: settings stay cheap to import

        return AdapterConfig(kind=self.adapter, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                             lora_init_b=self.lora_init_b, prefix_len=self.prefix_len)


class CryptoSettings(ModelSettings):
    """End-to-end sealing between silo and trunk service (shared/crypto/sealing.py). On by default."""

    encryption: bool = Field(True, description="seal every tensor end to end (silo and trunk must agree)")
    cipher: Literal["aes-gcm", "chacha20"] = Field("aes-gcm", description="AEAD (chacha20 for CPUs without AES instructions)")
    keys_dir: Path | None = Field(None, description="this role's key directory (from `splitfed keys gen`)")
    curve_broker_key: str | None = Field(None, description="the broker's CurveZMQ public key (Z85) or certificate file")
    checkpoint_dir: Path | None = Field(None, description="write round checkpoints here and resume from them "
                                        "after a crash (none: a restart cannot resume)")


class BrokerSettings(CommonSettings):
    frontend_bind: str = Field("tcp://127.0.0.1:5555", description="address silos connect to")
    backend_bind: str = Field("tcp://127.0.0.1:5556", description="address trunk workers connect to")
    mode: Mode = Field("serial", description="training mode")
    silos: str = Field("", description="comma-separated silo ids of the run (empty: read from Redis run metadata)")
    encryption: bool = Field(True, description="silos must register with a token signed by their enrolled identity")
    batch_max_silos: int = Field(0, ge=0, description="client-batch: most silos in one trunk batch (0: every active silo)")
    batch_window_ms: int = Field(10000, ge=1, description="client-batch: longest wait for a step's FORWARDs "
                                 "after the first one; later silos skip the step")
    round_timeout_s: float = Field(120.0, gt=0, description="longest wait for the silos of a round to join its "
                                   "aggregation; later ones keep their own weights for that round")
    max_inflight: int = Field(2, ge=1, description="hierarchical: open steps per trunk worker (bounds its "
                              "activation memory; more wait at the broker)")
    aggregation: Literal["fedavg", "none"] = Field("fedavg", description="at each round's end: secure FedAvg of "
                                                   "the silos' head/tail weights, or none")
    personalize: bool = Field(False, description="hierarchical: keep each silo's trunk adapter (no trunk FedAvg)")
    curve_allow_dir: Path | None = Field(None, description="directory of client public certificates admitted by ZAP")
    burst: bool = Field(False, description="exit 0 once every silo of the run has finished (after telling the "
                        "trunk workers the run is over), instead of serving until SIGTERM")


class TrunkSettings(RedisAccess, CryptoSettings):
    broker_backend: str = Field("tcp://127.0.0.1:5556", description="broker address for trunk workers")
    worker_id: Identifier = Field("trunk0", description="this worker's id")
    device: str = Field("cpu", description="torch device of the trunk ('cpu', 'cuda', 'cuda:1')")
    devices: str | None = Field(None, description="several devices of this host for the trunk's blocks, "
                                "comma-separated ('cuda:0,cuda:1'): contiguous spans, one per device "
                                "(overrides device)")
    trunk_quant: Literal["none", "nf4", "int8"] = Field("none", description="frozen base of the trunk's blocks in "
                                                        "NF4 or int8 (bitsandbytes; QLoRA: adapters stay fp32)")
    max_pending: int = Field(64, ge=1, description="forward graphs kept while waiting for their backward")
    recompute_forward: bool = Field(False, description="keep only each step's input and run its forward again at "
                                    "its BACKWARD (activation checkpointing): one step's activations at a time "
                                    "however many steps are open, for one more forward per step")
    mode: Mode = Field("serial", description="training mode (hierarchical: one trunk adapter per silo)")
    straggler_timeout_s: float = Field(60.0, gt=0, description="client-batch: longest wait for a batch's "
                                       "gradients; missing slices count as zero")
    save_dir: Path | None = Field(None, description="on exit, write the trunk's trainable tensors here (trunk.safetensors; "
                                  "hierarchical: also trunk-<silo>.safetensors per silo)")
    burst: bool = Field(False, description="exit 0 when the broker says the run is finished (every silo done), "
                        "instead of serving until SIGTERM")


class SiloSettings(CryptoSettings):
    broker_frontend: str = Field("tcp://127.0.0.1:5555", description="broker address for silos")
    silo_id: Identifier = Field("silo0", description="this silo's id")
    trunk_fingerprint: str | None = Field(None, description="pinned trunk service key fingerprint (sha256:...)")
    silo_index: int = Field(0, ge=0, description="this silo's index (mixes into the data order)")
    data: Path | None = Field(None, description="JSONL training data ({prompt, completion} or {text} per line)")
    steps: int = Field(20, ge=1, description="training steps of this silo")
    local_steps: int = Field(10, ge=1, description="steps per round (K)")
    batch_size: int = Field(4, ge=1, description="examples per step")
    max_length: int = Field(128, ge=8, description="tokens per example (prompt truncated from the left)")
    step_timeout_s: float = Field(300.0, gt=0, description="give up on a trunk reply after this long")
    broker_timeout_s: float = Field(60.0, gt=0, description="give up when the broker has sent nothing (not even "
                                    "its heartbeat) for this long; a silo says so after 3 silent heartbeats")
    report_loss: bool = Field(True, description="publish each step's loss to Redis for monitoring")
    results: Path | None = Field(None, description="write losses and final adapter metadata here (JSON)")
    save_dir: Path | None = Field(None, description="write the final head/tail trainable tensors here (safetensors)")
    cut_clip_norm: float | None = Field(None, gt=0, description="privacy: clip each cut activation token to this "
                                        "L2 norm before it leaves the silo (see `splitfed audit invert`)")
    cut_noise_sigma: float = Field(0.0, ge=0, description="privacy: Gaussian noise std added to the clipped cut "
                                   "activations (0: none)")
    cut_noise_seed: int | None = Field(None, ge=0, description="SECRET seed of that noise (default: random per "
                                       "process; never share it with the trunk operator)")
    # The learned defense (shared/model/privacy_adapter.py, silo_agent/privacy_defense.py); defaults
    # are the setting `splitfed audit defend` measured (README, issue 19). It did NOT reach its privacy
    # goal there: treat the trunk operator as able to read the silo's text all the same.
    privacy_strength: float = Field(0.0, ge=0, description="privacy: lambda of the learned privacy adapter, "
                                    "trained against the silo's own inverter (0: off; needs --micro-batches 1)")
    privacy_rank: int = Field(32, ge=1, description="privacy: rank of the adapter's low-rank map (<= hidden size)")
    privacy_lr: float = Field(3e-3, gt=0, description="privacy: the adapter's own Adam step size")
    privacy_distortion: float = Field(100.0, ge=0, description="privacy: warm-up weight of the adapter's "
                                      "relative change of the head's output")
    privacy_warmup_steps: int = Field(60, ge=0, description="privacy: head-only adapter/inverter steps on "
                                      "the silo's own batches before training (not on resume)")
    privacy_inverter_lr: float = Field(1e-3, gt=0, description="privacy: the silo inverter's Adam step size")
    privacy_inverter_steps: int = Field(2, ge=1, description="privacy: inverter updates per training step")
    generate: Path | None = Field(None, description="after training, complete these JSONL prompts by split generation "
                                  "through the trunk (KV caches on both sides)")
    generate_out: Path | None = Field(None, description="write the generated texts and per-step frame sizes here (JSON)")
    max_new_tokens: int = Field(16, ge=1, le=1024, description="tokens per completion with --generate (greedy)")
    micro_batches: int | Literal["auto"] = Field(1, description="serial and client-batch: cut each step's batch "
                                                 "into this many micro-batches (gradient accumulation, one optimizer "
                                                 "step, exact); the silo computes the next one's head while the trunk "
                                                 "works on the previous and the network carries the rest. 'auto': "
                                                 "measure the round trip and the trunk's time over the first steps and "
                                                 "keep enough in flight to cover one round trip")

    @field_validator("micro_batches")
    @classmethod
    def _micro_batches_positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("micro_batches must be >= 1 or 'auto'")
        return value
