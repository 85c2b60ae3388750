"""Data: samplers (host side), pipelines and text loading."""
