"""DP-Flat configs (flatness-aware fine-tuning)."""
