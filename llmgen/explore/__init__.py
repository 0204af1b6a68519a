"""``llmgen explore``: walk the tree of possible continuations by hand.

``session.py`` is the engine (the explored tree, the KV cache of the current path, the
sampler chain's account of every candidate); ``script.py`` runs its actions from a
``--script``; ``app.py`` is the Textual app, imported only by ``llmgen explore`` itself.
"""
