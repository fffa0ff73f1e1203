import pytest

from blrdeploy import BlastLinear, MonarchLinear, choose_blocks_and_rank
from blrdeploy.structures.budget import pick_num_blocks


@pytest.mark.parametrize(
    "out,inn,expected_b",
    [(4096, 4096, 16), (11008, 4096, 16), (4096, 11008, 64), (768, 768, 3), (3072, 768, 3), (1152, 1152, 6)],
)
def test_block_width_rule(out, inn, expected_b):
    b = pick_num_blocks(out, inn)
    assert b == expected_b
    assert out % b == 0 and inn % b == 0


def test_no_block_in_range_falls_back_to_nearest():
    assert pick_num_blocks(10, 10) == 1  # every width is below 64: the widest block
    assert pick_num_blocks(7, 7168) == 7  # 7168/7 = 1024 is above 256, yet the nearest the dims allow
    assert pick_num_blocks(96, 96) == 1  # 96 is in range but not a multiple of 16: still accepted


@pytest.mark.parametrize("structure", ["blast", "monarch", "lowrank"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("out,inn", [(4096, 4096), (11008, 4096), (768, 3072), (1152, 1152)])
def test_reached_ratio_is_close_and_shapes_are_valid(structure, ratio, out, inn):
    c = choose_blocks_and_rank(out, inn, ratio, structure)
    # ranks move in steps of 16 (lcm(b, 16) for Monarch): the budget is met to within half a step
    assert abs(c.ratio - ratio) / ratio < 0.1, c
    assert c.rank % 16 == 0
    if structure == "blast":
        layer = BlastLinear(inn, out, c.num_blocks, c.rank, device="meta")
    elif structure == "monarch":
        layer = MonarchLinear(inn, out, c.num_blocks, c.rank, device="meta")
        assert c.rank % c.num_blocks == 0
    else:
        return
    assert layer.num_params() == c.params


def test_llama_attention_at_half_budget():
    c = choose_blocks_and_rank(4096, 4096, 0.5, "blast")
    assert (c.num_blocks, c.rank) == (16, 992)  # 0.5*4096^2/(8192+256) = 992.97 -> nearest multiple of 16
    assert c.to_dict()["ratio"] == pytest.approx(c.params / 4096**2)


def test_tiny_layers_still_get_a_valid_rank():
    c = choose_blocks_and_rank(12, 20, 0.3, "blast")
    assert 1 <= c.rank <= 12
    c = choose_blocks_and_rank(12, 20, 0.5, "monarch")
    assert c.rank % c.num_blocks == 0 and c.rank <= 12


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"params ratio must be in \(0, 1\)"):
        choose_blocks_and_rank(64, 64, ratio)


def test_unknown_structure():
    with pytest.raises(ValueError, match="unknown structure 'tt'; choose one of blast, monarch, lowrank"):
        choose_blocks_and_rank(64, 64, 0.5, "tt")
