"""Operations: launching workers and fleets, devices, Flower, metrics, the live worker registry."""
