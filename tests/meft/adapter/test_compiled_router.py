"""The compiled router (`route(..., compiled=True)`: `route_core` under torch.compile) against the eager core.

One compile per process (dynamic token count), then every case must give the eager Routing exactly: ids,
slots, re-routed experts, padding, balance bias, no budget, several token counts; and the scores kept for the
same forward's gate weights must be the eager ones, for the same x and gate objects.
"""

import pytest
import torch

from meft.adapter import router
from meft.adapter.router import COMPILE_FAILED, gate_weights, route
from meft.profile import SyncCounter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

FIELDS = ("top_idx", "pos", "kept", "ids", "load")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test starts with dynamo's caches empty (their recompile counts add up across a process)."""
    torch._dynamo.reset()
    COMPILE_FAILED.clear()
    yield
    COMPILE_FAILED.clear()


def _cases():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(16, 32, generator=g)
    bias = torch.randn(16, generator=g) * 0.1
    for n_tok, budget, with_pad, with_bias in [(24, 64, True, False), (40, 64, False, True), (7, None, True, False),
                                               (33, 32, True, True), (24, 256, False, False)]:
        x = torch.randn(n_tok, 32, generator=g)
        valid = (torch.rand(n_tok, generator=g) > 0.2) if with_pad else None
        yield x, gate, dict(experts_per_token=4, expert_size=4, max_active_rows=budget, valid=valid,
                            bias=bias if with_bias else None)


@pytest.mark.parametrize("case", list(range(5)))
def test_compiled_route_equals_eager(case):
    x, gate, kw = list(_cases())[case]
    eager = route(x, gate, **kw)
    fused = route(x, gate, compiled=True, **kw)
    for name in FIELDS:
        assert torch.equal(getattr(fused, name), getattr(eager, name)), name
    assert torch.allclose(fused.dropped, eager.dropped, rtol=0, atol=1e-7)
    assert fused.expert_size == eager.expert_size
    assert not COMPILE_FAILED  # the compiled core ran, not the fallback
    # the kept scores serve the same forward's gate weights, as eager routing's do
    xg = x.clone().requires_grad_(True)
    a = gate_weights(xg, gate, route(xg, gate, compiled=True, **kw))
    b = gate_weights(xg, gate, route(xg, gate, **kw))
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_under_a_dispatch_mode_the_eager_core_runs():
    """Op and sync counters are TorchDispatchModes, which torch.compile cannot run under: same routing, eager."""
    x, gate, kw = list(_cases())[0]
    with SyncCounter():
        fused = route(x, gate, compiled=True, **kw)
    assert torch.equal(fused.ids, route(x, gate, **kw).ids)


def test_a_compiler_that_gives_up_leaves_routing_exact(monkeypatch):
    def broken():
        def core(*args):
            raise RuntimeError("recompile limit reached (simulated)")
        return core

    monkeypatch.setattr(router, "compiled_route_core", broken)
    x, gate, kw = list(_cases())[1]
    fused = route(x, gate, compiled=True, **kw)
    assert torch.equal(fused.ids, route(x, gate, **kw).ids)
    assert COMPILE_FAILED == ["RuntimeError: recompile limit reached (simulated)"]
