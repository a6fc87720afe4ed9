"""Training throughput: the lorasweep trainer against the plain transformers + peft setups a
user would pick.

Every arm trains the same LoRA adapter on the same randomly initialised Llama-style model (with
Llama 3's 128,256-token output head by default), the same tokenized
examples (long-tailed lengths, like real instruction data), batch size, steps and learning rate:
  naive           transformers' Trainer, its padding collator, random order
  group_by_length the same with train_sampling_strategy="group_by_length" (batches of similar
                  lengths)
  padding_free    the same with DataCollatorWithFlattening (one row, no padding)
  lorasweep       the trainer's own LoraTrainer: verified packing and the output head run
                  only where a label is
Throughput counts real (non-padding) tokens only, over the training loop alone (not model
loading); the headline ratio is lorasweep's against the best of the three baselines.

The arms alternate over several rounds. Wall-clock figures keep each arm's best round; the CPU
time figures (seconds the process computed) barely move when other programs share the machine,
so their ratio is the steadier one on a busy host. Prints one JSON line.

    python bench/trainer_throughput.py                      # CPU, about 4 minutes on 2 cores
    python bench/trainer_throughput.py --hidden-size 2048 --layers 16 --bf16 --steps 30 \\
        --batch-size 16 --attn flash_attention_2 --peak-tflops 989   # GPU, ~1B model, with MFU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PrinterCallback,
    Trainer,
    TrainerCallback,
)

from lora_trainer import tiny
from lora_trainer.config import TrainConfig
from lora_trainer.data import Example, encode_all, parse_record
from lora_trainer.stopping import StopFlag
from lora_trainer.train import (
    LoraTrainer,
    collator_for,
    hf_arguments,
    load_model,
    load_tokenizer,
    real_tokens,
)


def long_tailed_dataset(n: int, seed: int, median_numbers: int, max_numbers: int) -> list[dict]:
    rng = random.Random(seed)
    lengths = [
        min(max_numbers, max(1, round(rng.lognormvariate(0, 0.9) * median_numbers)))
        for _ in range(n)
    ]
    return [tiny.toy_example(rng, length=length) for length in lengths]


class CountingTrainer(Trainer):
    """The baseline, unchanged but for counting the tokens it trains on."""

    train_tokens = 0
    padded_tokens = 0

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.padded_tokens += inputs["input_ids"].numel()
        self.train_tokens += real_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


class LoopTimer(TrainerCallback):
    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


BASELINES = ("naive", "group_by_length", "padding_free")
ARMS = (*BASELINES, "lorasweep")


def run_arm(name: str, cfg: TrainConfig, examples: list[Example]) -> dict[str, float]:
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    args = hf_arguments(cfg, has_eval=False)
    if name == "group_by_length":
        args.train_sampling_strategy = "group_by_length"
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": examples,
        "processing_class": tokenizer,
    }
    if name == "lorasweep":
        trainer: Any = LoraTrainer(stop_flag=StopFlag(), **common)
        trainer.data_collator = collator_for(cfg, tokenizer, trainer.model, examples, None)
    elif name == "padding_free":
        trainer = CountingTrainer(data_collator=DataCollatorWithFlattening(), **common)
    else:
        trainer = CountingTrainer(
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), **common
        )
    trainer.remove_callback(PrinterCallback)  # stdout carries the JSON line only
    timer = LoopTimer()
    trainer.add_callback(timer)
    output = trainer.train()
    result = {
        "tokens_per_second": trainer.train_tokens / timer.wall,
        "tokens_per_cpu_second": trainer.train_tokens / timer.cpu,
        "train_loss": output.training_loss,
    }
    if name != "lorasweep":
        result["padding_fraction"] = 1 - trainer.train_tokens / trainer.padded_tokens
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--vocab-size", type=int, default=128256, help="rows of the output head (Llama 3's)"
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--median-numbers", type=int, default=40, help="median response length")
    parser.add_argument("--max-numbers", type=int, default=400)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast (GPU)")
    parser.add_argument("--peak-tflops", type=float, help="device peak, to report MFU")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build_model(
            Path(tmp) / "model",
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=max(4, args.hidden_size // 64),
        )
        # The toy tokenizer knows few tokens; a real model's head is as wide as its vocabulary.
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
        model.save_pretrained(model_dir)
        rows = long_tailed_dataset(
            args.steps * args.batch_size, 0, args.median_numbers, args.max_numbers
        )
        cfg = TrainConfig(
            model_name_or_path=str(model_dir),
            train_file=str(tiny.write_jsonl(Path(tmp) / "train.jsonl", rows)),
            val_size=0,
            template="alpaca",
            cutoff_len=2048,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-3,
            lora_rank=16,
            logging_steps=args.steps,
            save_adapter=False,
            output_dir=str(Path(tmp) / "out"),
            torch_dtype="bfloat16" if args.bf16 else "float32",
            attn_implementation=args.attn,
            bf16=args.bf16,
        )
        tokenizer = load_tokenizer(cfg)
        conversations = [parse_record(row, f"row {i}") for i, row in enumerate(rows)]
        examples = encode_all(conversations, "alpaca", tokenizer, cfg.cutoff_len).examples
        lengths = [len(example["input_ids"]) for example in examples]
        parameters = sum(p.numel() for p in load_model(cfg).base_model.model.parameters())

        rounds = []
        for index in range(args.rounds):
            order = ARMS if index % 2 == 0 else tuple(reversed(ARMS))
            rounds.append({name: run_arm(name, cfg, examples) for name in order})

    def best(arm: str) -> dict[str, float]:
        return max((r[arm] for r in rounds), key=lambda m: m["tokens_per_second"])

    arms = {name: best(name) for name in ARMS}
    strongest = max(BASELINES, key=lambda name: arms[name]["tokens_per_second"])
    base, ours = arms[strongest], arms["lorasweep"]
    cpu_ratios = [
        r["lorasweep"]["tokens_per_cpu_second"]
        / max(r[name]["tokens_per_cpu_second"] for name in BASELINES)
        for r in rounds
    ]
    result: dict[str, Any] = {
        "bench": "trainer_throughput",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "model_parameters": parameters,
        "dtype": "bfloat16" if args.bf16 else "float32",
        "attn": args.attn,
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "tokens_per_example_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_per_example_max": max(lengths),
        "vocab_size": args.vocab_size,
        **{f"{name}_tokens_per_s": round(arms[name]["tokens_per_second"], 1) for name in ARMS},
        **{
            f"{name}_padding_fraction": round(arms[name]["padding_fraction"], 3)
            for name in BASELINES
        },
        "strongest_baseline": strongest,
        # lorasweep against the best of the baselines, by wall clock and by CPU time.
        "speedup": round(ours["tokens_per_second"] / base["tokens_per_second"], 2),
        "speedup_cpu_time": round(statistics.median(cpu_ratios), 2),
        "speedup_cpu_time_per_round": [round(ratio, 2) for ratio in cpu_ratios],
        # Same examples (group_by_length reorders them): close losses show the arms train alike.
        **{f"{name}_train_loss": round(arms[name]["train_loss"], 4) for name in ARMS},
    }
    if args.peak_tflops:
        # LoRA skips weight gradients of the frozen base: about 4 FLOPs per parameter and token.
        for arm in ARMS:
            flops = 4 * parameters * result[f"{arm}_tokens_per_s"]
            result[f"{arm}_mfu"] = round(flops / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
