"""The relay's own web pages and probes: /admin, the key holder's page, /healthz, /metrics."""
