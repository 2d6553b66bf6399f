from ray_calib.inc.naming import JSON, MOD_LIST, NPZ, StatsName, parse_name


def test_rank_matching_is_exact():
    one = parse_name("run_hooks_maxabs_1_16.json")[0]
    eleven = parse_name("run_hooks_maxabs_11_16.json")[0]
    assert (one.rank, one.world_size) == (1, 16)
    assert (eleven.rank, eleven.world_size) == (11, 16)
    assert one != eleven


def test_scale_files_unranked_files_and_kinds():
    name, kind = parse_name("x_hooks_maxabs_MAXABS_POW2_3_8_mod_list.json")
    assert (name.prefix, name.method, name.rank, name.world_size, kind) == ("x", "MAXABS_POW2", 3, 8, MOD_LIST)
    name, kind = parse_name("x_hooks_maxabs_MAXABS_HW.npz")
    assert (name.method, name.rank, kind) == ("MAXABS_HW", None, NPZ)
    name, kind = parse_name("inc_output_hooks_maxabs.json")
    assert (name.prefix, name.method, name.rank, kind) == ("inc_output", None, None, JSON)
    assert parse_name("inc_output.json") is None
    assert parse_name("ray_calib_meta.json") is None


def test_stem_round_trips():
    for stem in ("a_hooks_maxabs_0_4", "a_b_hooks_maxabs_MAXABS_HW_12_16", "a_hooks_maxabs"):
        assert parse_name(stem + ".npz")[0].stem == stem
    assert StatsName("p", rank=2, world_size=8).with_rank(0, 4).stem == "p_hooks_maxabs_0_4"
