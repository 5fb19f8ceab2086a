"""The GPU step pipeline, proven on the CPU (issue: no host sync in the adapter path, fetch before the
base FFN, resident rows for inference).

Sync-class aten ops -- the ones that make the host wait for a GPU (`.item()`, `nonzero`, `torch.equal`,
`is_nonzero`, boolean-mask indexing) -- are counted with a TorchDispatchMode over a real wrapped-model
training step and attributed to the code that issued them. On CPU nothing actually waits, but every
such op in meft/ or offload/ would be a stall on a GPU, so the adapter path must issue none.
"""

import pytest
import torch

import meft
from meft.profile import SyncCounter
from tests.meft.adapter.test_wrap import batch, small_config, tiny_model


def _ours(counter: SyncCounter) -> dict:
    return {k: v for k, v in counter.sites.items() if k.startswith("meft/offload")}


@pytest.mark.parametrize("accum", [1, 2])
def test_training_step_issues_no_sync_in_the_adapter_path(accum):
    """Forward and backward of a real wrapped model (2 adapted layers, TransferScheduler with the thread
    engine): 0 sync-class ops from meft/ or offload/, per layer and in total. The whole step's count
    (transformers' own, e.g. its causal-mask check) is stated in the assertion message."""
    model = meft.wrap(tiny_model("llama"), small_config(grad_accum_steps=accum, max_active_rows=48))
    model.train()
    ids = batch(4, 12)
    for step in range(2):  # step 0 warms up (lazy buffers); step 1 is counted
        counter = SyncCounter()
        for part in ids.chunk(accum):
            if step == 1:
                with counter:
                    loss = model(input_ids=part, labels=part).loss / accum
                    loss.backward()
            else:
                (model(input_ids=part, labels=part).loss / accum).backward()
        model.meft.optimizer.step()
        model.meft.optimizer.zero_grad()
    assert _ours(counter) == {}, f"sync-class ops in the adapter path: {_ours(counter)}"
    assert counter.count() <= 3, counter.sites  # the whole step (issue target; today 2, transformers' mask check)
    model.meft.close()


def test_eval_forward_with_resident_rows_issues_no_sync_and_matches_fetch():
    """After training, eval forwards read rows from the resident wire-dtype copy (built once, rebuilt
    after the next step), issue no sync-class op from meft/offload, and equal the per-forward fetch."""
    cfg = small_config(wire_dtype="bfloat16", max_active_rows=48)
    res = meft.wrap(tiny_model("llama"), cfg)
    ids = batch(4, 12)
    res.train()
    for _ in range(3):
        res(input_ids=ids, labels=ids).loss.backward()
        res.meft.optimizer.step()
        res.meft.optimizer.zero_grad()
    res.eval()
    inf = res.meft._inference
    inf.mode = "resident"
    res.meft.token_rows = False  # the device path (gathered rows); the CPU's per-token reads: below
    counter = SyncCounter()
    with torch.no_grad(), counter:
        a = res(input_ids=ids).logits
        b = res(input_ids=ids[:1]).logits
    assert _ours(counter) == {}, _ours(counter)
    assert inf.builds == 1  # one resident copy for both forwards
    inf.mode = "fetch"
    with torch.no_grad():
        a_fetch, b_fetch = res(input_ids=ids).logits, res(input_ids=ids[:1]).logits
    torch.testing.assert_close(a, a_fetch, rtol=0, atol=0)  # same bf16 rows either way
    torch.testing.assert_close(b, b_fetch, rtol=0, atol=0)
    inf.mode = "resident"
    res.train()
    res(input_ids=ids, labels=ids).loss.backward()
    res.meft.optimizer.step()
    res.eval()
    with torch.no_grad():
        res(input_ids=ids)
    assert inf.builds == 2  # rebuilt once after the step changed the rows
    res.meft.token_rows = True  # CPU: each token reads its own rows of the same resident copy
    counter = SyncCounter()
    with torch.no_grad(), counter:
        c = res(input_ids=ids).logits
    assert _ours(counter) == {}, _ours(counter)
    assert inf.builds == 2  # no rebuild: the same copy
    res.meft.token_rows = False
    with torch.no_grad():
        torch.testing.assert_close(c, res(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    res.meft.close()


def test_fetch_is_issued_before_the_base_ffn():
    """Order of events in a training forward: the layer's fetch is issued, then its base FFN runs, then
    the adapter waits for the rows (so the rows travel while the FFN computes)."""
    model = meft.wrap(tiny_model("llama"), small_config())
    rt, events = model.meft, []
    fetch = rt.scheduler.fetch

    def fetch_logged(layer, ids, **kw):
        events.append(("fetch", layer))
        return fetch(layer, ids, **kw)

    rt.scheduler.fetch = fetch_logged
    for ad in rt.adapters:
        ad.base.register_forward_pre_hook(lambda m, a, i=ad.index: events.append(("ffn", i)))
    model.train()
    ids = batch(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert events == [("fetch", 0), ("ffn", 0), ("fetch", 1), ("ffn", 1)]
    model.meft.optimizer.step()
    model.meft.close()


def test_padded_forwards_issue_no_sync_in_the_adapter_path():
    """With a padded attention_mask (the runtime takes the real positions from it), a training step and
    an eval forward issue no sync-class op from meft/offload (transformers' own mask handling may)."""
    model = meft.wrap(tiny_model("llama"), small_config(max_active_rows=48))
    ids = batch(4, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = mask[3, 5:] = 0  # right padding
    model.train()
    for step in range(2):  # step 0 warms up; step 1 is counted
        counter = SyncCounter()
        with counter if step == 1 else torch.enable_grad():
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        model.meft.optimizer.step()
        model.meft.optimizer.zero_grad()
        assert step == 0 or _ours(counter) == {}, _ours(counter)
    model.eval()
    counter = SyncCounter()
    with torch.no_grad(), counter:
        model(input_ids=ids, attention_mask=mask)
    assert _ours(counter) == {}, _ours(counter)
    model.meft.close()
