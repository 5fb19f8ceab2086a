"""prefetch="lookahead" with the real TransferScheduler: same training as prefetch="none", fewer rows.

Bitwise equality is the right bar: the lookahead path hands the adapter the same wire-dtype rows (the
same store state: a staleness-1 update waits until the prefetch chain ends), in the order of the
needed ids (an exact `index_select` from [prefetched | missing]), and pushes the same gradients for
the same ids in the same order; nothing is summed in another order, so no rounding can differ.
"""

import pytest
import torch

import meft
from tests.meft.adapter.test_wrap import batch, small_config, tiny_model, train

STEPS = 5


def _run(prefetch: str, accum: int, **kw):
    model = meft.wrap(tiny_model("llama"), small_config(prefetch=prefetch, grad_accum_steps=accum, **kw))
    losses = train(model, batch(2, 12), STEPS, accum=accum)
    rt = model.meft
    rt.sync_to_host()  # flush: every update applied, every copy metered
    state = [getattr(s, n).clone() for s in rt.stores for n in ("weights", "exp_avg", "exp_avg_sq", "steps")]
    state += [ad.gate.detach().clone() for ad in rt.adapters]
    return losses, state, rt


def _layer_rows(rt, layer: int, direction: str) -> int:
    return rt.meter.report()["per_layer"][layer][direction]["rows"]


@pytest.mark.parametrize("accum,kw", [(1, {}), (2, {"staleness": 1}),
                                      (1, {"wire_dtype": "bfloat16", "clip": "global", "staleness": 1})])
def test_lookahead_equals_none_and_moves_only_missing_rows(accum, kw):
    l0, s0, none = _run("none", accum, **kw)
    l1, s1, look = _run("lookahead", accum, **kw)
    assert l1 == l0  # bitwise losses
    for a, b in zip(s1, s0):  # weights, both moments, per-row steps of every store; router gates
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(look.stores[1].steps.sum()) > 0

    la = look.lookahead
    assert la["needed"] == _layer_rows(none, 1, "h2d")  # layer 1's needed rows (what "none" moves)
    assert 0 < la["hit"] < la["needed"] <= la["prefetched"] + la["needed"] - la["hit"]  # real misses
    rep = look.meter.report()["lookahead"]
    assert (rep["needed"], rep["hit"]) == (la["needed"], la["hit"])
    # rows down: layer 0 as before; layer 1 the prefetch plus only the misses. Rows up: needed only.
    assert _layer_rows(look, 0, "h2d") == _layer_rows(none, 0, "h2d")
    assert _layer_rows(look, 1, "h2d") == la["prefetched"] + (la["needed"] - la["hit"])
    for layer in (0, 1):
        assert _layer_rows(look, layer, "d2h") == _layer_rows(none, layer, "d2h")
    t0, t1 = none.meter.report()["totals"], look.meter.report()["totals"]
    assert (t1["d2h"]["rows"], t1["d2h"]["bytes"]) == (t0["d2h"]["rows"], t0["d2h"]["bytes"])
    miss_share = 1 - la["hit"] / la["needed"]
    for key in ("rows", "bytes"):
        assert t1["h2d"][key] <= (1 + miss_share) * t0["h2d"][key]
        both0, both1 = t0["h2d"][key] + t0["d2h"][key], t1["h2d"][key] + t1["d2h"][key]
        assert both1 <= (1 + miss_share) * both0
    wire = 2 if kw.get("wire_dtype") == "bfloat16" else 4
    assert t1["h2d"]["bytes"] == t1["h2d"]["rows"] * 32 * wire  # width d = 32: values (frozen keys generated)


def test_lookahead_reserves_room_for_prefetch_plus_misses():
    none = meft.wrap(tiny_model("llama"), small_config())
    look = meft.wrap(tiny_model("llama"), small_config(prefetch="lookahead"))
    m = none.meft.scheduler.max_rows
    assert [st.capacity for st in none.meft.scheduler.layers] == [m, m]  # "none": unchanged buffers
    assert [st.capacity for st in look.meft.scheduler.layers] == [2 * m, 2 * m]
    assert look.meft.scheduler.layers[0].rows_dev.shape[0] == 2 * m
