"""Roofline predictions: the modeled FLOPs equal the layers' own counts, fused paths move fewer bytes than the
PyTorch reference, and the command writes its table, JSON and figure on a CPU."""

import json

import pytest
from typer.testing import CliRunner

from blrdeploy.cli import app
from blrdeploy.conversion.checkpoint import blr_layers, blr_module
from blrdeploy.kernels import dispatch
from blrdeploy.measure import devices, roofline

runner = CliRunner()
LAYERS = [
    {"name": "a", "structure": "blast", "in_features": 512, "out_features": 768, "num_blocks": [4, 2], "rank": 64,
     "bias": True},
    {"name": "a8", "structure": "blast", "in_features": 512, "out_features": 768, "num_blocks": [8, 2], "rank": 64,
     "bias": True},  # b_out 8: staged above 64 tokens
    {"name": "b", "structure": "monarch", "in_features": 512, "out_features": 768, "num_blocks": 4, "rank": 64,
     "bias": False},
    {"name": "c", "structure": "lowrank", "in_features": 512, "out_features": 768, "num_blocks": None, "rank": 48,
     "bias": False},
]  # fmt: skip


@pytest.mark.parametrize("layer", LAYERS, ids=lambda entry: entry["name"])
@pytest.mark.parametrize("n", [1, 64, 65, 1000])
def test_modeled_flops_are_the_layers_own(layer, n):
    module = blr_module(layer)
    for path in ("pytorch", "kernels"):
        assert sum(s.flops for s in roofline.stages(layer, path, n)) == module.flops(n), path
    assert sum(s.flops for s in roofline.stages(layer, "dense", n)) == 2 * n * 512 * 768
    kernels = sum(s.bytes for s in roofline.stages(layer, "kernels", n))
    pytorch = sum(s.bytes for s in roofline.stages(layer, "pytorch", n))
    assert kernels <= pytorch
    if layer["structure"] != "lowrank":
        assert kernels < pytorch  # an intermediate pass saved
    assert blr_layers  # the checkpoint's layer entries are what predict() takes


def test_prediction_is_memory_bound_at_one_token_and_scales_with_the_device():
    h100, jetson = devices.get("h100"), devices.get("jetson")
    rows = roofline.predict(LAYERS + [dict(LAYERS[0], name="a2")], h100, [1, 4096])
    assert [r.count for r in rows[:3]] == [2, 1, 1] and {r.tokens for r in rows} == {1, 4096}
    one = rows[0]
    assert one.seconds["dense"] == pytest.approx(one.bytes["dense"] / (h100.bandwidth_gbs * 1e9))
    slow = roofline.predict(LAYERS, jetson, [1])[0]
    assert slow.seconds["dense"] / one.seconds["dense"] == pytest.approx(h100.bandwidth_gbs / jetson.bandwidth_gbs)
    totals = roofline.totals(rows)
    assert totals[1]["speedup_kernels"] > 1  # fewer weight bytes than dense


def test_model_report_from_python():
    """roofline.model_report, what the command calls: a built-in model's plan predicted on a device profile."""
    report = roofline.model_report("gpt2-tiny", devices.get("h100"), tokens=[1, 7])
    assert {r.tokens for r in report.rows} == {1, 7} and set(report.totals) == {1, 7}
    assert report.measured_on is None and all(t["measured"] is None for t in report.totals.values())
    assert report.to_json()["target"]["name"] == "h100" and report.to_json()["model"] == "gpt2-tiny"
    with pytest.raises(ValueError, match="--tokens must be positive"):
        roofline.model_report("gpt2-tiny", "h100", tokens=[0])


def test_roofline_command_table_json_png(tmp_path):
    png = tmp_path / "r.png"
    result = runner.invoke(app, ["roofline", "llama-tiny", "--target", "jetson", "--json", "--png", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["target"]["name"] == "jetson" and {r["tokens"] for r in data["rows"]} == {1, 1024}
    assert set(data["totals"]) == {"1", "1024"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["roofline", "gpt2-tiny", "--target", "a40", "--structure", "monarch",
                                 "--tokens", "1,7"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "predicted speedup" in result.output and "N=7" in result.output
    for args, message in [
        (["llama-tiny", "--target", "tpu"], "unknown target"),
        (["llama-tiny", "--target", "h100", "--tokens", "0"], "--tokens must be positive"),
        (["no-such-model", "--target", "h100"], "neither a built-in model"),
        (["llama-tiny", "--target", "h100", "--tokens", "abc"], "--tokens takes comma-separated positive integers"),
        (["llama-tiny", "--target", "h100", "--png", "/dev/null/x.png"], "is a file, not a folder"),
        (["llama-tiny", "--target", "h100", "--png", str(tmp_path / "notes.txt")], "must end in .png"),
        (["llama-tiny", "--target", "h100", "--png", str(png)], "already exists; pass --overwrite"),
    ]:
        result = runner.invoke(app, ["roofline", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_roofline_beside_a_measured_bench(tmp_path):
    """The predicted speedups of all linears (the LM head kept dense) next to what bench measured, per N."""
    bench_json = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "llama-tiny", "--seq", "64", "--new-tokens", "4", "--budget", "0.05",
                              "-o", str(bench_json)])  # fmt: skip
    assert res.exit_code == 0, res.output
    result = runner.invoke(app, ["roofline", "llama-tiny", "--target", "h100", "--tokens", "1,64,128",
                                 "--measured", str(bench_json), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    totals = json.loads(result.stdout)["totals"]
    measured = json.loads(bench_json.read_text())
    prefill = {r["name"]: min(x["ms"] for x in r["prefill"]) for r in measured["variants"]}
    assert totals["64"]["measured"]["speedup"] == pytest.approx(prefill["dense"] / prefill["blast"])
    assert totals["1"]["measured"]["what"].startswith("decode") and totals["128"]["measured"] is None
    for t in totals.values():  # the kept LM head dilutes the converted layers' speedup towards 1
        assert t["kept_dense"] > 0
        assert min(1, t["speedup_kernels"]) <= t["speedup_all_linears"] <= max(1, t["speedup_kernels"])
    result = runner.invoke(app, ["roofline", "gpt2-tiny", "--target", "h100", "--measured", str(bench_json)])
    assert result.exit_code == 2 and "is a bench of 'llama-tiny'" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = runner.invoke(app, ["roofline", "llama-tiny", "--target", "h100", "--measured", str(bad)])
    assert result.exit_code == 2 and "dense and a BLR model" in result.output


def test_kernel_paths_follow_the_dispatch_rules():
    """The kernels' stages are the path ``kernels/dispatch.py`` picks, which the launchers take: BLAST staged above
    64 tokens unless b_out <= 4, Monarch's extra interleave pass above 64 tokens; the switches move both."""

    def names(layer, n):
        return [st.name for st in roofline.stages(layer, "kernels", n)]

    for layer in LAYERS[:2]:
        b_out = layer["num_blocks"][0]
        for n in (1, 64, 65, 1000):
            assert (names(layer, n) == ["V", "S", "U"]) == dispatch.blast_staged(n, b_out), (b_out, n)
            assert (names(layer, n) == ["V", "S", "U"]) == (b_out == 8 and n > 64), (b_out, n)
    monarch = LAYERS[2]
    assert names(monarch, 64) == ["stage 1", "stage 2"] and names(monarch, 65)[-1] == "interleave"
    with dispatch.switched(many_tokens_fused=False, monarch_direct_max_n=128):
        assert names(LAYERS[0], 65) == ["V", "S", "U"] and names(monarch, 65) == ["stage 1", "stage 2"]
