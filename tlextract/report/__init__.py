"""Rendering: tables, plots and HTML."""
