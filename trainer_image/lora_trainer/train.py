"""LoRA fine-tuning with peft and transformers' Trainer."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers import TrainingArguments as HFTrainingArguments

from lora_trainer.config import ConfigError, TrainConfig
from lora_trainer.data import (
    IGNORE_INDEX,
    REAL_TOKENS,
    PackingCollator,
    PaddingCollator,
    PreparedData,
    prepare,
)
from lora_trainer.stopping import StopFlag, Stopped
from lora_trainer.tracking import Tracker

log = logging.getLogger("lora_trainer")

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


def load_model(cfg: TrainConfig) -> Any:
    """The base model with fresh LoRA adapters; only the adapters are trainable."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model_name_or_path,
            dtype=DTYPES[cfg.torch_dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model_name_or_path={cfg.model_name_or_path!r}: cannot load the model: {exc}"
        ) from exc
    # A KV cache is useless in training, and its presence turns off the packed-sequence masks.
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
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


def collator_for(cfg: TrainConfig, tokenizer: Any) -> PackingCollator | PaddingCollator:
    if cfg.packing:
        one_row = cfg.attn_implementation == "flash_attention_2"
        return PackingCollator(pad_token_id=tokenizer.pad_token_id, one_row=one_row)
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
        self.train_tokens = 0
        self.last_eval_step = -1

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.train_tokens += real_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

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
            for batch in self.get_eval_dataloader(eval_dataset):
                self.stop_flag.check()
                inputs = self._prepare_inputs(batch)
                tokens = real_tokens(inputs)
                with self.compute_loss_context_manager():
                    loss = model(**inputs).loss
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

    def __init__(self, trainer: LoraTrainer, tracker: Tracker, patience: int | None) -> None:
        self.trainer = trainer
        self.tracker = tracker
        self.patience = patience
        self.best_eval_loss = float("inf")
        self.evals_without_improvement = 0
        self.last_log_time = time.perf_counter()
        self.last_log_tokens = 0

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.trainer.stop_flag.is_set:
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = False
        return control

    def on_evaluate(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        eval_loss = (metrics or {}).get("eval_loss")
        if self.patience is None or eval_loss is None:
            return control
        if eval_loss < self.best_eval_loss:
            self.best_eval_loss = eval_loss
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if self.evals_without_improvement >= self.patience:
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
            tokens = self.trainer.train_tokens
            logs["tokens_per_second"] = round(
                (tokens - self.last_log_tokens) / max(now - self.last_log_time, 1e-9), 2
            )
            self.last_log_time, self.last_log_tokens = now, tokens
        shown = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in logs.items()
        )
        log.info("step %d/%d %s", state.global_step, state.max_steps, shown)
        self.tracker.log_metrics(logs, step=state.global_step)
        return control


def hf_arguments(cfg: TrainConfig, has_eval: bool) -> HFTrainingArguments:
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    return HFTrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed,
        data_seed=cfg.seed,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps,
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


def train(cfg: TrainConfig, tracker: Tracker, stop_flag: StopFlag) -> dict[str, float]:
    """Train and evaluate; returns the final metrics. Raises Stopped on SIGTERM."""
    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("fp16=true needs a CUDA GPU; use bf16=true or neither on CPU")
    tokenizer = load_tokenizer(cfg)
    data = prepare(
        train_file=cfg.train_file,
        eval_file=cfg.eval_file,
        val_size=cfg.val_size,
        max_samples=cfg.max_samples,
        cutoff_len=cfg.cutoff_len,
        template=cfg.template,
        tokenizer=tokenizer,
    )
    tracker.set_tags(data_tags(cfg, data))
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
    tracker.set_tags({"model.trainable_parameters": trainable, "model.parameters": total})
    stop_flag.check()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = LoraTrainer(
        model=model,
        args=hf_arguments(cfg, has_eval=data.eval is not None),
        train_dataset=data.train.examples,
        eval_dataset=data.eval.examples if data.eval else None,
        data_collator=collator_for(cfg, tokenizer),
        processing_class=tokenizer,
        stop_flag=stop_flag,
    )
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step, once
    trainer.add_callback(RunCallback(trainer, tracker, cfg.early_stopping_patience))
    output = trainer.train()
    if stop_flag.is_set:
        last = {
            "eval_loss": _last_logged(trainer, "eval_loss"),
            "loss": _last_logged(trainer, "loss"),
        }
        raise Stopped({"train_steps": trainer.state.global_step, **last})

    metrics: dict[str, float] = {}
    if data.eval is not None:
        if trainer.last_eval_step != trainer.state.global_step:
            trainer.evaluate()
        metrics["eval_loss"] = _last_logged(trainer, "eval_loss")
        metrics["eval_tokens"] = _last_logged(trainer, "eval_tokens")
    runtime = output.metrics["train_runtime"]
    metrics |= {
        "train_loss": output.training_loss,
        "train_runtime": runtime,
        "train_steps": trainer.state.global_step,
        "train_tokens": trainer.train_tokens,
        "train_tokens_per_second": trainer.train_tokens / max(runtime, 1e-9),
        "epoch": trainer.state.epoch or 0.0,
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # eval_loss, train_loss and train_runtime were logged as they happened; once per step only.
    already_logged = {"eval_loss", "eval_tokens", "train_loss", "train_runtime", "epoch"}
    tracker.log_metrics(
        {k: v for k, v in metrics.items() if k not in already_logged}, trainer.state.global_step
    )

    if cfg.save_adapter:
        adapter_dir = Path(cfg.output_dir) / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        tracker.set_tags({"output.adapter_dir": str(adapter_dir)})
        log.info("adapter saved to %s", adapter_dir)
    return metrics


def _last_logged(trainer: Trainer, key: str) -> float:
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return float(entry[key])
    return float("nan")
