"""The shipped experiment configs: each module's `get_config()` is a run.

Found by name from anywhere, installed from a wheel or a checkout:
`dpjax train configs/quickstart.py`, `dpjax train quickstart` and
`dpjax train dp_flat/full` name the same kind of file here; `dpjax train --list`
lists them. Copy one to start your own (`dpjax config NAME` prints every key).
They sit on top, beside the CLI; one builds on another through
`dpjax.training.config.load_config`.
"""
