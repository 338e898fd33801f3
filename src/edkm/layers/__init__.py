"""The clustered layers: ``base`` (what every clustered layer shares), ``dkm`` (training: soft clustering with DKM),
``lut`` (inference: LUT + indices), ``tied`` (the per-forward scope in which tied weights are clustered once)."""
