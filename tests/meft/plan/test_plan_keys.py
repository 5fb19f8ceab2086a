"""`meft plan` counts the host row width the run will use: values (d) with generated frozen keys, [K | V] (2d)
with stored ones -- stores, staging, pending gradients and the data-parallel exchange all follow it."""

import torch

from meft.config import MeftConfig
from meft.plan.planner import collective_bytes, host_ram_bytes
from offload.scheduler import TransferScheduler
from offload.store import RowStore


def test_host_ram_and_exchange_count_the_row_width():
    d, layers = 576, 30
    gen, old = MeftConfig(), MeftConfig(key_source="stored")
    assert gen.generated_keys and gen.row_width(d) == d and old.row_width(d) == 2 * d
    hg, ho = host_ram_bytes(gen, layers, d), host_ram_bytes(old, layers, d)
    assert hg["stores"] == layers * RowStore.bytes_needed(4096, d)
    assert ho["stores"] == layers * RowStore.bytes_needed(4096, 2 * d)
    assert hg["stores"] <= 0.55 * ho["stores"]
    assert hg["staging"] == TransferScheduler.staging_bytes(layers, gen.budget_rows, d, torch.bfloat16,
                                                            max_live_rows=gen.budget_rows)
    assert hg["pending_grads"] == layers * gen.budget_rows * (d * 4 + 8)
    cg, co = collective_bytes(gen, layers, d, world=2), collective_bytes(old, layers, d, world=2)
    assert cg["analytic_min"] == layers * cg["union_rows"] * (8 + d * 2)
    assert co["analytic_min"] == layers * co["union_rows"] * (8 + 2 * d * 2)
    assert not MeftConfig(key_lr=None).generated_keys  # trainable keys keep [K | V] rows
