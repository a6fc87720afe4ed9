"""The lorasweep command, and the examples it renders."""

from __future__ import annotations

import io
import json

import yaml

from sweep_operator.api import ModelShape
from sweep_operator.cli import main
from sweep_operator.crd import crd_yaml
from tests.unit.sweep_helpers import EXAMPLE


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


def test_render_the_example():
    code, text = run("render", str(EXAMPLE))
    assert code == 0
    jobs = list(yaml.safe_load_all(text))
    assert [j["metadata"]["name"] for j in jobs] == [f"rank-lr-{i:04d}" for i in range(6)]
    assert {j["metadata"]["namespace"] for j in jobs} == {"llm-training"}
    params = [j["metadata"]["annotations"]["lorasweep.io/parameters"] for j in jobs]
    assert len(set(params)) == 6
    [c] = jobs[0]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/lorasweep-trainer:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--set" in c["args"] and "lora_rank=8" in c["args"]


def test_render_limit(tmp_path):
    code, text = run("render", str(EXAMPLE), "--limit", "2")
    assert code == 0 and len(list(yaml.safe_load_all(text))) == 2


def test_render_reports_an_invalid_sweep(tmp_path, capsys):
    sweep = yaml.safe_load(EXAMPLE.read_text())
    sweep["spec"]["parameters"]["lora_rnak"] = {"values": [4]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, text = run("render", str(path))
    assert (code, text) == (1, "")
    assert capsys.readouterr().err == (
        "lorasweep: HyperparameterSweep rank-lr is invalid:\n"
        "  spec.parameters.lora_rnak: 'lora_rnak' is not a setting of the bundled trainer; "
        "did you mean lora_rank?\n"
    )


def test_render_without_a_sweep(tmp_path, capsys):
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\n")
    assert run("render", str(path))[0] == 1
    assert "no HyperparameterSweep in the file" in capsys.readouterr().err


def test_crds_prints_the_crd():
    assert run("crds") == (0, crd_yaml())


def test_render_the_tpe_example():
    """TPE's first trials, derived lora_alpha included, as `lorasweep render` shows them."""
    code, text = run("render", str(EXAMPLE.with_name("tpe-sweep.yaml")), "--limit", "3")
    assert code == 0
    jobs = list(yaml.safe_load_all(text))
    assert [j["metadata"]["name"] for j in jobs] == [f"rank-lr-tpe-{i:04d}" for i in range(3)]
    for job in jobs:
        params = json.loads(job["metadata"]["annotations"]["lorasweep.io/parameters"])
        assert params["lora_alpha"] == 2 * params["lora_rank"]
        assert 1e-5 <= params["learning_rate"] <= 1e-3
        assert params["lora_rank"] % 4 == 0


def test_render_names_the_trials_tpe_proposes_instead_of_inventing_them(capsys):
    startup, max_trials = 8, 40  # examples/tpe-sweep.yaml
    code, text = run("render", str(EXAMPLE.with_name("tpe-sweep.yaml")))
    assert code == 0
    names = [j["metadata"]["name"] for j in yaml.safe_load_all(text)]
    assert names == [f"rank-lr-tpe-{i:04d}" for i in range(startup)]
    assert capsys.readouterr().err == (
        f"lorasweep: rank-lr-tpe: trials {startup} to {max_trials - 1} ({max_trials - startup}) "
        "are not rendered: tpe proposes their parameters from the results of earlier trials "
        "while the sweep runs\n"
    )


def test_render_prints_the_service_of_multi_node_trials(tmp_path):
    sweep = yaml.safe_load(EXAMPLE.read_text())
    trainer = sweep["spec"]["trainer"]
    trainer.update(gpus=8, nodes=2, resources={"limits": {"nvidia.com/gpu": 8}})
    path = tmp_path / "multi-node.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, text = run("render", str(path), "--limit", "2")
    assert code == 0
    service, *jobs = yaml.safe_load_all(text)
    assert (service["kind"], service["metadata"]["name"]) == ("Service", "rank-lr-trials")
    assert [j["kind"] for j in jobs] == ["Job", "Job"]
    assert {j["spec"]["template"]["spec"]["subdomain"] for j in jobs} == {"rank-lr-trials"}


def test_render_the_gpu_example():
    """examples/gpu-sweep.yaml: QLoRA trials of 2 GPUs each, checkpointing to a PVC."""
    code, text = run("render", str(EXAMPLE.with_name("gpu-sweep.yaml")))
    assert code == 0
    jobs = list(yaml.safe_load_all(text))
    assert [j["metadata"]["name"] for j in jobs] == [f"qlora-8b-{i:04d}" for i in range(8)]
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        [c] = pod["containers"]
        assert c["command"][:3] == ["python", "-m", "lora_trainer.launch"]
        assert "--nproc-per-node=2" in c["command"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert "quantization_bit=4" in c["args"]
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/checkpoints"]
        assert mount["subPath"] == job["metadata"]["name"]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == "lorasweep-checkpoints"
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert [r["action"] for r in rules] == ["Ignore", "FailJob"]
    # Batch 4 is over spec.constraints.maxGpuMemoryGiB: its draws were drawn again.
    params = [json.loads(j["metadata"]["annotations"]["lorasweep.io/parameters"]) for j in jobs]
    assert {p["per_device_train_batch_size"] for p in params} == {1, 2}
    assert all(
        p["gradient_accumulation_steps"] * p["per_device_train_batch_size"] == 16 for p in params
    )


def test_model_shape_prints_what_spec_constraints_model_takes(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, text = run("model-shape", str(tmp_path))
    assert code == 0
    shape = yaml.safe_load(text)["model"]
    assert shape == {
        "hiddenSize": 2048,
        "numHiddenLayers": 16,
        "intermediateSize": 8192,
        "numAttentionHeads": 32,
        "vocabSize": 128256,
        "numKeyValueHeads": 8,
        "tieWordEmbeddings": True,
        "dtype": "bfloat16",
    }
    assert ModelShape.model_validate(shape).hidden_size == 2048


def test_model_shape_of_a_config_without_the_sizes(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    assert run("model-shape", str(tmp_path / "config.json"))[0] == 1
    assert "has no hidden_size, num_hidden_layers" in capsys.readouterr().err
