"""Two CPU processes (gloo, launched with torchrun) train exactly like one process holding both halves of each
batch, replicated (DDP) or sharded (FSDP2); FSDP saves the same adapter, and resumes exactly.

One torchrun launch per objective runs every distributed training of that objective in sequence
(process start-up dominates the cost): DDP; FSDP with gradient checkpointing; FSDP stopped after
one step, resumed, and resumed again from the same checkpoint under DDP.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_files import write_training_files

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.training import load_config, train
from llm2vec_fast.training.loss_log import read_log

# Records what FSDP shards (class, local and full parameter counts) and counts the attention calls
# of the sharded layers (gradient checkpointing runs each layer's forward again in backward).
WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
import llm2vec_fast.training.distributed_strategy as distributed_strategy
from llm2vec_fast.training import load_config, train
from llm2vec_fast.training.process_group import shutdown

sharded, forwards = [], [0]
original = distributed_strategy.fully_shard
if os.environ["WORLD_SIZE"] == "1":  # alone (one GPU): join a group of one, so that FSDP still shards (over 1)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

def recording_fully_shard(module, **options):
    name, full = type(module).__name__, sum(p.numel() for p in module.parameters())
    result = original(module, **options)
    local = sum(p.to_local().numel() for p in module.parameters())
    sharded.append({"cls": name, "local": local, "full": full})
    if name.endswith("DecoderLayer"):
        module.self_attn.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    return result

distributed_strategy.fully_shard = recording_fully_shard
for index, (objective, settings) in enumerate(json.loads(sys.argv[1])):
    sharded.clear()
    forwards[0] = 0
    result = train(load_config(objective, None, settings))
    if os.environ["RANK"] == "0":
        report = {"losses": result.losses, "sharded": sharded, "layer_forwards": forwards[0]}
        (result.output_dir / f"report{index}.json").write_text(json.dumps(report))
shutdown()
"""
TEXTS = ["A man is playing a guitar.", "Paris is the capital of France.", "Padding tokens should cost nothing."]
STEPS, LAYERS = 3, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = write_training_files(
        tmp_path_factory.mktemp("distributed"),
        "mistral",
        seed=2,
        text_lines=50,
        sentences_per_line=2,
        datasets={"a": 17, "b": 30},
        negatives=2,
    )
    (root / "worker.py").write_text(WORKER)
    return root


def _settings(objective, files, output, batch, **changes):
    data = files / ("sup" if objective == "supervised" else "text.txt")
    settings = dict(
        model_name_or_path=str(files / "model"),
        train_files=[str(data)],
        output_dir=str(output),
        per_device_train_batch_size=batch,
        max_steps=STEPS,
        save_steps=100,
        max_seq_length=40,
        learning_rate=1e-3,
        lora_dropout=0.0,
        torch_dtype="float32",
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_grad_norm=0.05,
    )
    if objective == "mntp":  # also a trained LM head (a root-level FSDP weight) and two micro-batches per step
        settings.update(data_layout="lines", lm_head="train", gradient_accumulation_steps=2)
    return {**settings, **changes}


def _launch(runs, files, processes=2):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("WORLD_SIZE", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        str(files / "worker.py"),
        json.dumps(runs),
    ]
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]


def _report(directory, index):
    return json.loads((directory / f"report{index}.json").read_text())


def _assert_close_weights(ours, reference, rtol):
    assert ours.keys() == reference.keys() and ours
    for name, tensor in reference.items():
        assert torch.isfinite(ours[name]).all(), name
        assert float((ours[name] - tensor).norm()) <= rtol * float(tensor.norm()) + 1e-7, name


def _encode(model):
    return model.encode(TEXTS, batch_size=2, show_progress_bar=False, convert_to_tensor=True)


@pytest.mark.parametrize("objective", ["mntp", "supervised"])
def test_ddp_and_fsdp_on_two_processes_equal_one_process_on_the_concatenated_batch(files, tmp_path, objective):
    fsdp = dict(distributed_strategy="fsdp", gradient_checkpointing=True)
    runs = [
        (objective, _settings(objective, files, tmp_path / "ddp", 2)),
        (objective, _settings(objective, files, tmp_path / "fsdp", 2, **fsdp)),
        (objective, _settings(objective, files, tmp_path / "split", 2, stop_after_steps=1, **fsdp)),
        (objective, _settings(objective, files, tmp_path / "split", 2, resume_from_checkpoint="latest", **fsdp)),
        (
            objective,
            _settings(
                objective,
                files,
                tmp_path / "split",
                2,
                gradient_checkpointing=True,
                resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-1"),
            ),
        ),
    ]
    _launch(runs, files)
    # One process, global batch: the reference. "fsdp" without a process group trains unsharded, and says so.
    with pytest.warns(UserWarning, match="nothing to shard"):
        single = train(
            load_config(
                objective, None, _settings(objective, files, tmp_path / "single", 4, distributed_strategy="fsdp")
            )
        )
    ddp, sharded = _report(tmp_path / "ddp", 0), _report(tmp_path / "fsdp", 1)
    assert len(single.losses) == STEPS and all(np.isfinite(single.losses))
    assert np.allclose(ddp["losses"], single.losses, rtol=1e-5, atol=0), (ddp["losses"], single.losses)
    assert np.allclose(sharded["losses"], ddp["losses"], rtol=1e-6, atol=0), (sharded["losses"], ddp["losses"])
    # The same gradients: their global norm (logged before clipping, which it exceeds) agrees too.
    norms = {
        run: [row["grad_norm"] for row in read_log(tmp_path / run / "loss_log.jsonl")]
        for run in ("single", "ddp", "fsdp")
    }
    assert np.allclose(norms["ddp"], norms["single"], rtol=1e-5, atol=0), norms
    assert np.allclose(norms["fsdp"], norms["ddp"], rtol=1e-5, atol=0), norms
    assert len(norms["fsdp"]) == STEPS and max(norms["fsdp"]) > 0.05

    # FSDP really sharded: every decoder layer, then the root, each process holding about half of each.
    assert ddp["sharded"] == []
    names = [entry["cls"] for entry in sharded["sharded"]]
    assert len(names) == LAYERS + 1 and all(n.endswith("DecoderLayer") for n in names[:-1]), names
    assert names[-1] in ("MaskedNextTokenModel", "SentenceEmbedder")
    for entry in sharded["sharded"]:
        assert entry["full"] // 2 <= entry["local"] <= entry["full"] // 2 + 64, entry
    # ... with gradient checkpointing on: each layer's forward ran again in the backward pass.
    micro_batches = STEPS * (2 if objective == "mntp" else 1)
    assert sharded["layer_forwards"] == 2 * LAYERS * micro_batches

    # Resume under FSDP (and the FSDP checkpoint under DDP) continues with identical losses.
    assert _report(tmp_path / "split", 2)["losses"] == sharded["losses"][:1]
    assert _report(tmp_path / "split", 3)["losses"] == sharded["losses"][1:]
    assert np.allclose(_report(tmp_path / "split", 4)["losses"], sharded["losses"][1:], rtol=1e-6, atol=0)

    # The FSDP adapter (gathered from shards) equals the DDP one, and both the one-process adapter.
    adapter = "adapter_model.safetensors"
    reference = load_file(str(tmp_path / "single" / adapter))
    # Adam divides by sqrt(v): float32 reduction-order differences in near-zero gradients grow a little
    _assert_close_weights(load_file(str(tmp_path / "ddp" / adapter)), reference, rtol=1e-3)
    _assert_close_weights(
        load_file(str(tmp_path / "fsdp" / adapter)), load_file(str(tmp_path / "ddp" / adapter)), rtol=1e-5
    )
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in reference.items())  # it trained
    if objective == "mntp":
        heads = [load_file(str(tmp_path / run / "lm_head.safetensors")) for run in ("ddp", "fsdp")]
        _assert_close_weights(*heads, rtol=1e-5)
    else:
        # ... and it loads with LLM2Vec.from_pretrained like the DDP one.
        model = str(files / "model")
        base = _encode(LLM2Vec.from_pretrained(model))
        from_fsdp = _encode(LLM2Vec.from_pretrained(model, peft_model_name_or_path=str(tmp_path / "fsdp")))
        from_ddp = _encode(LLM2Vec.from_pretrained(model, peft_model_name_or_path=str(tmp_path / "ddp")))
        torch.testing.assert_close(from_fsdp, from_ddp, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(from_fsdp, base, atol=1e-5)

    # A run of two processes cannot resume in one.
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this run has 1"):
        train(
            load_config(
                objective,
                None,
                _settings(
                    objective,
                    files,
                    tmp_path / "split",
                    2,
                    **fsdp,
                    resume_from_checkpoint="latest",
                    max_steps=STEPS + 1,
                ),
            )
        )


@pytest.mark.parametrize(
    "variable, strategy, message",
    [
        ("ACCELERATE_USE_FSDP", "ddp", "configured for FSDP but distributed_strategy is 'ddp'"),
        ("ACCELERATE_USE_DEEPSPEED", "fsdp", "configured for DeepSpeed"),
    ],
)
def test_accelerate_settings_the_trainer_would_ignore_are_refused(
    files, tmp_path, monkeypatch, variable, strategy, message
):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=message):
        train(load_config("mntp", None, _settings("mntp", files, tmp_path, 2, distributed_strategy=strategy)))


def test_unknown_strategy_is_rejected(files, tmp_path):
    with pytest.raises(ValueError, match=r"'distributed_strategy' must be one of 'ddp', 'fsdp', got 'zero3'"):
        load_config("mntp", None, _settings("mntp", files, tmp_path, 2, distributed_strategy="zero3"))


@pytest.mark.gpu
def test_fsdp_in_bfloat16_on_cuda_tracks_unsharded_training_and_resumes(files, tmp_path):
    processes = min(2, torch.cuda.device_count())
    gpu = dict(device="cuda", torch_dtype="bfloat16", gradient_checkpointing=True, max_steps=4)
    fsdp = dict(distributed_strategy="fsdp", **gpu)
    _launch(
        [
            ("mntp", _settings("mntp", files, tmp_path / "fsdp", 2, **fsdp)),
            ("mntp", _settings("mntp", files, tmp_path / "split", 2, stop_after_steps=2, **fsdp)),
            ("mntp", _settings("mntp", files, tmp_path / "split", 2, resume_from_checkpoint="latest", **fsdp)),
        ],
        files,
        processes,
    )
    reference = train(load_config("mntp", None, _settings("mntp", files, tmp_path / "single", 2 * processes, **gpu)))
    sharded = _report(tmp_path / "fsdp", 0)
    assert len(sharded["sharded"]) == LAYERS + 1 and all(np.isfinite(sharded["losses"]))
    # bf16 compute of the LoRA matmuls under FSDP's mixed precision (fp32 under plain training)
    assert np.allclose(sharded["losses"], reference.losses, rtol=2e-2, atol=0), (sharded["losses"], reference.losses)
    resumed = _report(tmp_path / "split", 1)["losses"] + _report(tmp_path / "split", 2)["losses"]
    assert np.allclose(resumed, sharded["losses"], rtol=1e-3, atol=0), (resumed, sharded["losses"])
    weights = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
