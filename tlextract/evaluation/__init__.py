"""Evaluating trait vectors: nested cross-validation (the numbers quoted), held-out reports,
surface baselines, variant comparison and the cosines between traits."""
