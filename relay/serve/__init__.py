"""Running the relay: the CLI, `make run`'s launcher, gunicorn's config and worker, the demo."""
