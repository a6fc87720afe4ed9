"""Peak GPU memory of one trial of the bundled trainer, estimated. Pure: numbers in, numbers out.

The estimate is per GPU, for a Llama-style decoder (Llama, Mistral, Qwen2/3, Gemma: attention
q/k/v/o projections and a gated MLP), whose shape `spec.constraints.model` gives. With h the
hidden size, q and kv the widths of the query and key/value projections (heads x head_dim),
i the MLP width, L the layers, V the vocabulary, r the LoRA rank, b the batch, s cutoff_len
and a the bytes of the compute dtype (2 with bf16/fp16, else the weights'):

- weights: every parameter in its dtype; with quantization_bit the decoder's linear weights
  take 4 bits (plus 0.127 bit of double-quantized constants, 0.5 bit without) or 8 bits (plus
  a float32 scale per output row), and everything else is float32 (peft's
  prepare_model_for_kbit_training upcasts it). Float32 weights under bf16/fp16 autocast also
  keep a 16-bit copy of each linear weight through the forward.
- adapter: the LoRA parameters, r x (in + out) per adapted module and layer (plus `out` for
  DoRA's magnitude), in float32, with their gradients and the optimizer's state (AdamW: two
  float32 moments).
- activations, per token of the batch (b x s): per layer a x (2q + 2kv + 3i) (rotated
  queries and keys, values, attention output, the MLP's gate, up and activation outputs) +
  8h (the two RMSNorms keep float32 copies), plus, per adapted module, a copy of its input
  (2 bytes per element under autocast, 4 without, shared between modules when everything is
  float32) and 8r (4r in float32); lora_dropout > 0 adds the dropped-out input and its mask
  (2 bytes per element more than the copy), DoRA twice the copy and a merged copy of each
  adapted weight. With 4-bit quantization the MLP's outputs are float32 (3i x 4 bytes). With
  gradient_checkpointing a layer keeps only its input, a x h, and one layer's activations
  are rebuilt at a time in the backward.
- logits: b x s x V x 12 bytes in training (the head's output, its float32 copy and the
  float32 log-softmax with its gradient), or per_device_eval_batch_size x s x V x (a + 8) in
  an evaluation (no activations are kept then); whichever is larger.
- overhead: 1 GiB for the CUDA context, cuBLAS workspaces and the allocator's slack.

The per-layer factors were measured by counting the tensors autograd saves in a forward pass
of transformers' Llama with peft adapters (tests/trainer/test_memory.py keeps them honest).
Every sequence is taken to be cutoff_len tokens long and every position labelled: the peak of
the longest batch, which is the one that runs out of memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lora_trainer.config import TrainConfig
from sweep_operator.api import ModelShape

GIB = 2**30
OVERHEAD_BYTES = GIB
# The linear modules of a Llama-style decoder layer; lora_target names them (`all`: every one).
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state per trainable parameter, by the trainer's `optim`: AdamW keeps two float32
# moments; Adagrad and RMSprop one; SGD (no momentum) none; Adafactor factors its second
# moment into a row and a column per matrix, which is negligible next to the matrix.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adagrad": 4,
    "rmsprop": 4,
    "sgd": 0,
    "adafactor": 0,
}
# Bytes per training logit: the head's output, its float32 copy and the float32 log-softmax
# are alive at the end of the forward; the log-softmax's gradients join it in the backward.
TRAIN_LOGIT_BYTES = 12
# The trainer settings the estimate reads; every other setting leaves the peak alone.
SETTINGS = (
    "torch_dtype",
    "quantization_bit",
    "bnb_4bit_use_double_quant",
    "lora_rank",
    "lora_target",
    "lora_dropout",
    "use_dora",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "cutoff_len",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "optim",
)


class EstimateError(ValueError):
    """A setting the estimate cannot read."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one trial on one GPU, in bytes, by what holds it."""

    weights: float
    adapter: float
    activations: float  # kept from the forward for the backward
    recomputed: float  # one layer's, rebuilt in the backward (gradient checkpointing)
    logits: float  # of the training step
    evaluation: float  # the logits of an evaluation batch
    overhead: float

    @property
    def peak(self) -> float:
        training = self.activations + self.recomputed + self.logits
        return self.weights + self.adapter + max(training, self.evaluation) + self.overhead

    @property
    def gib(self) -> float:
        return self.peak / GIB

    def describe(self) -> str:
        parts = {
            "weights": self.weights,
            "adapter": self.adapter,
            "activations": self.activations + self.recomputed,
            "logits": self.logits,
            "evaluation": self.evaluation,
            "overhead": self.overhead,
        }
        return (
            f"{self.gib:.1f} GiB ("
            + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
            + ")"
        )


@dataclass(frozen=True)
class Settings:
    """What the estimate needs of a trial's trainer settings."""

    config: TrainConfig

    @property
    def targets(self) -> tuple[str, ...]:
        chosen = self.config.lora_target_modules()
        return MODULES if isinstance(chosen, str) else tuple(chosen)

    @property
    def mixed_precision(self) -> bool:
        # bf16 unset is on wherever the GPU has bfloat16 (Ampere and later): the GPUs one
        # budgets memory for.
        return self.config.bf16 is not False or self.config.fp16


def trial_settings(values: Mapping[str, Any]) -> Settings:
    """A trial's settings from its parameters and fixed config, the trainer's defaults for the
    rest. Only the settings the estimate reads are taken: a custom program's other names, and
    the trainer's own cross-checks of unrelated settings, stay out of it."""
    chosen = {name: values[name] for name in SETTINGS if name in values}
    try:
        config = TrainConfig.model_validate(
            {"model_name_or_path": "-", "train_file": "-", **chosen}
        )
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        name = ".".join(str(part) for part in first["loc"]) or "settings"
        raise EstimateError(
            name,
            f"{first.get('input')!r} is not valid: {first['msg']} (the memory estimate reads it)",
        ) from None
    unknown = [t for t in Settings(config).targets if t not in MODULES]
    if unknown:
        raise EstimateError(
            "lora_target",
            f"{config.lora_target!r}: the memory estimate knows the linear modules of a "
            f"Llama-style decoder ({', '.join(MODULES)}, or `all`); {', '.join(unknown)} "
            "is not one",
        )
    return Settings(config)


def module_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of one decoder layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    head_dim = shape.head_dim or h // shape.num_attention_heads
    q = shape.num_attention_heads * head_dim
    kv = (shape.num_key_value_heads or shape.num_attention_heads) * head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def linear_parameters(shape: ModelShape) -> int:
    """The weights of the decoder layers' linear modules: what quantization shrinks."""
    return shape.num_hidden_layers * sum(a * b for a, b in module_dims(shape).values())


def base_parameters(shape: ModelShape) -> int:
    """The base model's parameter count: shape.parameters, else a Llama-style decoder's
    (linear weights, two RMSNorm weights per layer and a final one, the embedding and, untied,
    the output head; no biases)."""
    if shape.parameters is not None:
        return shape.parameters
    h = shape.hidden_size
    norms = (2 * shape.num_hidden_layers + 1) * h
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return linear_parameters(shape) + norms + embeddings


def lora_parameters(shape: ModelShape, settings: Settings) -> int:
    """Trainable parameters peft adds: r x (in + out) per adapted module (+ out with DoRA)."""
    dims = module_dims(shape)
    rank, dora = settings.config.lora_rank, settings.config.use_dora
    per_layer = sum(
        rank * (dims[m][0] + dims[m][1]) + (dims[m][1] if dora else 0) for m in settings.targets
    )
    return shape.num_hidden_layers * per_layer


def _weights(shape: ModelShape, settings: Settings) -> float:
    config = settings.config
    total = base_parameters(shape)
    linear = linear_parameters(shape)
    if config.quantization_bit == 4:
        constants = (1 / 64 + 4 / (64 * 256)) if config.bnb_4bit_use_double_quant else 4 / 64
        return linear * (0.5 + constants) + (total - linear) * 4
    if config.quantization_bit == 8:
        rows = shape.num_hidden_layers * sum(out for _, out in module_dims(shape).values())
        return linear + rows * 4 + (total - linear) * 4
    dtype = shape.dtype if config.torch_dtype == "auto" else config.torch_dtype
    weights = total * DTYPE_BYTES[dtype]
    if dtype == "float32" and settings.mixed_precision:
        weights += linear * 2  # autocast's 16-bit copies of the linear weights
    return weights


def _compute_bytes(shape: ModelShape, settings: Settings) -> int:
    config = settings.config
    if settings.mixed_precision:
        return 2
    if config.quantization_bit:
        return 4  # the float32 embedding sets the hidden states' dtype
    return DTYPE_BYTES[shape.dtype if config.torch_dtype == "auto" else config.torch_dtype]


def _float32_only(shape: ModelShape, settings: Settings) -> bool:
    """Hidden states, adapters and compute all float32 (float32 weights, or quantized ones
    whose other weights prepare_model_for_kbit_training upcast, without autocast): adapted
    modules then share their inputs."""
    config = settings.config
    dtype = shape.dtype if config.torch_dtype == "auto" else config.torch_dtype
    return not settings.mixed_precision and (bool(config.quantization_bit) or dtype == "float32")


def _layer_activations(shape: ModelShape, settings: Settings, a: int) -> tuple[float, float]:
    """(bytes per token, bytes per layer independent of tokens) that one layer keeps."""
    dims = module_dims(shape)
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = dims["q_proj"][1], dims["k_proj"][1]
    config = settings.config
    targets = settings.targets
    # A 4-bit layer returns its input's dtype: float32 hidden states make the MLP's outputs
    # float32 even under autocast.
    mlp = 4 if config.quantization_bit == 4 else a
    per_token = a * (2 * q + 2 * kv) + mlp * 3 * i + 8 * h
    if _float32_only(shape, settings):
        # peft hands each adapter the module's input itself: q/k/v share the normed hidden
        # state, gate/up the other one, o_proj reads the attention output kept anyway.
        groups = [
            h * any(t in targets for t in ("q_proj", "k_proj", "v_proj")),
            h * any(t in targets for t in ("gate_proj", "up_proj")),
            i * ("down_proj" in targets),
        ]
        inputs, per_rank, copy_bytes = a * sum(groups), 4, a
    else:
        # peft casts each adapter's input to its float32 weights (autocast casts it back):
        # every adapted module keeps an input of its own.
        copy_bytes = 2 if settings.mixed_precision else 4
        inputs, per_rank = copy_bytes * sum(dims[t][0] for t in targets), 8
    per_token += inputs + per_rank * config.lora_rank * len(targets)
    adapted_inputs = sum(dims[t][0] for t in targets)
    if config.lora_dropout > 0:  # each adapter's own dropped-out input and its mask
        per_token += (copy_bytes + 2) * adapted_inputs
    if config.use_dora:
        per_token += 2 * copy_bytes * adapted_inputs
    per_layer = a * sum(dims[t][0] * dims[t][1] for t in targets) if config.use_dora else 0
    return per_token, per_layer


def estimate(shape: ModelShape, settings: Settings) -> Estimate:
    config = settings.config
    a = _compute_bytes(shape, settings)
    layers = shape.num_hidden_layers
    tokens = config.per_device_train_batch_size * config.cutoff_len
    per_token, per_layer = _layer_activations(shape, settings, a)
    final_norm = 4 * shape.hidden_size
    if config.gradient_checkpointing:
        kept = tokens * (layers * a * shape.hidden_size + final_norm)
        recomputed = tokens * per_token + per_layer
    else:
        kept = tokens * (layers * per_token + final_norm) + layers * per_layer
        recomputed = 0
    trainable = lora_parameters(shape, settings)
    state = OPTIMIZER_STATE_BYTES[config.optim]
    eval_tokens = config.per_device_eval_batch_size * config.cutoff_len
    return Estimate(
        weights=_weights(shape, settings),
        adapter=trainable * (4 + 4 + state),
        activations=kept,
        recomputed=recomputed,
        logits=tokens * shape.vocab_size * TRAIN_LOGIT_BYTES,
        evaluation=eval_tokens * shape.vocab_size * (a + 8),
        overhead=OVERHEAD_BYTES,
    )
