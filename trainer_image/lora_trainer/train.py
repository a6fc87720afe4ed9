"""LoRA fine-tuning with peft and transformers' Trainer."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers import TrainingArguments as HFTrainingArguments

from lora_trainer.checkpoints import checkpoint_step, latest_complete
from lora_trainer.collate import REAL_TOKENS, PackingCollator, PaddingCollator
from lora_trainer.config import TrainConfig, check_hardware
from lora_trainer.contract import TAG_ADAPTER
from lora_trainer.data import IGNORE_INDEX, DataError, Example, PreparedData, prepare
from lora_trainer.isolation import check_isolation
from lora_trainer.shape import ShapeError, model_shape, shape_tags, shape_yaml
from lora_trainer.stopping import StopFlag, Stopped
from lora_trainer.tracking import TrialRun

log = logging.getLogger("lora_trainer")

# The MLflow artifact path of the trained adapter (TAG_ADAPTER says it was uploaded).
ADAPTER_ARTIFACT = "adapter"

# "on", or "off: <why>" when packing was asked for but this model lets packed examples mix.
TAG_PACKING = "lorasweep.packing"
# early_stopping_patience: the share by which eval_loss must fall to count as an improvement.
MIN_IMPROVEMENT = 1e-6
DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded from model_name_or_path."""


def load_tokenizer(cfg: TrainConfig) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model_name_or_path={cfg.model_name_or_path!r}: cannot load the tokenizer: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: TrainConfig) -> Any:
    """transformers' bitsandbytes settings for QLoRA; None without quantization_bit."""
    if cfg.quantization_bit is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=cfg.quantization_bit == 4,
        load_in_8bit=cfg.quantization_bit == 8,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
    )


def load_base_model(cfg: TrainConfig) -> Any:
    """The base model as configured, quantized with quantization_bit."""
    quantization = quantization_config(cfg)
    # Quantized weights are placed while loading: on this process's GPU under torchrun.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model_name_or_path,
            dtype=DTYPES[cfg.torch_dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            quantization_config=quantization,
            device_map={"": device} if quantization else None,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model_name_or_path={cfg.model_name_or_path!r}: cannot load the model: {exc}"
        ) from exc
    # A KV cache is useless in training, and its presence turns off the packed-sequence masks.
    model.config.use_cache = False
    return model


def load_model(cfg: TrainConfig) -> Any:
    """The base model with fresh LoRA adapters; only the adapters are trainable."""
    model = load_base_model(cfg)
    if cfg.quantization_bit:
        # Freezes the base, upcasts its unquantized weights to float32 and turns on gradient
        # checkpointing as the Trainer will (non-reentrant).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    check_lora_targets(cfg, model)
    transformers.set_seed(cfg.seed)  # the adapters' initial weights
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules(),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelLoadError(f"lora_target={cfg.lora_target!r}: {exc}") from exc


def report_model_shape(cfg: TrainConfig, parameters: int, trial_run: TrialRun) -> None:
    """Log the base model's shape as a sweep's spec.constraints.model takes it (a line to copy)
    and tag the run with it (lorasweep.model.*), from its config.json and its exact parameter
    count."""
    config = AutoConfig.from_pretrained(
        cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code
    ).to_dict()
    try:
        shape = model_shape(config, parameters)
    except ShapeError as exc:
        log.info("no model shape for spec.constraints.model: %s", exc)
        return
    log.info("model shape for spec.constraints.model: %s", shape_yaml(shape))
    trial_run.set_tags(shape_tags(shape))


def check_lora_targets(cfg: TrainConfig, model: Any) -> None:
    """Refuse a lora_target list naming modules the model lacks: peft adapts the names it
    finds and ignores the rest, so a typo would train fewer layers than asked, silently."""
    targets = cfg.lora_target_modules()
    if isinstance(targets, str):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and name
            }
        )
        raise ModelLoadError(
            f"lora_target={cfg.lora_target!r}: the model has no module named "
            f"{', '.join(missing)}; its linear layers are {', '.join(linear)} (or use `all`)"
        )


def collator_for(
    cfg: TrainConfig, tokenizer: Any, model: Any, examples: list[Any], trial_run: TrialRun | None
) -> PackingCollator | PaddingCollator:
    """Packing when it is on and verified on this model (examples of a packed row must not see
    each other), else padding; the verdict goes to the log and to the run's tags."""
    if cfg.packing:
        isolation = check_isolation(model, examples)
        if isolation.isolated:
            if trial_run is not None:
                trial_run.set_tags({TAG_PACKING: "on"})
            one_row = cfg.attn_implementation == "flash_attention_2"
            return PackingCollator(pad_token_id=tokenizer.pad_token_id, one_row=one_row)
        log.warning("packing is off for this model, padding instead: %s", isolation.reason)
        if trial_run is not None:
            trial_run.set_tags({TAG_PACKING: f"off: {isolation.reason}"[:5000]})
    return PaddingCollator(pad_token_id=tokenizer.pad_token_id)


def real_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch; takes the collator's count out of the model inputs."""
    if REAL_TOKENS in inputs:
        return int(inputs.pop(REAL_TOKENS))
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return inputs["input_ids"].numel()


class LoraTrainer(Trainer):
    """Trainer that counts real (non-padding) tokens and reports a token-weighted eval loss."""

    def __init__(self, *args: Any, stop_flag: StopFlag, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_flag = stop_flag
        self.stopped = False
        self.train_tokens = 0  # this process's
        self.last_eval_step = -1
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if isinstance(base, PeftModel) else base
        self.labelled_head = "logits_to_keep" in inspect.signature(base.forward).parameters

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The causal LM loss with the output head run only at positions that predict a label.

        Prompts carry no labels, and with a modern vocabulary the head is a large share of a
        forward pass: on short responses most of it would be computed for nothing. The loss is
        the model's own (summed cross-entropy over labelled tokens, over num_items_in_batch)."""
        targets = inputs["labels"][:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if not self.labelled_head or return_outputs or keep.numel() == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        features = {key: value for key, value in inputs.items() if key != "labels"}
        logits = model(**features, logits_to_keep=keep).logits
        chosen = targets[:, keep]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            chosen.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return loss / (chosen != IGNORE_INDEX).sum().clamp(min=1)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        return loss

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Per micro-batch, not only per optimizer step: with gradient accumulation a step can
        # outlast the grace period between SIGTERM and SIGKILL.
        if self.stop_requested():
            raise Stopped
        self.train_tokens += real_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def sum_over_processes(self, value: int) -> int:
        """The sum of `value` over the processes of a torchrun launch; every one must call it."""
        total = torch.tensor(value, dtype=torch.int64, device=self.args.device)
        return int(self.accelerator.reduce(total, reduction="sum"))

    def stop_requested(self) -> bool:
        """Whether any process got SIGTERM. All stop at the same step: one that went on would
        wait forever for the others in its next gradient exchange."""
        if self.args.world_size == 1:
            return self.stop_flag.is_set
        return self.sum_over_processes(int(self.stop_flag.is_set)) > 0

    def _eval_batches(self, dataset: list[Example]) -> Iterator[tuple[dict[str, Any], bool]]:
        """This process's eval batches, each with whether it counts.

        Batches go round-robin to the processes, so each example counts exactly once however
        many there are (accelerate's sampler repeats examples to even out the shares). Every
        process runs as many forwards as the busiest one, because a sharded (FSDP) model needs
        all of them in each forward; the extra ones repeat a batch and do not count."""
        size = self.args.per_device_eval_batch_size
        batches = [dataset[start : start + size] for start in range(0, len(dataset), size)]
        world, rank = self.args.world_size, self.args.process_index
        mine = batches[rank::world]
        for index in range(math.ceil(len(batches) / world)):
            counted = index < len(mine)
            yield self.data_collator(mine[index] if counted else batches[0]), counted

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # Trainer's own eval loss averages per-batch means, so it would change with the batch
        # size and with packing; trials of a sweep must be compared on the same quantity.
        start = time.perf_counter()
        model = self.model
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.args.device)
        counts = torch.zeros(2, dtype=torch.int64, device=self.args.device)  # targets, tokens
        with torch.no_grad():
            for batch, counted in self._eval_batches(eval_dataset or self.eval_dataset):
                if self.stop_requested():  # every process runs as many batches: they agree
                    raise Stopped
                inputs = self._prepare_inputs(batch)
                tokens = real_tokens(inputs)
                with self.compute_loss_context_manager():
                    loss = model(**inputs).loss
                if not counted:
                    continue
                targets = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
                loss_sum += loss.double() * targets
                counts += torch.stack([targets, torch.tensor(tokens, device=counts.device)])
        loss_sum = self.accelerator.reduce(loss_sum, reduction="sum")
        counts = self.accelerator.reduce(counts, reduction="sum")
        runtime = time.perf_counter() - start
        metrics = {
            f"{metric_key_prefix}_loss": float(loss_sum / counts[0].clamp(min=1)),
            f"{metric_key_prefix}_tokens": int(counts[1]),
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_tokens_per_second": round(int(counts[1]) / max(runtime, 1e-9), 2),
        }
        self.last_eval_step = self.state.global_step
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics


class RunCallback(TrainerCallback):
    """Stops at the next step on SIGTERM, stops early when eval_loss stalls, adds tokens per
    second to the logs and sends every log to MLflow."""

    def __init__(self, trainer: LoraTrainer, trial_run: TrialRun, patience: int | None) -> None:
        self.trainer = trainer
        self.trial_run = trial_run
        self.patience = patience
        self.best_eval_loss = float("inf")
        self.evals_without_improvement = 0
        self.last_log_time = time.perf_counter()
        self.last_log_tokens = 0

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # A run resumed from a checkpoint goes on counting its patience where the checkpoint was.
        for entry in state.log_history:
            if "eval_loss" in entry:
                self._count_evaluation(entry["eval_loss"])
        return control

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.trainer.stop_requested():
            self.trainer.stopped = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = False
        if state.global_step >= state.max_steps:
            # transformers would resume a checkpoint of the last step by training one step
            # past the end; the adapter is saved on its own anyway.
            control.should_save = False
        return control

    def _count_evaluation(self, eval_loss: float) -> bool:
        """Whether patience has run out with this evaluation."""
        # float32 evaluation differs in its last digits from one run of nearly the same
        # weights to the next: a change that small is noise, not an improvement. (eval_loss, a
        # cross-entropy, is never negative; the first best is infinite.)
        if eval_loss < self.best_eval_loss * (1 - MIN_IMPROVEMENT):
            self.best_eval_loss = eval_loss
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def on_evaluate(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        eval_loss = (metrics or {}).get("eval_loss")
        if eval_loss is not None and self._count_evaluation(eval_loss):
            log.info("early stopping: eval_loss has not improved in %d evaluations", self.patience)
            control.should_training_stop = True
        return control

    def on_log(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        logs = logs if logs is not None else {}
        if "loss" in logs:
            now = time.perf_counter()
            tokens = self.trainer.sum_over_processes(self.trainer.train_tokens)
            logs["tokens_per_second"] = round(
                (tokens - self.last_log_tokens) / max(now - self.last_log_time, 1e-9), 2
            )
            self.last_log_time, self.last_log_tokens = now, tokens
        shown = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in logs.items()
        )
        log.info("step %d/%d %s", state.global_step, state.max_steps, shown)
        self.trial_run.log_metrics(logs, step=state.global_step)
        return control


@dataclass
class TrainingArguments(HFTrainingArguments):
    """transformers' arguments, with the warmup as a fraction of the steps.

    transformers 5 dropped `warmup_ratio`: its `warmup_steps` reads a value below 1 as a
    fraction and 1 or more as a count of steps, so `warmup_ratio: 1.0` (warm up throughout)
    would become a single step."""

    warmup_fraction: float = 0.0

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return math.ceil(num_training_steps * self.warmup_fraction)


def hf_arguments(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=cfg.checkpoint_dir or str(Path(cfg.output_dir) / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_fraction=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=bool(cfg.bf16),  # settled by check_this_machine; None only where it was skipped
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed,
        data_seed=cfg.seed,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps,
        # The newest may be half-written when the process is killed; the other is complete.
        save_total_limit=2 if cfg.checkpoint_dir else None,
        fsdp=cfg.fsdp,
        # Every adapter weight takes part in every forward; searching for unused ones would
        # cost a pass over the graph each step.
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def environment_tags() -> dict[str, str]:
    gpus = torch.cuda.device_count()
    return {
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        "env.transformers": transformers.__version__,
        "env.peft": peft.__version__,
        "env.cuda": torch.version.cuda or "none",
        "env.gpu_count": str(gpus),
        "env.gpu_name": torch.cuda.get_device_name(0) if gpus else "none",
    }


def data_tags(cfg: TrainConfig, data: PreparedData) -> dict[str, str]:
    tags = {
        "data.template": data.template,
        "data.train_file": cfg.train_file,
        "data.train_sha256": data.file_hashes[cfg.train_file],
        "data.train_examples": str(len(data.train.examples)),
        "data.train_tokens": str(data.train.tokens),
        "data.dropped_examples": str(data.train.dropped + (data.eval.dropped if data.eval else 0)),
        "data.eval_examples": str(len(data.eval.examples) if data.eval else 0),
        "data.eval_tokens": str(data.eval.tokens if data.eval else 0),
    }
    if cfg.eval_file:
        tags["data.eval_file"] = cfg.eval_file
        tags["data.eval_sha256"] = data.file_hashes[cfg.eval_file]
    return tags


def check_this_machine(cfg: TrainConfig) -> TrainConfig:
    """cfg, checked against this machine and with its unset hardware settings settled."""
    cuda = torch.cuda.is_available()
    return check_hardware(
        cfg,
        cuda=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
    )


def prepare_data(cfg: TrainConfig, tokenizer: Any) -> PreparedData:
    return prepare(
        train_file=cfg.train_file,
        eval_file=cfg.eval_file,
        val_size=cfg.val_size,
        max_samples=cfg.max_samples,
        cutoff_len=cfg.cutoff_len,
        template=cfg.template,
        tokenizer=tokenizer,
    )


def train(cfg: TrainConfig, trial_run: TrialRun, stop_flag: StopFlag) -> dict[str, float]:
    """Train and evaluate; returns the final metrics. Raises Stopped on SIGTERM."""
    cfg = check_this_machine(cfg)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    trial_run.set_tags(data_tags(cfg, data))
    if data.eval is None:
        log.warning("no evaluation data (eval_file unset, val_size=0): no eval_loss is reported")
    log.info(
        "data: %d train / %d eval examples, template %s",
        len(data.train.examples),
        len(data.eval.examples) if data.eval else 0,
        data.template,
    )
    stop_flag.check()
    model = load_model(cfg)
    trainable, total = model.get_nb_trainable_parameters()
    trial_run.set_tags({"model.trainable_parameters": trainable, "model.parameters": total})
    report_model_shape(cfg, total - trainable, trial_run)
    stop_flag.check()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = LoraTrainer(
        model=model,
        args=hf_arguments(cfg, has_eval=data.eval is not None),
        train_dataset=data.train.examples,
        eval_dataset=data.eval.examples if data.eval else None,
        processing_class=tokenizer,
        stop_flag=stop_flag,
    )
    # Chosen once the Trainer has put the model on its device: the check runs the model.
    trainer.data_collator = collator_for(
        cfg, tokenizer, trainer.model, data.train.examples, trial_run
    )
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step, once
    trainer.add_callback(RunCallback(trainer, trial_run, cfg.early_stopping_patience))
    checkpoint = latest_complete(Path(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
        resumes = int(trial_run.earlier_tags.get("lorasweep.resumes", "0")) + 1
        trial_run.set_tags(
            {
                "lorasweep.resumes": resumes,
                "lorasweep.resumed_from_step": checkpoint_step(checkpoint),
            }
        )
    try:
        # A checkpoint restores the adapter, optimizer, scheduler, random generators and the
        # position in the data.
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if trainer.stopped or stop_flag.is_set:
            raise Stopped
        if data.eval is not None and trainer.last_eval_step != trainer.state.global_step:
            trainer.evaluate()
    except Stopped:
        last = {
            "eval_loss": _last_logged(trainer, "eval_loss"),
            "loss": _last_logged(trainer, "loss"),
        }
        raise Stopped({"train_steps": trainer.state.global_step, **last}) from None

    metrics: dict[str, float] = {}
    if data.eval is not None:
        metrics["eval_loss"] = _last_logged(trainer, "eval_loss")
        metrics["eval_tokens"] = _last_logged(trainer, "eval_tokens")
    runtime = output.metrics["train_runtime"]
    train_tokens = trainer.sum_over_processes(trainer.train_tokens)
    metrics |= {
        "train_loss": output.training_loss,
        "train_runtime": runtime,
        "train_steps": trainer.state.global_step,
        "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / max(runtime, 1e-9),
        "epoch": trainer.state.epoch or 0.0,
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # eval_loss, train_loss and train_runtime were logged as they happened; once per step only.
    already_logged = {"eval_loss", "eval_tokens", "train_loss", "train_runtime", "epoch"}
    trial_run.log_metrics(
        {k: v for k, v in metrics.items() if k not in already_logged}, trainer.state.global_step
    )

    if cfg.save_adapter:
        adapter_dir = Path(cfg.output_dir) / "adapter"
        # The adapter's weights and config, and the tokenizer; gathered from all processes
        # under FSDP, written by process 0.
        trainer.save_model(str(adapter_dir))
        trial_run.set_tags({"output.adapter_dir": str(adapter_dir)})
        log.info("adapter saved to %s", adapter_dir)
        # The operator reads the tag as "the adapter is there", so it comes after the upload.
        if cfg.log_adapter and trial_run.log_artifacts(adapter_dir, ADAPTER_ARTIFACT):
            trial_run.set_tags({TAG_ADAPTER: ADAPTER_ARTIFACT})
    return metrics


def evaluate_adapter(cfg: TrainConfig, adapter_dir: str | Path) -> float:
    """The eval_loss of a saved adapter: cfg's base model with the adapter applied, on cfg's
    evaluation data, computed as training reports it (same data preparation, collator, mixed
    precision and token weighting). One process."""
    cfg = check_this_machine(cfg)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    if data.eval is None:
        raise DataError("no evaluation data: set eval_file, or val_size above 0")
    model = PeftModel.from_pretrained(load_base_model(cfg), str(adapter_dir))
    trainer = LoraTrainer(
        model=model,
        args=hf_arguments(cfg, has_eval=True),
        eval_dataset=data.eval.examples,
        data_collator=collator_for(cfg, tokenizer, model, data.eval.examples, None),
        processing_class=tokenizer,
        stop_flag=StopFlag(),
    )
    trainer.remove_callback(PrinterCallback)
    # What training does to the model: onto the device, with bf16/fp16 autocast.
    trainer.model = trainer.accelerator.prepare_model(model, evaluation_mode=True)
    return trainer.evaluate()["eval_loss"]


def _last_logged(trainer: Trainer, key: str) -> float:
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return float(entry[key])
    return float("nan")
