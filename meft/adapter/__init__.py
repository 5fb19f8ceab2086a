"""What `meft.wrap` puts into a model: targets, router, the adapter math (fast path + dense twin), the
adapter layer module, wrap/unwrap, the runtime behind `model.meft`, the adapter-side optimizer, the
summary of what is trained where, adapter save/load, and the dense device-resident baseline.
"""
