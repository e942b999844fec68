"""The stages of a trait run (generate, judge, activations, vectors), each with its key, run and
load."""
