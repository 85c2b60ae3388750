"""Multi-stage runs built on training: DistilDP (`distil_dp`)."""
