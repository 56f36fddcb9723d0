"""One module of routes per task, all under /v1."""
