"""Job handlers: one per job kind, each a thin layer over its predictor."""
