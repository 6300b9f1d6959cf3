"""The CLI end to end on a tiny model: MNTP -> SimCSE -> encode, and supervised -> encode, with the adapters
loaded by ``LLM2Vec.from_pretrained`` and embedding exactly as the trained model did."""

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from training_files import write_training_files

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.training import load_config
from llm2vec_fast.training.cli import main
from llm2vec_fast.training.data.batches import ContrastiveBatch
from llm2vec_fast.training.data.sources import tokenize_for_embedding
from llm2vec_fast.training.loss_log import moving_average, plot_losses, read_log
from llm2vec_fast.training.modeling import build_embedder, decoder_spec, load_tokenizer

TEXTS = ["A man is playing a guitar.", "Paris is the capital of France.", "Padding tokens should cost nothing."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_training_files(
        tmp_path_factory.mktemp("cli"), "qwen2", seed=3, text_lines=40, sentences_per_line=2, datasets={"fever": 16}
    )


COMMON = [
    "--max-steps",
    "3",
    "--save-steps",
    "2",
    "--max-seq-length",
    "32",
    "--learning-rate",
    "1e-3",
    "--torch-dtype",
    "float32",
    "--disable-tqdm",
]


def _encode(model, texts):
    return model.encode(texts, batch_size=2, show_progress_bar=False, convert_to_tensor=True)


def test_mntp_then_simcse_then_encode(files, tmp_path, capfd):
    model = str(files / "model")
    mntp, simcse = tmp_path / "mntp", tmp_path / "simcse"
    assert (
        main(
            [
                "mntp",
                "--config",
                "mntp-llama",
                "--model",
                model,
                "--data",
                str(files / "text.txt"),
                "--output",
                str(mntp),
                "--per-device-train-batch-size",
                "4",
                *COMMON,
            ]
        )
        == 0
    )
    assert (
        (mntp / "adapter_model.safetensors").is_file()
        and (mntp / "checkpoint-2").is_dir()
        and (mntp / "loss.png").is_file()
    )
    assert len((mntp / "loss_log.csv").read_text().splitlines()) == 4
    losses = [row["loss"] for row in read_log(mntp / "loss_log.jsonl")]
    captured = capfd.readouterr()  # where it writes, then the final metrics; no transformers bars or reports
    assert f"mntp: checkpoints, loss_log.csv and loss.png go to {mntp}\n" in captured.out
    err = captured.err
    assert err.endswith(
        f"llm2vec-fast train mntp: final loss {losses[-1]:.4f} (mean of the last 1 steps {losses[-1]:.4f}); "
        f"adapter, checkpoints and loss.png in {mntp}\n"
    )
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert (
        main(
            [
                "simcse",
                "--model",
                model,
                "--peft-model-name-or-path",
                str(mntp),
                "--data",
                str(files / "text.txt"),
                "--output",
                str(simcse),
                "--per-device-train-batch-size",
                "4",
                *COMMON,
            ]
        )
        == 0
    )
    settings = json.loads((simcse / "llm2vec_config.json").read_text())
    assert settings["pooling_mode"] == "mean" and settings["max_length"] == 32

    base = LLM2Vec.from_pretrained(model)
    with_mntp = LLM2Vec.from_pretrained(model, peft_model_name_or_path=str(mntp), merge_peft=True)
    assert not torch.allclose(_encode(base, TEXTS), _encode(with_mntp, TEXTS), atol=1e-4)  # the MNTP adapter is applied
    converted = LLM2Vec(PeftModel.from_pretrained(with_mntp.model, str(simcse)), with_mntp.tokenizer, **settings)
    embeddings = _encode(converted, TEXTS)
    # As with the official MNTP repositories, the MNTP output directory serves as the base model.
    official_style = LLM2Vec.from_pretrained(str(mntp), peft_model_name_or_path=str(simcse))
    torch.testing.assert_close(_encode(official_style, TEXTS), embeddings, rtol=1e-5, atol=1e-6)
    # The SimCSE adapter names the MNTP directory as its base, so it also loads on its own.
    assert json.loads((simcse / "adapter_config.json").read_text())["base_model_name_or_path"] == str(mntp)
    torch.testing.assert_close(_encode(LLM2Vec.from_pretrained(str(simcse)), TEXTS), embeddings, rtol=1e-5, atol=1e-6)

    # The trained model itself (base + merged MNTP + SimCSE LoRA) embeds the same texts identically.
    config = load_config(
        "simcse",
        None,
        dict(
            model_name_or_path=model,
            peft_model_name_or_path=str(mntp),
            train_files=["unused"],
            output_dir=str(tmp_path / "unused"),
            torch_dtype="float32",
            simcse_dropout=0.0,
        ),
    )
    tokenizer = load_tokenizer(model)
    trained = build_embedder(
        decoder_spec(config, torch.device("cpu")),
        tokenizer,
        pooling_mode=config.pooling_mode,
        skip_instruction=config.skip_instruction,
    )
    set_peft_model_state_dict(trained.decoder, load_file(str(simcse / "adapter_model.safetensors")))
    ids, instruction_lengths = tokenize_for_embedding(tokenizer, [("", t) for t in TEXTS], max_length=32)
    with torch.no_grad():
        expected = trained.eval()(ContrastiveBatch(ids, instruction_lengths, num_queries=1))
    assert embeddings.shape == (3, 64) and torch.isfinite(embeddings).all()
    assert torch.allclose(embeddings, expected, rtol=1e-4, atol=1e-5)


def test_supervised_then_encode_with_instructions(files, tmp_path):
    model, output = str(files / "model"), tmp_path / "supervised"
    assert (
        main(
            [
                "supervised",
                "--model",
                model,
                "--data",
                str(files / "sup"),
                "--output",
                str(output),
                "--per-device-train-batch-size",
                "4",
                "--warmup-steps",
                "0",
                "--pooling-mode",
                "weighted_mean",
                "--instructions",
                json.dumps({"fever": "Given a claim, retrieve documents"}),
                *COMMON,
            ]
        )
        == 0
    )
    loaded = LLM2Vec.from_pretrained(model, peft_model_name_or_path=str(output))
    assert loaded.pooling_mode == "weighted_mean"
    pairs = [["Given a claim, retrieve documents", TEXTS[0]], ["", TEXTS[1]]]
    embeddings = _encode(loaded, pairs)
    base = _encode(LLM2Vec.from_pretrained(model, pooling_mode="weighted_mean"), pairs)
    assert torch.isfinite(embeddings).all() and not torch.allclose(embeddings, base, atol=1e-4)


def test_cli_reports_bad_data_before_training(files, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nq.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": "q"\n')
    assert (
        main(
            [
                "supervised",
                "--model",
                str(files / "model"),
                "--data",
                str(bad),
                "--output",
                str(tmp_path / "o"),
                *COMMON,
            ]
        )
        == 2
    )
    assert f"error: {bad / 'nq.jsonl'}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "loss_log.csv").exists()


def test_moving_average_is_the_mean_of_each_window():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    expected = [sum(values[max(0, i - 2) : i + 1]) / len(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert moving_average(values, 3) == pytest.approx(expected)
    assert moving_average(values, 1) == values


def test_loss_plot_shows_loss_smoothed_learning_rate_and_grad_norm(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: drawn.append(figure) or save(figure, *a, **k)
    )
    rows = [
        {
            "step": s,
            "loss": 2.0 / s,
            "grad_norm": 1.0 + s % 3,
            "learning_rate": 1e-4 * s / 40,
            "tokens": 100,
            "loss_terms": 10,
            "seconds": 0.1,
        }
        for s in range(1, 41)
    ]
    path = plot_losses(rows, tmp_path / "loss.png", "mntp run my-run (tiny)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = drawn
    loss_axis, lr_axis, norm_axis = figure.axes
    assert [a.get_ylabel() for a in figure.axes] == ["loss", "learning rate", "grad norm"]
    raw, smoothed = loss_axis.get_lines()
    assert list(raw.get_ydata()) == [r["loss"] for r in rows]
    assert list(smoothed.get_ydata()) == pytest.approx(moving_average([r["loss"] for r in rows], 2))
    assert list(lr_axis.get_lines()[0].get_ydata()) == [r["learning_rate"] for r in rows]
    assert list(norm_axis.get_lines()[0].get_ydata()) == [r["grad_norm"] for r in rows]
    assert figure._suptitle.get_text().startswith("mntp run my-run (tiny)\nstep 40, loss 0.0500, 4,000 tokens")
