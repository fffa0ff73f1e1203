"""A conversion says how well the model survived (#21 item 4): a loud warning when its outputs disagree with dense,
the quality on held-out text with --eval, and an output check for models of a family we do not know."""

import json

import torch
from test_calibration import llama_with_tokenizer, write_text
from typer.testing import CliRunner

from blrdeploy.cli import app
from blrdeploy.measure import evaluate
from blrdeploy.models.outputs import AGREEMENT_COSINE, disagreement

runner = CliRunner()


def test_disagreement_is_said_below_the_threshold_only():
    assert disagreement(None) is None
    assert disagreement({"relative_error": 0.1, "cosine_similarity": 0.995}) is None
    said = disagreement({"relative_error": 1.2, "cosine_similarity": -0.35})
    assert said is not None and "cosine -0.35" in said and "--calibration" in said
    assert disagreement({"relative_error": 0.5, "cosine_similarity": AGREEMENT_COSINE - 1e-3}) is not None


def test_a_broken_conversion_warns_in_the_summary_and_the_json(tmp_path):
    """Seeded random weights at a low budget: the outputs disagree with dense, and the user is told."""
    args = ["convert", "gpt2-tiny", "--structure", "lowrank", "--params-ratio", "0.2", "-o", str(tmp_path / "c")]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "disagree with dense" in result.output
    result = runner.invoke(app, [*args, "--overwrite", "--json"])
    summary = json.loads(result.stdout)
    assert summary["output_agreement"]["cosine_similarity"] < AGREEMENT_COSINE
    assert len(summary["warnings"]) == 1 and "disagree with dense" in summary["warnings"][0]


def test_convert_eval_reports_held_out_quality_beside_dense(tmp_path):
    src = tmp_path / "hf"
    llama_with_tokenizer(src)
    held_out = write_text(tmp_path / "eval.jsonl", 600, seed=3)
    out = tmp_path / "c"
    args = ["convert", str(src), "-o", str(out), "--structure", "lowrank", "--params-ratio", "0.3"]
    result = runner.invoke(app, [*args, "--eval", str(held_out), "--eval-tokens", "256", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    cols = {c["name"]: c for c in summary["eval"]["columns"]}
    assert cols["dense"]["available"] and cols["converted"]["available"]
    assert summary["eval"]["tokens"] > 0 and 0 <= cols["converted"]["top1_agreement"] <= 1
    ratio = cols["converted"]["perplexity"] / cols["dense"]["perplexity"]
    warned = any("x dense's" in w for w in summary["warnings"])
    assert warned == (ratio > evaluate.PERPLEXITY_RATIO_WARN), (ratio, summary["warnings"])
    result = runner.invoke(app, [*args, "--overwrite", "--eval", str(held_out), "--eval-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "held-out text" in result.output and "perplexity" in result.output


def test_convert_eval_refuses_a_missing_text_before_converting(tmp_path):
    src = tmp_path / "hf"
    llama_with_tokenizer(src)
    out = tmp_path / "c"
    result = runner.invoke(app, ["convert", str(src), "-o", str(out), "--eval", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and result.output.strip().startswith("error: --eval") and not out.exists()
    assert len(result.output.strip().splitlines()) == 1


def test_a_model_of_an_unknown_family_gets_an_output_check_too(tmp_path):
    """A BERT encoder converted with --include: no family, yet its outputs are compared on seeded token ids."""
    # deferred: transformers takes seconds to import; only this test builds a model of a family we do not know
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    args = ["convert", str(tmp_path / "bert"), "-o", str(tmp_path / "c"), "--structure", "lowrank",
            "--include", "*.intermediate.dense", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    agree = json.loads(result.stdout)["output_agreement"]
    assert agree is not None and -1 <= agree["cosine_similarity"] <= 1 and agree["relative_error"] > 0
