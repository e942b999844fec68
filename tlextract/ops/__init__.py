"""Pure computation on a loaded model or on tensors: generation (with capture), pooling, vector
methods, metrics, steering, monitoring, vector containers and file formats."""
