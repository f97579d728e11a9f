"""The server's endpoints, one module each, in the shape of vLLM's ``entrypoints``: the typed request and response
models (pydantic), what the endpoint computes on a model view (plain Python, no HTTP), and its :class:`Route`.

:data:`rlhf_rewards.serving.app.ROUTES` lists them; the HTTP plumbing they share (parsing, limits, disconnects,
errors, metrics) is :mod:`rlhf_rewards.serving.routing`'s. A new endpoint is one module here and one row there.
"""
