"""The stages of a trait run (responses, judge, activations, vectors), each a module of its key,
compute, save and load, run by the one runner in ``stage.py``."""
