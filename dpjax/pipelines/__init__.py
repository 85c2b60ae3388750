"""Multi-stage runs built on training: DistilDP (`distill`); a finished run exported (`export`)."""
