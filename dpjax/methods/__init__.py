"""Paper methods that change the private step: DP-Flat (`flatness`) and LMO-DP's search.

They plug into the core through its extension points (optax transforms,
DpEvents and accountants) and import only the core, models and assets.
"""
