"""The weight-sharing supernet: dynamic ops, the model, BN recalibration."""
