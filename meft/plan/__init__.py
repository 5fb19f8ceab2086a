"""`meft plan`: GPU peak of a wrapped training step measured on fake tensors (`fake_step`, `track`), host
RAM of the stores, the known model configs (`configs`), the search for a fitting config (`search`), and
the planner that ties them together (`planner`).
"""
