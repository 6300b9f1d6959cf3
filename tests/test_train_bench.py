"""benchmarks/bench_train.py on CPU at toy width: both methods compute the same loss and train; no GPU, no numbers."""

import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).parents[1] / "benchmarks" / "bench_train.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
TOY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=500,
    sliding_window=None,
)


def _lora_b(stepper):
    return torch.cat([p.detach().flatten().float() for n, p in stepper.module.named_parameters() if "lora_B" in n])


@pytest.mark.parametrize("workload", ["mntp", "simcse"])
def test_benchmark_methods_agree_and_train(workload, monkeypatch):
    monkeypatch.setattr(bench, "MASK_TOKEN_ID", 7)
    if workload == "mntp":
        steppers = bench.mntp_steppers(2, "cpu", TOY)
        batch = check = bench.mntp_batch(bench.length_mix(6, 20, 4, 40, 0), 500, 0)
    else:
        steppers = bench.simcse_steppers(2, "cpu", TOY)
        batch = bench.simcse_batch(bench.length_mix(6, 10, 3, 20, 0), 500, 0)
        check = bench.simcse_batch(bench.length_mix(6, 10, 3, 20, 0), 500, 0, shift_positives=True)
    ours, sdpa = steppers["llm2vec_fast"].loss(check), steppers["hf_sdpa"].loss(check)
    assert ours > 1e-3 and abs(ours - sdpa) / sdpa < 2e-2  # bf16 weights
    before = _lora_b(steppers["llm2vec_fast"])
    steppers["llm2vec_fast"].step(batch)
    assert not torch.equal(before, _lora_b(steppers["llm2vec_fast"]))


def test_benchmark_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--layers", "1"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
