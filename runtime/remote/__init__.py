"""Remote blocks: the wire protocol (``protocol``) and the client (``client``).

``with model.trace(x, remote=True):`` sends the block to an intervene server
(``python -m runtime.serve``) instead of running it here; see ``client``.
"""
