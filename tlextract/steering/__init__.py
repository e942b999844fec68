"""Steering with trait vectors: the alpha sweep, the automatic layer and strength choice within
fluency bounds, and steering's side effects on other traits."""
