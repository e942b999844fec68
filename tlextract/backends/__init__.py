"""Where runs execute: Ray (the local backend is the stages themselves)."""
