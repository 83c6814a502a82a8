"""The model and its one shared KV-cached sequence: loading, quantisation, attention, sampling, the
turn template, and the device worker every session shares."""
