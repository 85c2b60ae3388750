"""Multi-stage runs built on training: DistilDP (`distill`)."""
