"""Lomo / AdaLomo: backbone optimizers fused into backward (update in place, no `.grad` kept), usable on
any model; `meft.Lomo` and `meft.AdaLomo` are the public faces.
"""
