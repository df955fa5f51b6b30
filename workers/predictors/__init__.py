"""One predictor per model kind: ``setup(device)`` loads the warm model, ``predict`` runs it."""
